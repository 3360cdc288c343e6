"""What the release workflows call besides `mla-zoo build` and `publish` (`mla-zoo pipeline ...`):

* `plan_releases`: which recipes a run releases (the matrix of `zoo-release.yml`), each validated
  and checked against the Hub's tags before any GPU time is spent;
* `release_summary`: the run summary (stages, metrics, the multi-domain suite, gates) as Markdown;
* `validate_onnx`: the exported ONNX model in onnxruntime against the PyTorch checkpoint;
* `recheck`: a published release loaded with `trust_remote_code` on the installed (newest)
  transformers, cached decoding against uncached (what broke on transformers 5.24).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mla_zoo.modeling.common import MlaZooError, RecipeError, VersionExists

REPO = Path(__file__).resolve().parents[2]
RECIPES = "zoo/recipes"
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ")


class ValidationError(MlaZooError):
    """A built or published release does not behave as it must."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- plan


@dataclass
class PlannedRelease:
    recipe: str  # the path `mla-zoo build` is given (relative to the repository root when inside it)
    name: str  # the recipe's file name without .toml (artifact names)
    repo_id: str
    version: str


def changed_recipes(before: str | None, after: str, repo: Path = REPO) -> list[str]:
    """Recipe files added or modified between two commits (a new branch: those of `after` itself)."""
    if not before or set(before) == {"0"}:
        before = f"{after}^"
    out = subprocess.run(["git", "diff", "--name-only", "--diff-filter=AMR", before, after, "--", RECIPES],
                         cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise RecipeError(f"git diff {before} {after}: {out.stderr.strip()}")
    return [line for line in out.stdout.splitlines() if line.endswith(".toml")]


def published_tags(repo_id: str, api=None) -> list[str]:
    """The repo's tags on the Hub (none when it does not exist yet); read-only, no token needed."""
    from huggingface_hub.errors import RepositoryNotFoundError
    from mla_zoo.modeling.hub_client import hub_call

    from .hub import make_api

    with hub_call(f"reading the tags of {repo_id}", browse=True):
        try:
            return [t.name for t in make_api(api).list_repo_refs(repo_id).tags]
        except RepositoryNotFoundError:
            return []


def plan_releases(event: str, *, recipe: str | None = None, version: str | None = None, before: str | None = None,
                  after: str | None = None, check_hub: bool = True, api=None, repo: Path | None = None,
                  log: Callable[[str], None] = _log) -> list[PlannedRelease]:
    """The releases of one run of zoo-release.yml.

    workflow_dispatch: the one recipe asked for, whose release.version must equal `version`, and
    which must not be published yet (an error otherwise). push: every recipe the push added or
    changed; one whose version is already published is left out with a notice (bump its version
    to release the change)."""
    from .recipe import load_recipe

    if event == "workflow_dispatch":
        if not recipe or not version:
            raise RecipeError("workflow_dispatch needs the recipe and the version to release")
        paths = [recipe]
    elif event == "push":
        if not after:
            raise RecipeError("push needs the commit range (before, after)")
        paths = changed_recipes(before, after, repo or Path.cwd())
    else:
        raise RecipeError(f"zoo-release runs on workflow_dispatch or push, not {event!r}")
    planned = []
    for path in paths:
        loaded = load_recipe(path)  # every problem of the recipe, before a GPU runner is taken
        r = loaded.release
        if event == "workflow_dispatch" and version.removeprefix("v") != r.version:
            raise RecipeError(f"recipe {loaded.name}: the version to release is {version}, but release.version in "
                              f"{loaded.path.name} is {r.version}; edit the recipe, or ask for {r.version}")
        if check_hub and r.tag in published_tags(r.repo_id, api):
            if event == "workflow_dispatch":
                raise VersionExists(f"{r.repo_id} already has {r.tag}: a released version is never overwritten; "
                                    f"bump release.version in {loaded.path.name}")
            log(f"::notice::{loaded.path.name}: {r.repo_id} {r.tag} is already published; not released again "
                "(bump release.version to release the change)")
            continue
        resolved = loaded.path.resolve()
        try:
            shown = str(resolved.relative_to(Path.cwd().resolve()))
        except ValueError:
            shown = str(resolved)
        planned.append(PlannedRelease(shown, resolved.stem, r.repo_id, r.version))
    return planned


# ----------------------------------------------------------------------------- summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def release_summary(release_dir: str | Path, recipe: str | None = None) -> str:
    """Markdown for $GITHUB_STEP_SUMMARY: whatever the build got to, also when a stage or a gate failed."""
    from mla_zoo.modeling.common import read_json

    out = Path(release_dir)
    manifest = read_json(out / "release.json") if (out / "release.json").is_file() else None
    records = {p.stem: read_json(p) for p in sorted((out / "stages").glob("*.json"))}
    loaded = None
    if recipe is not None:
        from .recipe import load_recipe

        loaded = load_recipe(recipe)
    if manifest:
        title = f"{manifest['name']} {manifest['tag']} -> `{manifest['repo_id']}`"
    elif loaded:
        title = f"{loaded.release.name} v{loaded.release.version} -> `{loaded.release.repo_id}` (not assembled)"
    else:
        title = f"{out.name} (not assembled)"
    lines = [f"## mla-zoo release: {title}", ""]
    from .stages import STAGES

    rows = []
    for stage in STAGES:
        record = records.get(stage.name)
        disabled = manifest is not None and manifest["stages"].get(stage.name) is None
        status = "disabled" if disabled else "built" if record else "not built"
        rows.append([stage.name, status, _num(record["seconds"], 1) if record and not disabled else "-"])
    lines += _table(["stage", "status", "seconds"], rows) + [""]

    metrics = manifest["metrics"] if manifest else (records.get("eval") or {}).get("result")
    if metrics:
        base, mla = metrics["base"], metrics["mla"]
        kv_base, kv_mla = base.get("kv_cache_bytes_per_token"), mla.get("kv_cache_bytes_per_token")
        kv_change = kv_mla / kv_base - 1 if kv_base and kv_mla else None
        lines += _table(["metric", "original", "MLA", "change"], [
            [f"perplexity on `{metrics.get('text')}`", _num(base["perplexity"]), _num(mla["perplexity"]),
             _pct(metrics.get("perplexity_delta"))],
            ["KV cache bytes / token", _num(kv_base, 0), _num(kv_mla, 0), _pct(kv_change)],
        ]) + [""]
        suite = metrics.get("suite")
        if suite and suite.get("domains"):
            domains = sorted(suite["domains"], key=lambda d: -d.get("perplexity_increase", 0))
            lines += ["### Multi-domain suite (worst first)", ""]
            lines += _table(["domain", "original ppl", "MLA ppl", "increase", "top-1 agreement", "KL (nats)"], [
                [d["name"], _num(d.get("teacher_perplexity")), _num(d.get("perplexity")),
                 _pct(d.get("perplexity_increase")), _num(d.get("top1_agreement")), _num(d.get("kl"), 4)]
                for d in domains]) + [""]
            scored = [b for b in suite.get("behaviour") or [] if b.get("teacher_ok")]
            if scored:
                kept = sum(1 for b in scored if b.get("ok"))
                lines += [f"Behaviour prompts the original answers right: {kept} / {len(scored)} kept.", ""]

    gates = manifest["gates"] if manifest else _gates_of(out, loaded, metrics)
    if gates:
        lines += ["### Gates", ""]
        lines += _table(["gate", "value", "limit", "result"], [
            [g["gate"], _num(g["value"], 4), _num(g["limit"], 4), "passed" if g["passed"] else "**FAILED**"]
            for g in gates]) + [""]
    if manifest:
        size = sum(f["size"] for f in manifest["files"].values())
        lines += [f"Release: {len(manifest['files'])} files, {size / 2**20:,.1f} MiB; built with "
                  + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()) + ".", ""]
    return "\n".join(lines)


def _gates_of(out: Path, loaded, metrics: dict | None) -> list[dict]:
    """The gates recomputed from the eval record (a failed gate removes release.json)."""
    if loaded is None or metrics is None or not (out / "convert").is_dir():
        return []
    from mla_zoo.modeling.convert_schema import ConversionReport
    from mla_zoo.zoo.evaluate import EvalComparison

    from .gates import check_gates

    kv = ConversionReport.read(out / "convert").kv_cache
    return [asdict(g) for g in check_gates(loaded.gates, EvalComparison.from_dict(metrics), kv)]


# ----------------------------------------------------------------------------- ONNX validation


@dataclass
class BackendCheck:
    backend: str  # "function body" or "fused kernel"
    positions: int  # logits compared (prefill and every decode step, all prompts)
    max_abs_diff: float
    tolerance: float
    greedy_agreement: float  # share of positions where onnxruntime's argmax is PyTorch's
    passed: bool


@dataclass
class OnnxValidation:
    release_dir: str
    exported: bool
    dtype: str | None = None
    new_tokens: int = 0
    backends: list[BackendCheck] = field(default_factory=list)
    note: str = ""

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.backends)


def validate_onnx(release_dir: str | Path, new_tokens: int = 16, kernels: str = "auto",
                  log: Callable[[str], None] = _log) -> OnnxValidation:
    """The release's onnx/ model in onnxruntime against its PyTorch checkpoint, teacher-forced on
    PyTorch's greedy continuation of fixed prompts: logits at the prefill and at every decode step
    (onnxruntime feeding its own cache) within the tolerance of the export's dtype. Both the function
    body and, when the kernel library is built (`kernels`: auto / require / off), the fused kernel."""
    import numpy as np
    import torch
    from mla_zoo.modeling.common import read_json
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(release_dir)
    if not (out / "release.json").is_file():
        raise ValidationError(f"{out} holds no built release (no release.json): run `mla-zoo build` first")
    manifest = read_json(out / "release.json")
    hub, onnx_dir = out / "hub", out / "hub" / "onnx"
    if manifest["stages"].get("export") is None:
        return OnnxValidation(str(out), False, note="the recipe does not enable the export stage: nothing to validate")
    if not (onnx_dir / "model.onnx").is_file():
        raise ValidationError(f"the release has an export stage but no {onnx_dir / 'model.onnx'}")
    from mla_zoo.export.runner import OnnxDecoder

    model = AutoModelForCausalLM.from_pretrained(hub, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hub, trust_remote_code=True)
    sequences, references = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])  # [1, S]
        with torch.no_grad():
            full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                  min_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)  # [1, S + n]
            references.append(model(full).logits[0, ids.shape[1] - 1:-1].numpy())  # [n, vocab], uncached
        sequences.append((ids.shape[1], full[0].numpy()))

    backends = [("function body", False)]
    if kernels != "off":
        from mla_zoo.export.kernels.build import KernelLibraryNotBuilt, get_library_path

        try:
            get_library_path()
            backends.append(("fused kernel", True))
        except KernelLibraryNotBuilt:
            if kernels == "require":
                raise
            log("validate-onnx: the kernel library is not built; validating the function body only")
    result = OnnxValidation(str(out), True, new_tokens=new_tokens)
    for label, use_kernels in backends:
        decoder = OnnxDecoder(onnx_dir, use_kernels=use_kernels)
        fp16 = decoder.cache.dtype == np.float16
        result.dtype = "fp16" if fp16 else "fp32"
        diffs, agree, count, scale = [], 0, 0, 1.0
        for (prompt_len, full), reference in zip(sequences, references, strict=True):
            past = decoder.empty_past(1)
            got = []
            for start, stop in [(0, prompt_len)] + [(i, i + 1) for i in range(prompt_len, len(full) - 1)]:
                ids = full[None, start:stop]  # [1, S] at the prefill, then [1, 1]
                mask = np.ones((1, stop), dtype=np.int64)
                logits, past = decoder.step(ids, mask, np.arange(start, stop)[None], past)
                got.append(logits[0, -1].astype(np.float32))
            got = np.stack(got)  # [n, vocab]
            diffs.append(float(np.abs(got - reference).max()))
            agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
            count += len(got)
            scale = max(scale, float(np.abs(reference).max()))
        tolerance = (2e-2 if fp16 else 1e-3) * scale
        check = BackendCheck(label, count, max(diffs), tolerance, agree / count, max(diffs) <= tolerance)
        log(f"validate-onnx: {label}: max |logits - PyTorch| {check.max_abs_diff:.2e} (tolerance "
            f"{tolerance:.1e}) over {count} positions; greedy agreement {100 * check.greedy_agreement:.1f}%")
        result.backends.append(check)
    if not result.passed:
        failed = next(b for b in result.backends if not b.passed)
        raise ValidationError(f"onnxruntime ({failed.backend}) differs from PyTorch: max |logits diff| "
                              f"{failed.max_abs_diff:.3e} > {failed.tolerance:.1e}")
    return result


# ----------------------------------------------------------------------------- recheck


@dataclass
class RecheckReport:
    repo_id: str
    revision: str
    versions: dict[str, str]  # python, torch, transformers this check ran on
    new_tokens: int
    tokens_equal: bool  # cached greedy decoding == uncached, for every prompt
    max_logit_diff: float  # cached vs uncached scores over all steps
    tolerance: float
    passed: bool


def recheck(ref: str, new_tokens: int = 16, log: Callable[[str], None] = _log) -> RecheckReport:
    """Download a published release (REPO[@vX.Y.Z], verified against its release.json; or a local
    release directory), load it with trust_remote_code on this transformers, and decode greedily
    with and without the cache: the tokens must be the same and the per-step logits within 1e-3
    (relative to their scale)."""
    import platform

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import pull

    if Path(ref).is_dir():
        pulled = {"repo_id": str(Path(ref).resolve()), "revision": "local", "path": str(ref)}
    else:
        pulled = pull(ref)
    path = pulled["path"]
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    log(f"recheck: {pulled['repo_id']}@{pulled['revision']} on transformers {transformers.__version__}")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    equal, diff, scale = True, 0.0, 1.0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        runs = []
        for use_cache in (True, False):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=tokenizer.eos_token_id)
            runs.append((out.sequences[0], torch.stack(out.logits)))  # [S + n], [n, 1, vocab] (raw logits)
        (cached, s_cached), (uncached, s_uncached) = runs
        if not torch.isfinite(s_cached).all():
            raise ValidationError(f"{ref}: the logits are not finite on transformers {transformers.__version__}")
        equal &= torch.equal(cached, uncached)
        diff = max(diff, float((s_cached - s_uncached).abs().max()))
        scale = max(scale, float(s_uncached.abs().max()))
    tolerance = 1e-3 * scale
    report = RecheckReport(pulled["repo_id"], pulled["revision"], versions, new_tokens, equal, diff, tolerance,
                           equal and diff <= tolerance)
    log(f"recheck: cached == uncached tokens: {equal}; max |logits diff| {diff:.2e} (tolerance {tolerance:.1e})")
    return report


def to_json(value) -> str:
    return json.dumps(asdict(value) if hasattr(value, "__dataclass_fields__") else value, indent=2)

