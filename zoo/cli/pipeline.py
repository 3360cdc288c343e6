"""`mla-zoo pipeline ACTION`: what the GitHub Actions workflows run besides build and publish, and
their rehearsal on this machine.

    mla-zoo pipeline rehearse RECIPE [--gpus 2] [--publish] [--work DIR] [--hub-endpoint URL]
    mla-zoo pipeline plan RECIPE --version V            (workflow_dispatch)
    mla-zoo pipeline plan --event push --before SHA --after SHA
    mla-zoo pipeline summary RELEASE_DIR [--recipe RECIPE]
    mla-zoo pipeline validate-onnx RELEASE_DIR [--kernels auto|require|off]
    mla-zoo pipeline recheck REPO[@vX.Y.Z]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mla_zoo.modeling.common import MlaZooError, SettingsError
from mla_zoo.modeling.schema import Settings, setting

from .command import Command, Output

ACTIONS = ("rehearse", "plan", "summary", "validate-onnx", "recheck")


@dataclass
class PipelineSettings(Settings):
    action: str = setting(positional=True, choices=ACTIONS, metavar="ACTION",
                          help="rehearse: run zoo-release.yml here on the CPU; plan: the releases of a workflow run "
                               "(JSON); summary: the run summary (Markdown); validate-onnx: the release's ONNX model "
                               "in onnxruntime against PyTorch; recheck: a published release on this transformers")
    target: str | None = setting(None, positional=True, metavar="TARGET",
                                 help="rehearse, plan: RECIPE; summary, validate-onnx: RELEASE_DIR; recheck: "
                                      "REPO[@vX.Y.Z]")
    version: str | None = setting(None, help="rehearse, plan: the version to release (default for rehearse: the "
                                             "recipe's)")
    event: str = setting("workflow_dispatch", choices=("workflow_dispatch", "push"), help="plan: the event")
    before: str | None = setting(None, help="plan --event push: the commit before the push")
    after: str | None = setting(None, help="plan --event push: the commit pushed")
    check_hub: bool = setting(True, help="plan: leave out (push) or refuse (dispatch) versions already on the Hub")
    recipe: str | None = setting(None, help="summary: the recipe (its gates, when a failed gate left no release.json)")
    work: str | None = setting(None, help="rehearse: working directory (default: a new temporary one, kept)")
    hub_endpoint: str | None = setting(None, help="rehearse: the Hub to publish to (default: start the tests' Hub "
                                                  "server, tests/hub_server.py, on 127.0.0.1)")
    gpus: int = setting(1, min=0, help="rehearse: GPUs the stand-in nvidia-smi lists (2: the multi-GPU branch, "
                                       "accelerate launch with 2 CPU processes)")
    publish: bool = setting(False, help="rehearse: not a dry run: publish to the rehearsal's Hub")
    echo: bool = setting(False, help="rehearse: show the steps' output as they run")
    new_tokens: int = setting(16, min=1, help="validate-onnx, recheck: greedy tokens per prompt")
    kernels: str = setting("auto", choices=("auto", "require", "off"),
                           help="validate-onnx: also the fused kernel library (auto: when it is built)")


# which flags each action reads (any other one given is an error that says so)
USES = {
    "rehearse": {"target", "version", "work", "hub_endpoint", "gpus", "publish", "echo"},
    "plan": {"target", "version", "event", "before", "after", "check_hub"},
    "summary": {"target", "recipe"},
    "validate-onnx": {"target", "new_tokens", "kernels"},
    "recheck": {"target", "new_tokens"},
}


def _check_flags(s: PipelineSettings) -> None:
    from .main import flag

    for f in dataclasses.fields(s):
        if f.name == "action" or f.name in USES[s.action]:
            continue
        if getattr(s, f.name) != f.default:
            raise SettingsError(f"`{f.name}` does not apply to `pipeline {s.action}`")
    if s.action != "plan" or s.event == "workflow_dispatch":
        if s.target is None:
            raise SettingsError(f"`pipeline {s.action}` needs its TARGET ({flag(PIPELINE_TARGET)})")


PIPELINE_TARGET = next(f for f in dataclasses.fields(PipelineSettings) if f.name == "target")


@contextlib.contextmanager
def _hub(endpoint: str | None):
    """The given endpoint, or the tests' Hub server of this checkout, started for the rehearsal."""
    if endpoint:
        yield endpoint
        return
    from mla_zoo.zoo.release.pipeline import REPO

    path = REPO / "tests" / "hub_server.py"
    if not path.is_file():
        raise SettingsError("no `hub_endpoint` given and this installation has no tests/hub_server.py to start")
    spec = importlib.util.spec_from_file_location("mla_zoo_rehearsal_hub", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    with module.HubServer() as server:
        print(f"rehearsal Hub: {server.endpoint} (tests/hub_server.py)", file=sys.stderr)
        yield server.endpoint


def pipeline(s: PipelineSettings, out: Output) -> int:
    _check_flags(s)
    from mla_zoo.zoo.release import pipeline_steps as steps

    if s.action == "rehearse":
        return rehearse(s, out)
    if s.action == "plan":
        planned = steps.plan_releases(s.event, recipe=s.target, version=s.version, before=s.before, after=s.after,
                                      check_hub=s.check_hub)
        # one line: the workflow writes it to $GITHUB_OUTPUT and reads it back with fromJSON
        print(json.dumps([dataclasses.asdict(p) for p in planned], separators=(",", ":")))
        return 0
    if s.action == "summary":
        print(steps.release_summary(s.target, s.recipe))
        return 0
    if s.action == "validate-onnx":
        result = steps.validate_onnx(s.target, s.new_tokens, s.kernels)
        if out.json:
            print(steps.to_json(result))
        elif not result.exported:
            print(result.note)
        else:
            for b in result.backends:
                print(f"{b.backend:<14} max |logits diff| {b.max_abs_diff:.2e} <= {b.tolerance:.1e} over "
                      f"{b.positions} positions; greedy agreement {100 * b.greedy_agreement:.1f}%")
        return 0
    report = steps.recheck(s.target, s.new_tokens)
    print(steps.to_json(report) if out.json else
          f"{report.repo_id}@{report.revision} on transformers {report.versions['transformers']}: "
          f"{'ok' if report.passed else 'BROKEN'} (cached == uncached tokens: {report.tokens_equal}; max |logits "
          f"diff| {report.max_logit_diff:.2e})")
    return 0 if report.passed else 1


def rehearse(s: PipelineSettings, out: Output) -> int:
    from mla_zoo.zoo.release.pipeline import rehearse as run

    work = Path(s.work) if s.work else Path(tempfile.mkdtemp(prefix="mla-zoo-rehearsal-"))
    with _hub(s.hub_endpoint) as endpoint:
        try:
            report = run(s.target, endpoint, work, version=s.version, publish=s.publish, gpus=s.gpus, echo=s.echo)
        except MlaZooError as e:
            raise type(e)(f"{e}\n(rehearsal files: {work})") from e
    if out.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return 0
    for job, result in report.jobs.items():
        print(f"job {job}: {result}")
    print(f"{len(report.ran())} steps ran; logs, artifacts and the summary in {work}")
    (work / "summary.md").write_text(report.summary)
    return 0


COMMANDS = (
    Command("pipeline", "the release workflows' helpers (plan, summary, validate-onnx, recheck) and their "
                        "rehearsal on this machine (rehearse)", (PipelineSettings, Output), pipeline),
)
