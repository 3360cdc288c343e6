"""Recipes: one declarative TOML file per released checkpoint (`zoo/recipes/<name>.toml`).

A recipe says where the model comes from, how it is converted, fine-tuned, evaluated and
exported, which quality gates a release must pass, and where it is published (repo id and
semver version). Each section is the settings dataclass of its stage, so a recipe accepts
exactly the keys, types and ranges the command line does:

    [release]     ReleaseSettings (below): name, repo_id, version, description?, license?, base_model?
    [source]      release.source.SourceSettings: model, revision? (Hub ids only)
    [conversion]  ConvertSettings (mla_zoo.modeling.convert_schema), the flags of `mla-zoo convert`
    [finetune]    enabled (default false) + FinetuneSettings (zoo.train.settings), the flags of
                  `mla-zoo finetune`; enabled = true needs a budget, max_steps or tokens
    [eval]        EvalSettings (zoo.evaluate), the flags of `mla-zoo eval`; `suite = true` adds the
                  multi-domain suite (the MLA model against its source), which the suite gates read
    [eval.gates]  GateSettings (gates.py): limits a release must pass, per domain for the suite
    [export]      enabled (default false) + the options of mla_zoo.export's ExportSettings
                  (once this installation has the export stage)

`load_recipe` reports every problem as `recipe NAME: section.key ...` with the valid range or
values; unknown keys are refused, so a typo cannot silently fall back to a default. Relative
paths (`source.model` when it is a local dir or `.gguf` file, every input file, the parts of
`finetune.data`) are resolved against the directory that holds the recipe file, never against
the current directory: the shipped recipes name the repo's texts as `../../data/heldout.txt`.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from mla_zoo.modeling.common import DataError, EvalError, RecipeError, SettingsError, name_fields
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.modeling.schema import Settings, recipe_fields, setting
from mla_zoo.zoo.evaluate import EvalSettings, suite_dir
from mla_zoo.zoo.train.settings import FinetuneSettings

from .gates import GateSettings
from .source import REPO_ID, RecipeSource, SourceSettings, resolve_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10 only
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
SEMVER = (r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
          r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
          r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?")
OPTIONAL_STAGES = ("finetune", "export")
# Keys of the first recipe schema, and what they are now.
RENAMED = {
    "conversion.kv_rank": "kv_lora_rank", "finetune.steps": "max_steps", "finetune.data_file": "data",
    "finetune.dataset": 'data = "hf:NAME[:CONFIG][:SPLIT]"', "finetune.dataset_config": "data",
    "finetune.dataset_split": "data", "finetune.options": "its keys are [finetune] keys now",
}


@dataclass
class ReleaseSettings(Settings):
    name: str = setting(help="the release's display name")
    repo_id: str = setting(pattern=REPO_ID, what='a Hub repo id "ORG/NAME"', help="where it is published")
    version: str = setting(pattern=SEMVER, what='a semver version "MAJOR.MINOR.PATCH" (no "v")',
                           help="semver; the Hub tag is v<version>")
    description: str | None = setting(None, help="one line for the model card")
    license: str | None = setting(None, help="default: the base model's")
    base_model: str | None = setting(None, pattern=REPO_ID, what='a Hub repo id "ORG/NAME"',
                                     help="default: the source's Hub id")

    @property
    def tag(self) -> str:
        return f"v{self.version}"


def semver_key(version: str) -> tuple:
    """Sort key of a semver string (pre-releases sort before their release)."""
    m = re.fullmatch(SEMVER, version)
    if m is None:
        raise RecipeError(f"not a semver version: {version!r}")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return major, minor, patch, 1, ()
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return major, minor, patch, 0, parts


def export_settings_class():
    """mla_zoo.export's ExportSettings, or None where this installation has no export stage."""
    try:
        from mla_zoo.export import ExportSettings
    except ImportError:
        return None
    return ExportSettings


EXPORT_FROM_BUILD = ("checkpoint", "output_dir", "overwrite")  # ExportSettings fields the build sets


@dataclass(frozen=True)
class Recipe:
    name: str  # the file's stem
    path: Path
    text: str  # the TOML as written (shown in the model card)
    raw: dict  # the parsed TOML, paths as written
    release: ReleaseSettings
    source: RecipeSource
    conversion: ConvertSettings
    finetune: FinetuneSettings | None  # None: no [finetune] section
    eval: EvalSettings
    gates: GateSettings
    export: dict  # ExportSettings options (the export stage is not part of every installation)
    enabled: tuple[str, ...]  # the optional stages it enables (finetune, export)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


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
    return parse_recipe(path.read_text(encoding="utf-8"), path)


class _Reader:
    """Turns one recipe's sections into settings objects, with errors in the recipe's own terms."""

    def __init__(self, name: str, base_dir: Path):
        self.name, self.base_dir = name, base_dir

    def error(self, section: str, e: Exception) -> RecipeError:
        return RecipeError(f"recipe {self.name}: " + name_fields(str(e), lambda f: f"{section}.{f}"))

    def table(self, section: str, data: Any) -> dict:
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {self.name}: [{section}] must be a table")
        return dict(data)

    def flag(self, section: str, data: dict, key: str) -> bool:
        value = data.pop(key, False)
        if not isinstance(value, bool):
            raise RecipeError(f"recipe {self.name}: {section}.{key} must be true or false (got {value!r})")
        return value

    def check_keys(self, section: str, data: dict, known: list[str]) -> None:
        unknown = sorted(set(data) - set(known))
        if unknown:
            key = f"{section}.{unknown[0]}"
            hint = f" (renamed: {RENAMED[key]})" if key in RENAMED else ""
            raise RecipeError(f"recipe {self.name}: unknown key {key}{hint} "
                              f"(known keys of [{section}]: {', '.join(sorted(known))})")

    def settings(self, section: str, cls, data: Any, extra: tuple[str, ...] = ()):
        """`cls(**data)` with the recipe's paths resolved and its files checked."""
        data = self.table(section, data)
        allowed = recipe_fields(cls)
        self.check_keys(section, data, [f.name for f in allowed] + list(extra))
        values = {f.name: data[f.name] for f in allowed if f.name in data}
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in values:
                raise RecipeError(f"recipe {self.name}: {section}.{f.name} is required")
            kind, value = f.metadata.get("path"), values.get(f.name)
            if isinstance(value, str) and kind in ("file", "dir", "file-or-dir"):
                values[f.name] = str(resolve_path(value, self.base_dir))
            elif isinstance(value, str) and kind == "data":
                values[f.name] = ",".join(p if p.startswith(("hf:", "teacher:"))  # not files
                                          else str(resolve_path(p, self.base_dir)) for p in value.split(",") if p)
        try:
            settings = cls(**values)
            settings.check_files()
            for f in fields(cls):
                if f.metadata.get("path") == "data":
                    from mla_zoo.zoo.train.data import describe  # (data.py loads torch)

                    describe(getattr(settings, f.name))  # a data spec that names no readable files fails here
        except (SettingsError, DataError) as e:
            raise self.error(section, e) from None
        return settings


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate a recipe's TOML; `path` names it and anchors its relative paths."""
    name = path.stem
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {name}: not valid TOML: {e}") from e
    known = ("release", "source", "conversion", "finetune", "eval", "export")
    for key in raw:
        if key not in known:
            raise RecipeError(f"recipe {name}: unknown section [{key}] (sections: {', '.join(known)})")
    for key in ("release", "source", "eval"):
        if key not in raw:
            raise RecipeError(f"recipe {name}: the [{key}] section is required")
    read = _Reader(name, path.parent)
    enabled = []

    source = read.settings("source", SourceSettings, raw["source"])
    try:
        located = RecipeSource.locate(source, path.parent)
    except SettingsError as e:
        raise read.error("source", e) from None

    finetune = None
    if "finetune" in raw:
        data = read.table("finetune", raw["finetune"])
        if read.flag("finetune", data, "enabled"):
            enabled.append("finetune")
        finetune = read.settings("finetune", FinetuneSettings, data)
        if "finetune" in enabled and finetune.max_steps is None and finetune.tokens is None:
            raise RecipeError(f"recipe {name}: finetune.enabled = true needs a budget: finetune.max_steps or "
                              "finetune.tokens")

    evaluation = read.table("eval", raw["eval"])
    gates = read.settings("eval.gates", GateSettings, evaluation.pop("gates", {}))

    export = read.table("export", raw.get("export", {}))
    if read.flag("export", export, "enabled"):
        enabled.append("export")
    cls = export_settings_class()
    options = [] if cls is None else [f.name for f in fields(cls) if f.name not in EXPORT_FROM_BUILD]
    read.check_keys("export", export, options)

    eval_settings = read.settings("eval", EvalSettings, evaluation)
    if eval_settings.text is None:
        raise RecipeError(f"recipe {name}: eval.text is required (the model card's perplexity)")
    suite_gates = gates.suite_gates()
    if suite_gates and not eval_settings.suite:
        raise RecipeError(f"recipe {name}: eval.gates.{suite_gates[0]} reads the multi-domain suite: set "
                          "eval.suite = true")
    if eval_settings.suite:
        try:
            suite_dir(eval_settings.suite_dir)
        except EvalError as e:
            raise read.error("eval", e) from None

    return Recipe(
        name=name, path=path, text=text, raw=raw,
        release=read.settings("release", ReleaseSettings, raw["release"]),
        source=located,
        conversion=read.settings("conversion", ConvertSettings, raw.get("conversion", {})),
        finetune=finetune,
        eval=eval_settings,
        gates=gates,
        export=export,
        enabled=tuple(enabled),
    )
