"""Shared fixtures: tiny random source models of every supported family, a small real tokenizer,
the bundled SmolLM2-135M (materialised once into the mla-zoo cache) and its MLA conversion at the paper's
mildest setting, the tiny recipe workspace and the tiny release built from it (tests/workspace.py), and
the local Hub server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import workspace
from hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

# family -> (config class name, extra config fields)
FAMILIES = {
    "llama-mha": ("LlamaConfig", {"num_key_value_heads": 4}),
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2-bias": ("Qwen2Config", {"num_key_value_heads": 2}),
}


def perturbed(model):
    """`model` with non-zero biases and norm weights away from 1, so that tests see them (in place)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_source(family: str, seed: int = 0, vocab_size: int = 384):
    """A random tiny model of a family, with non-zero biases (Qwen2) so biases are really tested."""
    import transformers

    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return perturbed(model)


@pytest.fixture(scope="session")
def tokenizer():
    """A real byte-level BPE tokenizer trained on the calibration text (384 tokens, has a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([(DATA / "calib.txt").read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return fast


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory, tokenizer):
    """Save a tiny source checkpoint (with tokenizer) of a family; cached per family."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            tiny_source(family).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The bundled real model: (model fp32, tokenizer, SourceInfo)."""
    from mla_zoo.modeling import sources

    return sources.resolve("smollm2-135m")


# The paper's mildest SmolLM setting: d_kv=32 per KV head, r=4 pairs, 2-norm on real text; the SVD and the number
# of calibration tokens are the tests' own (smollm2_mla: whitened on 512; test_real_model: both SVDs on 2048).
SMOLLM2_PAPER_SETTING = dict(kv_rank_per_head=32, rope_pairs=4, rope_strategy="2-norm",
                             calib_text=str(DATA / "calib.txt"), dtype="float32")


@pytest.fixture(scope="session")
def smollm2_mla(smollm2):
    """The bundled model converted once at SMOLLM2_PAPER_SETTING with whitened SVD on 512 calibration tokens, for
    the ONNX tests (test_onnx_smollm2, test_onnx_cuda_gpu): (mla model fp32, ConversionReport). Shared: never
    change it in place (copy.deepcopy it first)."""
    from mla_zoo.modeling.convert import convert_model
    from mla_zoo.modeling.convert_schema import ConvertSettings

    model, tokenizer, info = smollm2
    settings = ConvertSettings(svd="whitened", calib_tokens=512, **SMOLLM2_PAPER_SETTING)
    mla, report = convert_model(model, tokenizer, info, settings, progress=False)
    return mla.eval(), report


@pytest.fixture(scope="session")
def recipe_workspace(tmp_path_factory, source_dir):
    """`recipe_workspace(name)`: a fresh copy, of its own, of the tiny recipe workspace (tests/workspace.py;
    built once): the tiny Llama (GQA) source as `src` and short `calib.txt` and `heldout.txt`."""
    template = workspace.make_workspace(tmp_path_factory.mktemp("recipe-workspace"), source_dir("llama-gqa"))

    def copy(name: str) -> Path:
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(template, root, dirs_exist_ok=True)
        return root

    return copy


@pytest.fixture(scope="session")
def tiny_release(recipe_workspace) -> tuple[Path, dict]:
    """The v0.1.0 release of the tiny recipe (workspace.RECIPE), built once: (release dir, build summary).
    Shared: copy the directory before building into it or changing it."""
    from mla_zoo.zoo.release.build import build

    root = recipe_workspace("tiny-release")
    out = root / "release-v0.1.0"
    summary = build(workspace.write_recipe(root), out, progress=False, log=lambda message: None)
    return out, summary


def convert_tiny(model, **settings):
    """Convert an in-memory tiny model; returns (mla model in fp32, ConversionReport)."""
    from mla_zoo.modeling.convert import convert_model
    from mla_zoo.modeling.convert_schema import ConvertSettings
    from mla_zoo.modeling.sources import SourceInfo

    info = SourceInfo("tiny", "tiny", "tiny", model.config.model_type, "0")
    settings.setdefault("rope_strategy", "high")
    settings.setdefault("svd", "joint")  # fixed strategy + weight-only SVD + no refit: no calibration data needed
    settings.setdefault("refit", "none")  # the plain conversion, which the references describe (test_refit: output)
    mla, report = convert_model(model, None, info, ConvertSettings(dtype="float32", **settings), progress=False)
    return mla.eval(), report


def cache_of(output):
    """The cache a model output carries: `.cache` from transformers 5.24 on, `.past_key_values` before."""
    from mla_zoo.modeling.remote.modeling_llama_mla import CACHE_FIELD

    return getattr(output, CACHE_FIELD)


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    """The Hub-compatible server on 127.0.0.1 (tests/hub_server.py), one per test module."""
    with HubServer() as server:
        yield server
        assert not server.errors, "\n".join(server.errors)
