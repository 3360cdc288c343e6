"""Recipes: one declarative TOML file per released checkpoint (`zoo/recipes/<name>.toml`).

A recipe says where the model comes from, how it is converted, fine-tuned, evaluated and
exported, which quality gates a release must pass, and where it is published (repo id and
semver version). `load_recipe` parses and validates one; every problem is reported as
`recipe NAME: section.key ...` with the valid range or the accepted values.

Relative paths in a recipe (`source.model` when it is a local dir or `.gguf` file,
`conversion.calib_text`, `finetune.data_file`, `eval.text`) are resolved against the directory
that holds the recipe file, never against the current directory: the shipped recipes in
`zoo/recipes/` therefore name the repo's texts as `../../data/heldout.txt`. Absolute paths and
`~` work too.

Schema (keys not listed are refused, so a typo cannot silently fall back to a default):

    [release]     name, repo_id ("ORG/NAME"), version ("X.Y.Z" semver), description?,
                  license? (default: the base model's), base_model? (default: the source's Hub id)
    [source]      model (bundled name | Hub id | local checkpoint dir | .gguf file), revision? (Hub ids)
    [conversion]  kv_rank_per_head? (d_kv) | kv_lora_rank? (total latent), rope_pairs?, rope_strategy,
                  svd, calib_text?, calib_tokens?, calib_seq_len, dtype, seed
    [finetune]    enabled (default false), data_file? | dataset? (+ dataset_config?, dataset_split),
                  steps?, tokens?, learning_rate, batch_size, seq_len, warmup_ratio, [finetune.options]
    [eval]        text, seq_len, max_tokens?, dtype, [eval.gates] max_perplexity_increase?
                  (relative: 0.25 = +25%), max_perplexity?, min_kv_reduction? (fraction)
    [export]      enabled (default false), opset, dtype, [export.options]
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mla_zoo.modeling.common import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10 only
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
ROPE_STRATEGIES = ("high", "low", "uniform", "2-norm")
SVD_METHODS = ("joint", "split", "whitened")
CONVERT_DTYPES = ("auto", "float32", "bfloat16", "float16")
EVAL_DTYPES = ("float32", "bfloat16")
_REQUIRED = object()


def semver_key(version: str) -> tuple:
    """Sort key of a semver string (pre-releases sort before their release)."""
    m = SEMVER.fullmatch(version)
    if m is None:
        raise ValueError(f"not a semver version: {version!r}")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return major, minor, patch, 1, ()
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return major, minor, patch, 0, parts


class _Table:
    """Typed, validated access to one TOML table; `close()` refuses keys nobody asked for."""

    def __init__(self, recipe: str, section: str, data: Any, base_dir: Path):
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {recipe}: [{section}] must be a table")
        self.recipe, self.section, self.data, self.base_dir = recipe, section, data, base_dir
        self.seen: set[str] = set()

    def error(self, key: str, what: str, value: Any = _REQUIRED) -> RecipeError:
        got = "" if value is _REQUIRED else f" (got {value!r})"
        return RecipeError(f"recipe {self.recipe}: {self.section}.{key} {what}{got}")

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise RecipeError(f"recipe {self.recipe}: {self.section}.{key} is required")
            return default, False
        return self.data[key], True

    def int(self, key: str, default: Any = None, minimum: int = 1) -> int | None:
        value, given = self._get(key, default)
        if given and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise self.error(key, f"must be an int >= {minimum}", value)
        return value

    def float(self, key: str, default: Any = None, minimum: float | None = None, maximum: float | None = None,
              positive: bool = False) -> float | None:
        value, given = self._get(key, default)
        if not given:
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        ok = ok and (not positive or value > 0)
        if not ok:
            if positive:
                rng = " > 0"
            elif minimum is not None and maximum is not None:
                rng = f" in [{minimum}, {maximum}]"
            else:
                rng = f" >= {minimum}" if minimum is not None else ""
            raise self.error(key, f"must be a number{rng}", value)
        return float(value)

    def bool(self, key: str, default: Any = False) -> bool:
        value, given = self._get(key, default)
        if given and not isinstance(value, bool):
            raise self.error(key, "must be true or false", value)
        return value

    def str(self, key: str, default: Any = None, choices: tuple[str, ...] | None = None,
            pattern: re.Pattern | None = None, what: str = "") -> str | None:
        value, given = self._get(key, default)
        if not given:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "must be a non-empty string", value)
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}", value)
        if pattern is not None and not pattern.fullmatch(value):
            raise self.error(key, f"must be {what}", value)
        return value

    def path(self, key: str, default: Any = None, *, must_be: str = "file") -> Path | None:
        raw = self.str(key, default)
        if raw is None:
            return None
        path = resolve_path(raw, self.base_dir)
        exists = path.is_file() if must_be == "file" else path.exists()
        if not exists:
            raise self.error(key, f"names a {must_be} that does not exist: {path} "
                                  "(relative paths are relative to the recipe file's directory)", raw)
        return path

    def table(self, key: str) -> dict:
        value, given = self._get(key, {})
        if given and not isinstance(value, dict):
            raise self.error(key, "must be a table", value)
        return dict(value)

    def close(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise RecipeError(f"recipe {self.recipe}: unknown key {self.section}.{unknown[0]} "
                              f"(known keys of [{self.section}]: {known})")


def resolve_path(raw: str, base_dir: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


@dataclass(frozen=True)
class ReleaseSpec:
    name: str
    repo_id: str
    version: str
    description: str | None = None
    license: str | None = None
    base_model: str | None = None

    @property
    def tag(self) -> str:
        return f"v{self.version}"


@dataclass(frozen=True)
class SourceSpec:
    model: str  # as written in the recipe
    kind: str  # bundled | gguf | local | hub
    path: Path | None = None  # resolved, for gguf and local
    revision: str | None = None  # hub only


@dataclass(frozen=True)
class ConversionSpec:
    kv_lora_rank: int | None = None
    kv_rank_per_head: int | None = None
    rope_pairs: int | None = None
    rope_strategy: str = "2-norm"
    svd: str = "joint"
    calib_text: Path | None = None
    calib_tokens: int | None = None
    calib_seq_len: int = 512
    dtype: str = "auto"
    seed: int = 0

    def settings(self):
        """The converter's `ConvertSettings` for this section."""
        from mla_zoo.modeling.convert import ConvertSettings

        values = asdict(self)
        values["calib_text"] = str(self.calib_text) if self.calib_text else None
        return ConvertSettings(**values)


@dataclass(frozen=True)
class FinetuneSpec:
    enabled: bool = False
    data_file: Path | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    steps: int | None = None
    tokens: int | None = None
    learning_rate: float = 1e-4
    batch_size: int = 8
    seq_len: int = 2048
    warmup_ratio: float = 0.05
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GateSpec:
    max_perplexity_increase: float | None = None  # relative: mla / base - 1
    max_perplexity: float | None = None
    min_kv_reduction: float | None = None


@dataclass(frozen=True)
class EvalSpec:
    text: Path
    seq_len: int = 1024
    max_tokens: int | None = None
    dtype: str = "float32"
    gates: GateSpec = field(default_factory=GateSpec)


@dataclass(frozen=True)
class ExportSpec:
    enabled: bool = False
    opset: int = 18
    dtype: str = "float32"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str  # the file's stem
    path: Path
    text: str  # the TOML as written (shown in the model card)
    raw: dict  # the parsed TOML, paths as written
    release: ReleaseSpec
    source: SourceSpec
    conversion: ConversionSpec
    finetune: FinetuneSpec
    eval: EvalSpec
    export: ExportSpec

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def section(self, name: str) -> dict:
        """A section as JSON-able data with resolved paths (for stage records and hashing)."""
        return _jsonable(asdict(getattr(self, name)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.toml"))}


def find_recipe(spec: str | Path) -> Path:
    """A recipe file path, or the name of a shipped recipe (`smollm2-135m-dkv32`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise RecipeError(f"no recipe file {spec} and no shipped recipe of that name "
                      f"(shipped: {', '.join(shipped) or 'none'})")


def load_recipe(spec: str | Path) -> Recipe:
    path = find_recipe(spec).resolve()
    text = path.read_text(encoding="utf-8")
    return parse_recipe(text, path)


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate a recipe's TOML; `path` names it and anchors its relative paths."""
    name = path.stem
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {name}: not valid TOML: {e}") from e
    base = path.parent
    known = ("release", "source", "conversion", "finetune", "eval", "export")
    for key in raw:
        if key not in known:
            raise RecipeError(f"recipe {name}: unknown section [{key}] (sections: {', '.join(known)})")
    for key in ("release", "source", "eval"):
        if key not in raw:
            raise RecipeError(f"recipe {name}: the [{key}] section is required")
    recipe = Recipe(
        name=name, path=path, text=text, raw=raw,
        release=_release(_Table(name, "release", raw["release"], base)),
        source=_source(_Table(name, "source", raw["source"], base)),
        conversion=_conversion(_Table(name, "conversion", raw.get("conversion", {}), base)),
        finetune=_finetune(_Table(name, "finetune", raw.get("finetune", {}), base)),
        eval=_eval(_Table(name, "eval", raw["eval"], base)),
        export=_export(_Table(name, "export", raw.get("export", {}), base)),
    )
    return recipe


def _release(t: _Table) -> ReleaseSpec:
    spec = ReleaseSpec(
        name=t.str("name", _REQUIRED),
        repo_id=t.str("repo_id", _REQUIRED, pattern=REPO_ID, what='a Hub repo id "ORG/NAME"'),
        version=t.str("version", _REQUIRED, pattern=SEMVER, what='a semver version "MAJOR.MINOR.PATCH" (no "v")'),
        description=t.str("description"),
        license=t.str("license"),
        base_model=t.str("base_model", pattern=REPO_ID, what='a Hub repo id "ORG/NAME"'),
    )
    t.close()
    return spec


def _source(t: _Table) -> SourceSpec:
    from mla_zoo.modeling.sources import BUNDLED

    model = t.str("model", _REQUIRED)
    revision = t.str("revision")
    t.close()
    local = resolve_path(model, t.base_dir)
    if model in BUNDLED:
        kind, path = "bundled", None
    elif model.endswith(".gguf"):
        if not local.is_file():
            raise t.error("model", f"names a .gguf file that does not exist: {local}", model)
        kind, path = "gguf", local
    elif model.startswith((".", "/", "~")) or local.exists():
        if not (local / "config.json").is_file():
            raise t.error("model", f"names a local checkpoint dir without config.json: {local} "
                                   "(relative paths are relative to the recipe file's directory)", model)
        kind, path = "local", local
    elif REPO_ID.fullmatch(model):
        kind, path = "hub", None
    else:
        raise t.error("model", f"must be a bundled name ({', '.join(BUNDLED)}), a Hub id ORG/NAME, "
                               "a local checkpoint dir or a .gguf file", model)
    if revision is not None and kind != "hub":
        raise t.error("revision", f"applies to Hub sources only; {model!r} is a {kind} source", revision)
    return SourceSpec(model=model, kind=kind, path=path, revision=revision)


def _conversion(t: _Table) -> ConversionSpec:
    spec = ConversionSpec(
        kv_lora_rank=t.int("kv_lora_rank"),
        kv_rank_per_head=t.int("kv_rank_per_head"),
        rope_pairs=t.int("rope_pairs"),
        rope_strategy=t.str("rope_strategy", "2-norm", choices=ROPE_STRATEGIES),
        svd=t.str("svd", "joint", choices=SVD_METHODS),
        calib_text=t.path("calib_text"),
        calib_tokens=t.int("calib_tokens"),
        calib_seq_len=t.int("calib_seq_len", 512, minimum=2),
        dtype=t.str("dtype", "auto", choices=CONVERT_DTYPES),
        seed=t.int("seed", 0, minimum=0),
    )
    t.close()
    return spec


def _finetune(t: _Table) -> FinetuneSpec:
    spec = FinetuneSpec(
        enabled=t.bool("enabled", False),
        data_file=t.path("data_file"),
        dataset=t.str("dataset", pattern=REPO_ID, what='a Hub dataset id "ORG/NAME"'),
        dataset_config=t.str("dataset_config"),
        dataset_split=t.str("dataset_split", "train"),
        steps=t.int("steps"),
        tokens=t.int("tokens"),
        learning_rate=t.float("learning_rate", 1e-4, positive=True),
        batch_size=t.int("batch_size", 8),
        seq_len=t.int("seq_len", 2048, minimum=2),
        warmup_ratio=t.float("warmup_ratio", 0.05, minimum=0.0, maximum=0.99),
        options=t.table("options"),
    )
    t.close()
    if spec.data_file is not None and spec.dataset is not None:
        raise RecipeError(f"recipe {t.recipe}: give finetune.data_file or finetune.dataset, not both")
    if spec.enabled:
        if spec.data_file is None and spec.dataset is None:
            raise RecipeError(f"recipe {t.recipe}: finetune.enabled = true needs finetune.data_file "
                              "(a local text) or finetune.dataset (a Hub dataset id)")
        if spec.steps is None and spec.tokens is None:
            raise RecipeError(f"recipe {t.recipe}: finetune.enabled = true needs a budget: "
                              "finetune.steps or finetune.tokens")
    return spec


def _eval(t: _Table) -> EvalSpec:
    text = t.path("text", _REQUIRED)
    seq_len = t.int("seq_len", 1024, minimum=2)
    max_tokens = t.int("max_tokens", minimum=2)
    dtype = t.str("dtype", "float32", choices=EVAL_DTYPES)
    g = _Table(t.recipe, "eval.gates", t.table("gates"), t.base_dir)
    t.close()
    gates = GateSpec(
        max_perplexity_increase=g.float("max_perplexity_increase", minimum=0.0),
        max_perplexity=g.float("max_perplexity", positive=True),
        min_kv_reduction=g.float("min_kv_reduction", minimum=0.0, maximum=1.0),
    )
    g.close()
    return EvalSpec(text=text, seq_len=seq_len, max_tokens=max_tokens, dtype=dtype, gates=gates)


def _export(t: _Table) -> ExportSpec:
    spec = ExportSpec(
        enabled=t.bool("enabled", False),
        opset=t.int("opset", 18),
        dtype=t.str("dtype", "float32", choices=("float32", "float16", "bfloat16")),
        options=t.table("options"),
    )
    t.close()
    return spec

