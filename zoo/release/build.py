"""`mla-zoo build RECIPE -o RELEASE_DIR`: recipe -> convert -> finetune -> eval -> export -> card.

The stages are a table (`stages.STAGES`): each has a name, its inputs (a function of the build
that returns everything its result depends on, as content hashes) and its run (a function that
writes the stage's files into a work directory and returns its JSON result). This module runs
the table:

* Each stage writes into `RELEASE_DIR/<stage>/` and a record `RELEASE_DIR/stages/<stage>.json`
  (`StageRecord`: the hash of its inputs, the inputs, sha256 + size of every output, its result).
  A stage whose input hash is unchanged and whose outputs are intact is skipped, so a build
  resumes after an interruption, and a recipe edit re-runs only the stages it touches. Inputs
  are content hashes (source weights, texts, upstream outputs, the code that runs the stage),
  never paths or timestamps, so a moved checkout or a touched file changes nothing.
* Optional stages (finetune, export) run only when the recipe enables them; a resumable stage
  (finetune) keeps an interrupted run's work directory for the next build with the same inputs.
* After eval the recipe's gates are checked (always, also when eval itself was skipped, so a
  tightened gate takes effect without re-measuring); a failed gate stops the build and removes
  any previous release.
* When every stage is up to date, the release is assembled in `RELEASE_DIR/hub/` (exactly the
  files of the Hub repo) and described by release.json (`ReleaseManifest`), written both at
  `RELEASE_DIR/release.json` and inside `hub/`.
* Under `accelerate launch` / `torchrun` (several processes, e.g. `--stages finetune` on several
  GPUs) every process runs the selected stages' work in the same work directory, but only the main
  process (RANK 0) keeps the records, moves directories and assembles the release.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from mla_zoo.modeling.common import (
    BuildError,
    GateFailed,
    MlaZooError,
    StageUnavailable,
    changed_files,
    check_output_dir,
    hash_json,
    hash_tree,
    is_main_process,
    name_fields,
    replace_directory,
    write_text_atomic,
)
from mla_zoo.modeling.convert_schema import ConversionReport
from mla_zoo.zoo.evaluate import EvalComparison

from .gates import GateResult, check_gates
from .manifest import FileHash, RecipeCopy, ReleaseManifest, StageRecord, StageStamp
from .recipe import Recipe
from .stages import STAGES, Pending, Stage


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("mla-zoo", "torch", "transformers", "huggingface_hub", "safetensors", "onnx", "onnxruntime"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def recipe_inputs(recipe: Recipe) -> dict:
    """The files and directories a build reads ({recipe key: path or paths}), which its output must not hold."""
    from mla_zoo.zoo.train.data import split_spec

    inputs = {"recipe": recipe.path, "source.model": recipe.source.path,
              "conversion.calib_text": recipe.conversion.calib_text, "eval.text": recipe.eval.text}
    if recipe.finetune is not None:
        inputs["finetune.data"] = split_spec(recipe.finetune.data)
        inputs["finetune.eval_text"] = recipe.finetune.eval_text
    return inputs


@dataclass
class Build:
    """One run of the stage table over a recipe into `out`."""

    recipe: Recipe
    out: Path
    force: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))
    fresh: dict[str, StageRecord | None] = field(default_factory=dict)  # up-to-date stages (None: disabled)
    gates: list[GateResult] = field(default_factory=list)

    # paths and records

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def record_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def load_record(self, stage: str) -> StageRecord | None:
        try:
            return StageRecord.read(self.record_path(stage))
        except (FileNotFoundError, ValueError):  # none yet, or unreadable: the stage runs again
            return None

    def intact(self, record: StageRecord) -> bool:
        return not changed_files(self.stage_dir(record.stage), {k: asdict(v) for k, v in record.outputs.items()})

    def record(self, stage: str) -> StageRecord | None:
        """The up-to-date record of an upstream stage (None: disabled); Pending when it is not built."""
        if stage not in self.fresh:
            raise Pending(stage)
        return self.fresh[stage]

    def digest(self, stage: str) -> str | None:
        """What downstream stages see of a stage's outputs: their content, less wall-clock timings."""
        record = self.record(stage)
        if record is None:
            return None
        outputs = {k: asdict(v) for k, v in record.outputs.items()}
        if ConversionReport.FILE in outputs:  # its "seconds" differs on every run of the same conversion
            report = ConversionReport.read(self.stage_dir(stage))
            report.seconds = 0.0
            outputs[ConversionReport.FILE] = hash_json(report.to_dict())
        return hash_json(outputs)

    def model_stage(self) -> str:
        """The stage whose checkpoint is released: finetune when the recipe enables it."""
        return "finetune" if "finetune" in self.recipe.enabled else "convert"

    def model_dir(self) -> Path:
        self.record(self.model_stage())
        return self.stage_dir(self.model_stage())

    def conversion(self) -> ConversionReport:
        self.record("convert")
        return ConversionReport.read(self.stage_dir("convert"))

    @cached_property
    def source_identity(self) -> dict:
        return self.recipe.source.identity(self.log)

    @cached_property
    def source_path(self) -> str:
        """The source as `sources.resolve` loads it (a Hub source downloaded at the commit of its identity)."""
        return self.recipe.source.local(self.source_identity.get("commit"))

    # running

    def run(self, stages: list[str] | None = None) -> dict:
        names = [s.name for s in STAGES]
        selected = list(names) if not stages else list(stages)
        unknown = [s for s in selected if s not in names]
        if unknown:
            raise BuildError(f"unknown stage {unknown[0]!r}; stages: {', '.join(names)}")
        for stage in STAGES:
            if stage.name in self.recipe.enabled and not stage.available():
                raise StageUnavailable(
                    f"recipe {self.recipe.name}: {stage.name}.enabled = true, but the {stage.name} stage is not "
                    f"available in this installation of mla-zoo; set {stage.name}.enabled = false in the recipe to "
                    "release without it")
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        status: dict[str, str] = {}
        for stage in STAGES:
            status[stage.name] = self._advance(stage, stage.name in selected)
        release = None
        if not is_main_process():
            pass  # the main process assembles
        elif all(s in self.fresh for s in names):
            release = self.assemble()
        else:
            pending = [s for s in names if s not in self.fresh]
            self.log(f"release not assembled: stage(s) {', '.join(pending)} not built or out of date")
        return {"stages": status, "gates": [asdict(g) for g in self.gates], "release": release and release.to_dict(),
                "out": str(self.out)}

    def _advance(self, stage: Stage, selected: bool) -> str:
        """Bring one stage up to date if it is selected and stale; its status."""
        if stage.optional and stage.name not in self.recipe.enabled:
            self._disable(stage.name)
            return "disabled"
        try:
            inputs = stage.inputs(self)
        except Pending as e:
            if selected:
                raise BuildError(f"stage {stage.name} needs an up-to-date {e.args[0]} stage; build it first "
                                 f"(`stages` {e.args[0]} {stage.name}) or run all stages") from None
            return "pending"
        key = hash_json(inputs)
        record = self.load_record(stage.name)
        fresh = record is not None and record.input_hash == key and self.intact(record)
        if selected and (self.force or not fresh):
            self._invalidate_release()
            record, status = self._run_stage(stage, inputs, key), "ran"
        elif fresh:
            self.log(f"{stage.name}: up to date (inputs unchanged), skipped")
            status = "up to date"
        else:
            return "pending"
        self.fresh[stage.name] = record
        if stage.check is not None:
            stage.check(self, record.result)
        return status

    def _disable(self, stage: str) -> None:
        if self.record_path(stage).exists() or self.stage_dir(stage).exists():
            self._invalidate_release()
            self.record_path(stage).unlink(missing_ok=True)
            shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        self.fresh[stage] = None

    def _invalidate_release(self) -> None:
        (self.out / ReleaseManifest.FILE).unlink(missing_ok=True)
        shutil.rmtree(self.out / "hub", ignore_errors=True)

    def _run_stage(self, stage: Stage, inputs: dict, key: str) -> StageRecord:
        self.log(f"{stage.name}: running")
        started = time.time()
        work = self.out / f".{stage.name}.{key[:16]}.tmp"
        if not is_main_process():  # a worker of a multi-process stage: the work only, the main process records it
            work.mkdir(parents=True, exist_ok=True)
            stage.run(self, work)
            return StageRecord(stage=stage.name, input_hash=key, inputs=inputs, outputs={}, result={}, seconds=0.0,
                               finished_at="")
        for stale in self.out.glob(f".{stage.name}.*.tmp"):
            if stale != work or not stage.resumable:
                shutil.rmtree(stale, ignore_errors=True)
        work.mkdir(exist_ok=True)
        try:
            result = stage.run(self, work)
        except MlaZooError as e:
            if not stage.resumable:
                shutil.rmtree(work, ignore_errors=True)
            if isinstance(e, BuildError):
                raise
            raise BuildError(f"recipe {self.recipe.name}, stage {stage.name}: "
                             + name_fields(str(e), lambda f: f"{stage.section}.{f}")) from e
        except BaseException:
            if not stage.resumable:
                shutil.rmtree(work, ignore_errors=True)
            raise
        self.record_path(stage.name).unlink(missing_ok=True)  # no record ever describes a half-replaced dir
        replace_directory(work, self.stage_dir(stage.name))
        outputs = hash_tree(self.stage_dir(stage.name), top_level=stage.top_level_outputs)
        record = StageRecord(
            stage=stage.name, input_hash=key, inputs=inputs, outputs={k: FileHash(**v) for k, v in outputs.items()},
            result=result, seconds=round(time.time() - started, 2),
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_text_atomic(self.record_path(stage.name), record.to_json())
        self.log(f"{stage.name}: done in {record.seconds:.1f} s")
        return record

    def check_gates(self, metrics: dict) -> None:
        """The recipe's gates on the eval stage's result; GateFailed (and no release) when one fails."""
        self.gates = check_gates(self.recipe.gates, EvalComparison.from_dict(metrics), self.conversion().kv_cache)
        for gate in self.gates:
            self.log(f"gate {gate.gate}: {'passed' if gate.passed else 'FAILED'}: {gate.text}")
        failed = [g for g in self.gates if not g.passed]
        if failed:
            self._invalidate_release()
            raise GateFailed(f"recipe {self.recipe.name}: gate eval.gates.{failed[0].gate} failed: "
                             f"{failed[0].text}; the release was stopped", [asdict(g) for g in self.gates])

    # the release

    def assemble(self) -> ReleaseManifest:
        """Lay out `hub/` exactly as the Hub repo will be and describe it in release.json."""
        placed = {}  # path in repo -> path here
        model = self.model_dir()
        for rel in self.record(self.model_stage()).outputs:
            placed[rel] = model / rel
        for rel in self.record("card").outputs:
            placed[rel] = self.stage_dir("card") / rel
        if self.record("export") is not None:
            for rel in self.record("export").outputs:
                placed[f"onnx/{rel}"] = self.stage_dir("export") / rel
        placed[EvalComparison.FILE] = self.stage_dir("eval") / EvalComparison.FILE
        tmp = self.out / ".hub.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, src in placed.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)  # the weights can be large: no copy where a link will do
            except OSError:
                shutil.copy2(src, dst)
        convert = self.record("convert").result
        conversion, r = self.conversion(), self.recipe
        release = ReleaseManifest(
            name=r.release.name, repo_id=r.release.repo_id, version=r.release.version, tag=r.release.tag,
            description=r.release.description, license=convert["license"], base_model=convert["base_model"],
            recipe=RecipeCopy(r.name, r.path.name, r.sha256, r.text, r.raw),
            versions=versions(),
            stages={s.name: None if self.fresh[s.name] is None else
                    StageStamp(self.fresh[s.name].input_hash, self.fresh[s.name].seconds) for s in STAGES},
            kv_cache=conversion.kv_cache, settings=conversion.settings,
            metrics=EvalComparison.from_dict(self.record("eval").result), gates=self.gates,
            files={k: FileHash(**v) for k, v in hash_tree(tmp).items()},
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        release.write(tmp)
        replace_directory(tmp, self.out / "hub")
        release.write(self.out)
        self.log(f"release {r.release.repo_id} {r.release.tag}: {len(release.files)} files in {self.out / 'hub'}")
        return release


def build(recipe: Recipe, out: str | Path, stages: list[str] | None = None, *, force: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run the stages of a recipe into `out`; returns {stages: status per stage, gates, release, out}.
    `out` is new, empty or a release directory (`stages/`): a build resumes there, and never writes
    into a directory it did not make, or one that holds the recipe or its inputs."""
    check_output_dir(out, marker=("stages", ReleaseManifest.FILE), overwrite=True, inputs=recipe_inputs(recipe))
    kwargs = {} if log is None else {"log": log}
    return Build(recipe, Path(out).resolve(), force=force, progress=progress, **kwargs).run(stages)
