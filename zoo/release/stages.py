"""The stages of `mla-zoo build`, in order: for each, what its result depends on and how it runs.

`inputs(build)` returns JSON of everything the stage's result depends on, as content hashes (the
build hashes it to decide whether the stage is up to date); `run(build, work)` writes the stage's
files into the empty (or, for a resumable stage, interrupted) directory `work` and returns its
JSON result, kept in the stage's record. See `build.py` for how the table is run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mla_zoo.modeling.common import BuildError, hash_json, hash_tree, sha256_file, synth_shards
from mla_zoo.modeling.convert_schema import ConversionReport

if TYPE_CHECKING:
    from .build import Build


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # the recipe section its settings come from (its error messages name its keys)
    inputs: Callable[[Build], dict]  # everything its result depends on (raises Pending if upstream is not built)
    run: Callable[[Build, Path], dict]  # writes its files into the work dir, returns its JSON result
    optional: bool = False  # runs only when the recipe enables it
    available: Callable[[], bool] = lambda: True  # whether this installation can run it
    resumable: bool = False  # an interrupted run's work dir is kept for the next build to resume
    top_level_outputs: bool = False  # only the files at the top of its dir are outputs (not trainer state)
    check: Callable[[Build, dict], None] | None = None  # after it is up to date (the gates after eval)


class Pending(Exception):
    """An upstream stage is not built or not up to date."""


def code_hash(*modules: str) -> str:
    """Hash of the source files of modules (a package counts with all its .py files, subpackages too)."""
    files = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        found = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        files.update({f"{name}:{f.relative_to(origin.parent).as_posix()}": sha256_file(f) for f in found})
    return hash_json(files)


def file_identity(path: str | Path | None) -> dict | None:
    return None if path is None else {"file": Path(path).name, "sha256": sha256_file(path)}


def settings_inputs(settings) -> dict:
    """A settings object as hash input: input files by content (paths differ between machines)."""
    values = asdict(settings)
    for name, value in values.items():
        kind = settings.__dataclass_fields__[name].metadata.get("path")
        if kind in ("file", "file-or-dir") and value is not None and Path(value).is_file():
            values[name] = file_identity(value)
        elif kind == "file-or-dir" and value is not None:  # a synth-data directory: its shards
            values[name] = [file_identity(f) for f in synth_shards(value)]
        elif kind == "data":
            from mla_zoo.zoo.train.data import resolve_files, split_spec

            values[name] = [part if part.startswith(("hf:", "teacher:"))  # named, not files
                            else [file_identity(f) for f in resolve_files(part)] for part in split_spec(value)]
    return values


# ----------------------------------------------------------------------------- convert


def convert_inputs(b: Build) -> dict:
    return {"source": b.source_identity, "conversion": settings_inputs(b.recipe.conversion),
            "code": code_hash("mla_zoo.modeling")}


def convert_run(b: Build, work: Path) -> dict:
    import torch
    from mla_zoo.modeling import convert, sources

    r, s = b.recipe, b.recipe.source
    model, tokenizer, info = sources.resolve(b.source_path, dtype=torch.float32)
    if s.kind == "hub":
        info.name = info.base_model = s.model
    elif s.kind in ("local", "gguf"):
        info.name = s.model
    base_model = r.release.base_model or info.base_model
    license = r.release.license or info.license or s.license(b.source_identity.get("commit"))
    if license is None:
        raise BuildError(f"recipe {r.name}: cannot tell the license of {s.model} (no license in its model card); "
                         "set release.license in the recipe")
    convert.resolve_settings(r.conversion, model.config)  # range errors before any calibration work
    mla, report = convert.convert_model(model, tokenizer, info, r.conversion, progress=b.progress)
    # Paths as written in the recipe: a published conversion.json carries no local directories.
    report.source.spec, report.source.path = s.model, s.published_path()
    report.source.revision, report.source.commit = s.revision, b.source_identity.get("commit")
    if r.conversion.calib_text is not None:
        report.settings.calib_text = r.raw["conversion"]["calib_text"]
        if report.calibration is not None:  # the data's name, not a path of the build machine
            report.calibration.file = Path(r.conversion.calib_text).name
    convert.save_checkpoint(mla, tokenizer, report, work, overwrite=True)
    return {"license": license, "base_model": base_model}


# ----------------------------------------------------------------------------- finetune


def finetune_inputs(b: Build) -> dict:
    return {"model": b.digest("convert"), "finetune": settings_inputs(b.recipe.finetune),
            "code": code_hash("mla_zoo.zoo.train")}


def finetune_run(b: Build, work: Path) -> dict:
    """The checkpoint lands at the top level of `work` (published); the trainer's state stays below it."""
    from mla_zoo.zoo.train.finetune import run_finetune

    resume = (work / "run.json").is_file()  # an interrupted build with the same inputs left it
    report = run_finetune(b.stage_dir("convert"), work, b.source_path, b.recipe.finetune, resume=resume,
                          overwrite=not resume, progress=b.progress)
    return report.summary()


# ----------------------------------------------------------------------------- eval


def eval_inputs(b: Build) -> dict:
    from mla_zoo.zoo.evaluate import suite_dir

    suite = b.recipe.eval.suite and hash_json(hash_tree(suite_dir(b.recipe.eval.suite_dir)))  # by content
    return {"source": b.source_identity, "model": b.digest(b.model_stage()),
            "eval": {**settings_inputs(b.recipe.eval), "suite_dir": suite}, "code": code_hash("mla_zoo.zoo.evaluate")}


def eval_run(b: Build, work: Path) -> dict:
    from mla_zoo.zoo.evaluate.evaluation import compare

    metrics = compare(b.source_path, b.model_dir(), b.recipe.eval, b.recipe.raw["eval"]["text"], b.log)
    metrics.write(work)
    return metrics.to_dict()


# ----------------------------------------------------------------------------- export


def export_available() -> bool:
    """Whether this installation has the export stage (mla_zoo.export's ExportSettings and run_export)."""
    try:
        from mla_zoo.export import ExportSettings, run_export  # noqa: F401
    except ImportError:
        return False
    return True


def export_inputs(b: Build) -> dict:
    return {"model": b.digest(b.model_stage()), "export": b.recipe.export, "code": code_hash("mla_zoo.export")}


def export_run(b: Build, work: Path) -> dict:
    """The files published under `onnx/`. The result may name `onnx_model` (the model file) and
    `kernel_library` (a Python expression for the onnxruntime custom-op library) for the card."""
    from mla_zoo.export import ExportSettings, run_export

    report = run_export(ExportSettings(checkpoint=str(b.model_dir()), output_dir=str(work), overwrite=True,
                                       **b.recipe.export))
    if not any(work.iterdir()):
        raise BuildError("the export stage wrote no files")
    return asdict(report)


# ----------------------------------------------------------------------------- card


def card_inputs(b: Build) -> dict:
    from . import card

    ft, ex = b.record("finetune"), b.record("export")
    return {
        "recipe": b.recipe.sha256, "release": asdict(b.recipe.release), "convert": b.digest("convert"),
        "finetune": ft and [b.digest("finetune"), ft.result], "eval": b.record("eval").result,
        "gates": [asdict(g) for g in b.gates], "export": ex and [b.digest("export"), ex.result],
        "code": code_hash("mla_zoo.zoo.release.card"), "transformers": card.tested_transformers(),
    }


def card_run(b: Build, work: Path) -> dict:
    import json

    from mla_zoo.zoo.evaluate import EvalComparison

    from . import card

    model, convert = b.model_dir(), b.record("convert").result
    ft, ex = b.record("finetune"), b.record("export")
    config = json.loads((model / "config.json").read_text())
    return card.write_card(
        work, recipe=b.recipe, conversion=ConversionReport.read(model),
        max_positions=config.get("max_position_embeddings") or 4096,
        license=convert["license"], base_model=convert["base_model"],
        metrics=EvalComparison.from_dict(b.record("eval").result), gates=b.gates,
        finetune=ft and ft.result, export=ex and {**ex.result, "files": sorted(ex.outputs)},
    )


STAGES = (
    Stage("convert", "conversion", convert_inputs, convert_run),
    Stage("finetune", "finetune", finetune_inputs, finetune_run, optional=True, resumable=True,
          top_level_outputs=True),
    Stage("eval", "eval", eval_inputs, eval_run, check=lambda b, result: b.check_gates(result)),
    Stage("export", "export", export_inputs, export_run, optional=True, available=export_available),
    Stage("card", "release", card_inputs, card_run),
)
