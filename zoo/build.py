"""`mla-zoo build RECIPE -o RELEASE_DIR`: recipe -> convert -> finetune -> eval -> export -> card.

Each stage writes its outputs into `RELEASE_DIR/<stage>/` and a record `RELEASE_DIR/stages/<stage>.json`
(hash of its inputs, the inputs themselves, sha256 + size of every output, its result). A stage
whose input hash is unchanged and whose outputs are intact is skipped, so a build can be resumed
after an interruption or re-run after a recipe edit at the cost of the stages the edit touches.
Inputs are content hashes (source weights, texts, the upstream stage's outputs, the code that
runs the stage), never paths or timestamps, so a moved checkout or a touched file changes nothing.

After `eval` the recipe's gates are checked (always, also when eval itself was skipped, so a
tightened gate takes effect without re-measuring); a failed gate stops the build and removes any
previous `release.json` and `hub/`. When every stage is up to date the release is assembled in
`RELEASE_DIR/hub/` (exactly the files of the Hub repo: weights, remote code, tokenizer,
conversion.json, eval_results.json, README.md card + plot, onnx/) and described by
`release.json` (recipe, versions, sha256 of every file, metrics, gate results), written both at
`RELEASE_DIR/release.json` and inside `hub/`.

Fine-tuning and export are optional stages (`enabled = false` by default). When a recipe enables
one, its module must provide the hook

    mla_zoo.zoo.finetune.run_recipe_stage(model_dir, out_dir, spec, recipe=recipe, teacher=source) -> dict
    mla_zoo.export.run_recipe_stage(model_dir, out_dir, spec, recipe=recipe) -> dict

`model_dir` is the checkpoint to start from (read-only), `spec` the recipe's `FinetuneSpec` /
`ExportSpec`, `teacher` the original model as a SOURCE for `sources.resolve` (a bundled name or a
local path), the return value a JSON-able result kept in the stage record. `out_dir` exists; it is
empty, or holds what an interrupted run with the same inputs left there (resume from it, or clear
it). The finetune hook writes a complete checkpoint (weights, config, remote code, tokenizer) at
the top level of `out_dir`: those top-level files are the stage's outputs and are published;
subdirectories (trainer checkpoints) stay in RELEASE_DIR only. The export hook writes the files
published under `onnx/` and may return `onnx_model` (file name of the model in `out_dir`) and
`kernel_library` (a Python expression that evaluates to the path of the onnxruntime custom-op
library) for the model card's usage snippet.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from mla_zoo.modeling.common import BuildError, GateFailed, StageUnavailable

from .recipe import GateSpec, Recipe

STAGES = ("convert", "finetune", "eval", "export", "card")
HOOKS = {"finetune": "mla_zoo.zoo.finetune", "export": "mla_zoo.export"}
FORMAT = 1


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: str | Path, top_level: bool = False) -> dict[str, dict]:
    """{relative posix path: {sha256, size}} of every file under root, or only in it (sorted)."""
    root = Path(root)
    found = {}
    for path in sorted(root.iterdir() if top_level else root.rglob("*")):
        if path.is_file():
            found[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return found


def hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def code_hash(*modules: str) -> str:
    """Hash of the source files of modules (a package counts with all its .py files)."""
    files = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        files += sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
    return hash_json({f.name: sha256_file(f) for f in files})


def file_identity(path: Path | None) -> dict | None:
    return None if path is None else {"file": path.name, "sha256": sha256_file(path)}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for dist in ("mla-zoo", "torch", "transformers", "huggingface_hub", "safetensors", "onnx", "onnxruntime"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


# ----------------------------------------------------------------------------- gates


def check_gates(gates: GateSpec, metrics: dict, kv_cache: dict) -> list[dict]:
    """One row per configured gate: name, value, limit, passed."""
    base, mla = metrics["base"]["perplexity"], metrics["mla"]["perplexity"]
    rows = []
    if gates.max_perplexity_increase is not None:
        value = mla / base - 1
        limit = gates.max_perplexity_increase
        rows.append({"gate": "max_perplexity_increase", "value": value, "limit": limit, "passed": value <= limit,
                     "text": f"perplexity increase {100 * value:+.2f}% (limit +{100 * limit:.2f}%)"})
    if gates.max_perplexity is not None:
        rows.append({"gate": "max_perplexity", "value": mla, "limit": gates.max_perplexity,
                     "passed": mla <= gates.max_perplexity,
                     "text": f"MLA perplexity {mla:.3f} (limit {gates.max_perplexity:g})"})
    if gates.min_kv_reduction is not None:
        value = kv_cache["reduction"]
        rows.append({"gate": "min_kv_reduction", "value": value, "limit": gates.min_kv_reduction,
                     "passed": value >= gates.min_kv_reduction,
                     "text": f"KV-cache reduction {100 * value:.2f}% (minimum {100 * gates.min_kv_reduction:.2f}%)"})
    return rows


# ----------------------------------------------------------------------------- hooks


def stage_hook(stage: str) -> Callable | None:
    """The `run_recipe_stage` hook of an optional stage, or None when this version has none."""
    name = HOOKS[stage]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise StageUnavailable(f"the {stage} stage needs the package {e.name!r}, which is not installed "
                               f"(pip install 'mla-zoo[{'onnx' if stage == 'export' else 'train'}]')") from e
    return getattr(module, "run_recipe_stage", None)


# ----------------------------------------------------------------------------- the build


class _Pending(Exception):
    """An upstream stage is not built or not up to date."""


class Builder:
    def __init__(self, recipe: Recipe, out: str | Path, *, force: bool = False, progress: bool = True,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
        self.recipe = recipe
        self.out = Path(out).resolve()
        self.force = force
        self.progress = progress
        self.log = log
        self.fresh: dict[str, dict | None] = {}  # up-to-date stages of this run -> record (None: disabled)
        self.gates: list[dict] | None = None
        self._source_identity: dict | None = None
        self._source_path: str | None = None

    # paths and records

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def record_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def load_record(self, stage: str) -> dict | None:
        path = self.record_path(stage)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def intact(self, record: dict) -> bool:
        root = self.stage_dir(record["stage"])
        for rel, meta in record["outputs"].items():
            path = root / rel
            if not path.is_file() or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                return False
        return True

    def record(self, stage: str) -> dict:
        if stage not in self.fresh:
            raise _Pending(stage)
        return self.fresh[stage]

    def digest(self, stage: str) -> str | None:
        """What downstream stages see of a stage's outputs: their content, less wall-clock timings."""
        record = self.record(stage)
        if record is None:
            return None
        outputs = dict(record["outputs"])
        if "conversion.json" in outputs:  # its "seconds" differs on every run of the same conversion
            report = json.loads((self.stage_dir(stage) / "conversion.json").read_text())
            report.pop("seconds", None)
            outputs["conversion.json"] = hash_json(report)
        return hash_json(outputs)

    def enabled(self, stage: str) -> bool:
        return stage not in HOOKS or getattr(self.recipe, stage).enabled

    def model_stage(self) -> str:
        return "finetune" if self.recipe.finetune.enabled else "convert"

    def model_dir(self) -> Path:
        self.record(self.model_stage())
        return self.stage_dir(self.model_stage())

    # the source

    def source_identity(self) -> dict:
        """What identifies the source's content, for the convert and eval input hashes."""
        if self._source_identity is None:
            from mla_zoo.modeling import sources

            s = self.recipe.source
            if s.kind == "bundled":
                ident = {"bundled": s.model, "sha256": sha256_file(sources.bundled_gguf(s.model))}
            elif s.kind == "gguf":
                ident = {"gguf": s.path.name, "sha256": sha256_file(s.path)}
            elif s.kind == "local":
                ident = {"local": hash_json(hash_tree(s.path))}
            else:
                ident = {"hub": s.model, "revision": s.revision, "commit": self._hub_commit()}
            self._source_identity = ident
        return self._source_identity

    def _hub_commit(self) -> str | None:
        """The commit a Hub source's revision points at now (None when the Hub cannot be asked)."""
        from huggingface_hub import HfApi

        s = self.recipe.source
        try:
            return HfApi().model_info(s.model, revision=s.revision).sha
        except Exception as e:  # offline: the revision string (and the local cache) is all there is
            self.log(f"note: could not resolve {s.model}@{s.revision or 'main'} on the Hub ({type(e).__name__}); "
                     "hashing the revision name instead")
            return None

    def source_path(self) -> str:
        """What `sources.resolve` / `evaluate` get: a bundled name or a local path."""
        if self._source_path is None:
            s = self.recipe.source
            if s.kind == "bundled":
                self._source_path = s.model
            elif s.kind in ("gguf", "local"):
                self._source_path = str(s.path)
            else:
                from mla_zoo.modeling.sources import download_hub_source

                revision = self.source_identity().get("commit") or s.revision
                try:
                    self._source_path = str(download_hub_source(s.model, revision))
                except Exception as e:
                    raise BuildError(f"cannot download the source {s.model}@{revision or 'main'}: {e}") from e
        return self._source_path

    # stage inputs

    def inputs(self, stage: str) -> dict:
        r = self.recipe
        if stage == "convert":
            conversion = r.section("conversion")
            conversion["calib_text"] = file_identity(r.conversion.calib_text)
            return {"source": self.source_identity(), "conversion": conversion,
                    "code": code_hash("mla_zoo.modeling")}
        if stage == "finetune":
            spec = r.section("finetune")
            spec["data_file"] = file_identity(r.finetune.data_file)
            return {"model": self.digest("convert"), "finetune": spec, "code": code_hash(HOOKS["finetune"])}
        if stage == "eval":
            spec = r.section("eval")
            spec.pop("gates")  # checked on every build; changing a gate never re-measures
            spec["text"] = file_identity(r.eval.text)
            return {"source": self.source_identity(), "model": self.digest(self.model_stage()), "eval": spec,
                    "code": code_hash("mla_zoo.zoo.evaluate")}
        if stage == "export":
            return {"model": self.digest(self.model_stage()), "export": r.section("export"),
                    "code": code_hash(HOOKS["export"])}
        if stage == "card":
            ft, ex = self.record("finetune"), self.record("export")
            return {
                "recipe": r.sha256, "release": r.section("release"), "convert": self.digest("convert"),
                "finetune": ft and [self.digest("finetune"), ft["result"]],
                "eval": self.record("eval")["result"], "gates": self.gates,
                "export": ex and [self.digest("export"), ex["result"]],
                "code": code_hash("mla_zoo.zoo.card"),
            }
        raise ValueError(stage)

    # running

    def run(self, stages: list[str] | None = None) -> dict:
        selected = list(STAGES) if not stages else list(stages)
        unknown = [s for s in selected if s not in STAGES]
        if unknown:
            raise BuildError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
        for stage in HOOKS:
            if self.enabled(stage) and stage_hook(stage) is None:
                raise StageUnavailable(
                    f"recipe {self.recipe.name}: {stage}.enabled = true, but the {stage} stage is not available "
                    f"in this version of mla-zoo ({HOOKS[stage]}.run_recipe_stage is missing); set "
                    f"{stage}.enabled = false in the recipe to release without it")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "stages").mkdir(exist_ok=True)
        status: dict[str, str] = {}
        for stage in STAGES:
            if not self.enabled(stage):
                self._disable(stage)
                status[stage] = "disabled"
                continue
            try:
                inputs = self.inputs(stage)
            except _Pending as e:
                if stage in selected:
                    raise BuildError(f"stage {stage} needs an up-to-date {e.args[0]} stage; build it first "
                                     f"(--stages {e.args[0]} {stage}) or run all stages") from None
                status[stage] = "pending"
                continue
            key = hash_json(inputs)
            record = self.load_record(stage)
            fresh = record is not None and record.get("input_hash") == key and self.intact(record)
            if stage in selected and (self.force or not fresh):
                self._invalidate_release()
                record = self._run_stage(stage, inputs, key)
                status[stage] = "ran"
            elif fresh:
                self.log(f"{stage}: up to date (inputs unchanged), skipped")
                status[stage] = "up to date"
            else:
                status[stage] = "pending"
                continue
            self.fresh[stage] = record
            if stage == "eval":
                self._check_gates(record["result"])
        release = None
        if all(s in self.fresh for s in STAGES):
            release = self.assemble()
        else:
            pending = [s for s in STAGES if s not in self.fresh]
            self.log(f"release not assembled: stage(s) {', '.join(pending)} not built or out of date")
        return {"stages": status, "gates": self.gates, "release": release, "out": str(self.out)}

    def _disable(self, stage: str) -> None:
        if self.record_path(stage).exists() or self.stage_dir(stage).exists():
            self._invalidate_release()
            self.record_path(stage).unlink(missing_ok=True)
            shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        self.fresh[stage] = None

    def _invalidate_release(self) -> None:
        (self.out / "release.json").unlink(missing_ok=True)
        shutil.rmtree(self.out / "hub", ignore_errors=True)

    def _run_stage(self, stage: str, inputs: dict, key: str) -> dict:
        self.log(f"{stage}: running")
        started = time.time()
        # A hook stage (hours of fine-tuning) keeps an interrupted run's directory for the next
        # build with the same inputs to resume from; the other stages start afresh.
        work = self.out / f".{stage}.{key[:16]}.tmp"
        for stale in self.out.glob(f".{stage}.*.tmp"):
            if stale != work or stage not in HOOKS:
                shutil.rmtree(stale, ignore_errors=True)
        if stage != "convert":  # save_checkpoint creates its directory itself
            work.mkdir(exist_ok=True)
        try:
            result = getattr(self, f"stage_{stage}")(work)
        except BaseException:
            if stage not in HOOKS:
                shutil.rmtree(work, ignore_errors=True)
            raise
        self.record_path(stage).unlink(missing_ok=True)  # no record ever describes a half-replaced dir
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        os.replace(work, self.stage_dir(stage))
        outputs = hash_tree(self.stage_dir(stage), top_level=stage == "finetune")
        record = {
            "stage": stage, "input_hash": key, "inputs": inputs, "outputs": outputs,
            "result": result, "seconds": round(time.time() - started, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = self.record_path(stage).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.record_path(stage))
        self.log(f"{stage}: done in {record['seconds']:.1f} s")
        return record

    def _check_gates(self, metrics: dict) -> None:
        kv = json.loads((self.stage_dir("convert") / "conversion.json").read_text())["kv_cache"]
        self.gates = check_gates(self.recipe.eval.gates, metrics, kv)
        for gate in self.gates:
            self.log(f"gate {gate['gate']}: {'passed' if gate['passed'] else 'FAILED'}: {gate['text']}")
        failed = [g for g in self.gates if not g["passed"]]
        if failed:
            self._invalidate_release()
            raise GateFailed(f"recipe {self.recipe.name}: gate eval.gates.{failed[0]['gate']} failed: "
                             f"{failed[0]['text']}; the release was stopped", self.gates)

    # the stages

    def stage_convert(self, work: Path) -> dict:
        import torch
        from mla_zoo.modeling import convert, sources

        r, s = self.recipe, self.recipe.source
        model, tokenizer, info = sources.resolve(self.source_path(), dtype=torch.float32)
        if s.kind == "hub":
            info.name = info.base_model = s.model
        elif s.kind in ("local", "gguf"):
            info.name = s.model
        base_model = r.release.base_model or info.base_model
        license = r.release.license or info.license or self._source_license()
        if license is None:
            raise BuildError(f"recipe {r.name}: cannot tell the license of {s.model} (no license in its model card); "
                             "set release.license in the recipe")
        settings = r.conversion.settings()
        convert.resolve_settings(settings, model.config)  # range errors before any calibration work
        mla, report = convert.convert_model(model, tokenizer, info, settings, progress=self.progress)
        # Paths as written in the recipe: a published conversion.json carries no local directories.
        report.source.spec = s.model
        report.source.path = s.model if s.kind != "hub" else f"{s.model}@{s.revision or 'main'}"
        report.source.revision = s.revision
        report.source.commit = self.source_identity().get("commit")
        if r.conversion.calib_text is not None:
            report.settings.calib_text = r.raw["conversion"]["calib_text"]
            if report.calibration is not None:
                report.calibration.file = r.raw["conversion"]["calib_text"]
        convert.save_checkpoint(mla, tokenizer, report, work, overwrite=True)
        return {"license": license, "base_model": base_model, "kv_cache": asdict(report.kv_cache),
                "settings": asdict(report.settings), "warnings": report.warnings}

    def _source_license(self) -> str | None:
        """The license in the source's model card (Hub metadata, or a local dir's README.md)."""
        s = self.recipe.source
        if s.kind == "hub":
            from huggingface_hub import HfApi

            try:
                revision = self.source_identity().get("commit") or s.revision
                card = HfApi().model_info(s.model, revision=revision).card_data
            except Exception:
                return None
            return card.license if card is not None else None
        if s.kind == "local" and (s.path / "README.md").is_file():
            from huggingface_hub import ModelCard

            try:
                return ModelCard.load(s.path / "README.md").data.license
            except Exception:
                return None
        return None

    def stage_finetune(self, work: Path) -> dict:
        hook = stage_hook("finetune")
        result = hook(self.stage_dir("convert"), work, self.recipe.finetune, recipe=self.recipe,
                      teacher=self.source_path()) or {}
        if not (work / "config.json").is_file():
            raise BuildError("the finetune stage wrote no checkpoint (config.json missing)")
        if not (work / "conversion.json").exists():
            shutil.copyfile(self.stage_dir("convert") / "conversion.json", work / "conversion.json")
        return result

    def stage_eval(self, work: Path) -> dict:
        import torch
        from mla_zoo.zoo.evaluate import evaluate

        e, raw = self.recipe.eval, self.recipe.raw["eval"]
        dtype = getattr(torch, e.dtype)
        results = {}
        for label, spec in (("base", self.source_path()), ("mla", str(self.model_dir()))):
            self.log(f"eval: perplexity of the {label} model on {raw['text']}")
            result = evaluate(spec, str(e.text), e.seq_len, e.max_tokens, dtype)
            results[label] = {**result, "model": label, "text": raw["text"]}
        metrics = {
            "text": raw["text"], "seq_len": e.seq_len, "max_tokens": e.max_tokens, "dtype": e.dtype,
            **results,
            "perplexity_delta": results["mla"]["perplexity"] / results["base"]["perplexity"] - 1,
        }
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    def stage_export(self, work: Path) -> dict:
        hook = stage_hook("export")
        result = hook(self.model_dir(), work, self.recipe.export, recipe=self.recipe) or {}
        if not any(work.iterdir()):
            raise BuildError("the export stage wrote no files")
        return result

    def stage_card(self, work: Path) -> dict:
        from . import card

        model = self.model_dir()
        ft, ex = self.record("finetune"), self.record("export")
        return card.write_card(
            work, recipe=self.recipe,
            conversion=json.loads((model / "conversion.json").read_text()),
            config=json.loads((model / "config.json").read_text()),
            convert_result=self.record("convert")["result"],
            metrics=self.record("eval")["result"], gates=self.gates or [],
            finetune=ft and ft["result"], export=ex and {**ex["result"], "files": sorted(ex["outputs"])},
        )

    # the release

    def assemble(self) -> dict:
        """Lay out `hub/` exactly as the Hub repo will be and describe it in release.json."""
        hub, tmp = self.out / "hub", self.out / ".hub.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        placed = {}  # path in repo -> path here
        model = self.model_dir()
        for rel in self.record(self.model_stage())["outputs"]:
            placed[rel] = model / rel
        for rel in self.record("card")["outputs"]:
            placed[rel] = self.stage_dir("card") / rel
        if self.record("export") is not None:
            for rel in self.record("export")["outputs"]:
                placed[f"onnx/{rel}"] = self.stage_dir("export") / rel
        placed["eval_results.json"] = self.stage_dir("eval") / "metrics.json"
        for rel, src in placed.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)  # the weights can be large: no copy where a link will do
            except OSError:
                shutil.copy2(src, dst)
        convert_result = self.record("convert")["result"]
        r = self.recipe
        release = {
            "format": FORMAT,
            "name": r.release.name, "repo_id": r.release.repo_id, "version": r.release.version, "tag": r.release.tag,
            "description": r.release.description,
            "license": convert_result["license"], "base_model": convert_result["base_model"],
            "recipe": {"name": r.name, "file": r.path.name, "sha256": r.sha256, "text": r.text, "data": r.raw},
            "versions": versions(),
            "stages": {s: (None if self.fresh[s] is None else {"input_hash": self.fresh[s]["input_hash"],
                                                                 "seconds": self.fresh[s]["seconds"]})
                       for s in STAGES},
            "kv_cache": convert_result["kv_cache"], "settings": convert_result["settings"],
            "metrics": self.record("eval")["result"], "gates": self.gates,
            "files": hash_tree(tmp),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        text = json.dumps(release, indent=2) + "\n"
        (tmp / "release.json").write_text(text)
        shutil.rmtree(hub, ignore_errors=True)
        os.replace(tmp, hub)
        (self.out / "release.json").write_text(text)
        self.log(f"release {r.release.repo_id} {r.release.tag}: {len(release['files'])} files in {hub}")
        return release


def build(recipe: Recipe, out: str | Path, stages: list[str] | None = None, *, force: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run the stages of a recipe into `out`; returns {stages: status per stage, gates, release}."""
    kwargs = {} if log is None else {"log": log}
    return Builder(recipe, out, force=force, progress=progress, **kwargs).run(stages)
