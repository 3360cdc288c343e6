"""`mla-zoo pipeline rehearse RECIPE`: run the release workflow's own steps here, on the CPU.

The release is built by `.github/workflows/zoo-release.yml` on a GPU runner. So that a renamed
flag, a removed stage or a wrong path fails here (in a test) and not after an hour on the GPU
runner, the rehearsal reads that file and runs it the way the Actions runner does, as far as a
CPU machine can: the jobs in `needs` order, each matrix leg, every step's `if:`, `env:` and
`run:` script (bash -eo pipefail), with the files GitHub provides (`GITHUB_OUTPUT`, `GITHUB_ENV`,
`GITHUB_PATH`, `GITHUB_STEP_SUMMARY`) and the `${{ }}` expressions of the workflow evaluated
(`expressions.py`). The event is a `workflow_dispatch` with inputs recipe, version, dry-run.

What differs from GitHub, and why (nothing else does):

* `runs-on`, `environment`, `concurrency`, `permissions` and `timeout-minutes` of a job are
  evaluated (so a broken expression fails) but the job runs here. Environment protection rules
  are GitHub's; the rehearsal only models environment secrets: `secrets.HF_TOKEN` exists only in
  a job whose `environment` is `release`, as it does when the secret is set on that environment.
* Actions (`uses:`) are not downloaded. The few the workflows use have stand-ins: `checkout`,
  `setup-python` and `cache` do nothing (this checkout and this interpreter are used);
  `upload-artifact` copies its files to `WORK/artifacts/NAME/` (failing where GitHub would, with
  `if-no-files-found: error`) and `download-artifact` copies them back. Any other action is an error,
  so a new action must get a stand-in here.
* GPU-only and environment-changing programs are replaced by stand-ins on `PATH` (`WORK/bin`):
  `nvidia-smi` lists `gpus` pretend GPUs (default 1: one process; 2 takes the multi-GPU branch,
  which then runs `accelerate launch` with 2 CPU processes over gloo); `pip install` installs
  nothing but checks that every requirement it names is already satisfied in this interpreter
  (extras of a local project included), failing otherwise; `gh` (GitHub's CLI) only records its
  arguments in `WORK/gh-calls.txt`. `CUDA_VISIBLE_DEVICES` is empty.
* The Hub is the one at `hub_endpoint` (the tests' server, tests/hub_server.py): `HF_ENDPOINT`,
  `HF_HUB_DISABLE_XET=1` and a fresh `HF_HOME` under WORK; the token is a placeholder.
* The `github` context describes this checkout (sha of HEAD, ref refs/heads/main, repository
  `rehearsal/mla-zoo`); `vars` is empty unless given, so the workflow's defaults apply.

`run:` scripts may not contain `${{ }}` (they take values through `env:`, which also keeps
input text out of the script, GitHub's advice against script injection); the rehearsal refuses
them. Output of every step goes to `WORK/logs/`; a failing step's tail is in the error.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mla_zoo.modeling.common import MlaZooError

from .expressions import EXPRESSION, Scope, condition, substitute, to_string

REPO = Path(__file__).resolve().parents[2]
RELEASE_WORKFLOW = Path(".github/workflows/zoo-release.yml")
SHELL = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]
PLACEHOLDER_TOKEN = "hf_rehearsal_placeholder_not_a_secret"
STAND_IN_ACTIONS = ("actions/checkout", "actions/setup-python", "actions/cache", "actions/upload-artifact",
                    "actions/download-artifact")


class RehearsalError(MlaZooError):
    """The workflow cannot run here as written (a failed step, an unknown action, a bad expression)."""


@dataclass
class StepResult:
    job: str
    step: str
    status: str  # success, failure, skipped
    seconds: float = 0.0
    log: str | None = None


@dataclass
class RehearsalReport:
    workflow: str
    work: str
    steps: list[StepResult] = field(default_factory=list)
    summary: str = ""  # everything the steps wrote to GITHUB_STEP_SUMMARY
    jobs: dict[str, str] = field(default_factory=dict)  # job (leg) -> success / failure / skipped

    def ran(self, job: str | None = None) -> list[str]:
        """Names of the steps that ran (successfully or not), in order."""
        return [s.step for s in self.steps if s.status != "skipped" and (job is None or s.job.startswith(job))]


@dataclass
class Rehearsal:
    """One rehearsal of a workflow; `run()` executes it and returns a RehearsalReport."""

    workflow: Path
    work: Path
    inputs: dict[str, Any]
    hub_endpoint: str
    gpus: int = 1
    vars: dict[str, str] = field(default_factory=dict)
    repo: Path = REPO
    echo: bool = False  # also copy step output to stderr
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))

    # setup

    def __post_init__(self):
        self.work = Path(self.work).resolve()
        self.spec = load_workflow(self.workflow)
        if not isinstance(self.spec, dict) or "jobs" not in self.spec:
            raise RehearsalError(f"{self.workflow}: not a workflow (no jobs)")
        for name in ("bin", "logs", "artifacts", "hf-home", "scripts"):
            shutil.rmtree(self.work / name, ignore_errors=True)  # nothing of an earlier rehearsal counts
            (self.work / name).mkdir(parents=True)
        self._stand_ins()
        self.report = RehearsalReport(str(self.workflow), str(self.work))
        self.needs: dict[str, dict] = {}

    def _stand_ins(self) -> None:
        bin_dir = self.work / "bin"
        gpu_lines = "".join(f'echo "GPU {i}: Rehearsal CPU stand-in (UUID: GPU-rehearsal-{i})"\n'
                            for i in range(self.gpus))
        _write_exec(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\n# rehearsal stand-in: pretend GPUs\n"
                    f"{gpu_lines}exit 0\n")
        _write_exec(bin_dir / "pip", f"#!{sys.executable}\nimport sys\nfrom mla_zoo.zoo.release.pipeline import "
                                     "pip_stand_in\nsys.exit(pip_stand_in(sys.argv[1:]))\n")
        _write_exec(bin_dir / "gh", "#!/usr/bin/env bash\n# rehearsal stand-in: records the call, reaches no GitHub\n"
                    f'printf "%s\\n" "$*" >> "{self.work / "gh-calls.txt"}"\nexit 0\n')
        for name in ("python", "python3"):
            link = bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(sys.executable)

    def base_env(self) -> dict[str, str]:
        """This process's environment with what the rehearsal changes (module docstring)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GITHUB_", "RUNNER_", "HF_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"}
        env.update(
            PATH=os.pathsep.join([str(self.work / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]),
            CUDA_VISIBLE_DEVICES="", CI="true", GITHUB_ACTIONS="true",
            HF_ENDPOINT=self.hub_endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(self.work / "hf-home"),
            HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        return env

    def github(self) -> dict[str, Any]:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.repo, capture_output=True, text=True).stdout.strip()
        return {
            "event_name": "workflow_dispatch", "event": {"inputs": self.inputs}, "sha": sha or "0" * 40,
            "ref": "refs/heads/main", "ref_name": "main", "repository": "rehearsal/mla-zoo",
            "repository_owner": "rehearsal", "workspace": str(self.repo), "run_id": "1", "run_number": "1",
            "run_attempt": "1", "server_url": "https://github.com", "actor": "rehearsal", "token": "",
            "workflow": self.spec.get("name", ""),
        }

    def dispatch_inputs(self) -> dict[str, Any]:
        """The given inputs over the workflow's declared defaults, typed as GitHub types them."""
        declared = ((self.spec.get("on") or {}).get("workflow_dispatch") or {}).get("inputs") or {}
        unknown = set(self.inputs) - set(declared)
        if unknown:
            raise RehearsalError(f"{self.workflow}: workflow_dispatch has no input {sorted(unknown)[0]!r} "
                                 f"(inputs: {', '.join(declared)})")
        values = {}
        for name, spec in declared.items():
            value = self.inputs.get(name, spec.get("default"))
            if value is None and spec.get("required"):
                raise RehearsalError(f"{self.workflow}: the required input {name!r} is not given")
            if spec.get("type") == "boolean" and isinstance(value, str):
                value = value.lower() == "true"
            values[name] = value
        return values

    # running

    def run(self) -> RehearsalReport:
        self.inputs = self.dispatch_inputs()
        self.contexts = {"github": self.github(), "inputs": self.inputs, "vars": dict(self.vars),
                         "runner": {"os": "Linux", "arch": "X64", "name": "rehearsal", "environment": "self-hosted",
                                    "temp": str(self.work / "runner-temp"), "tool_cache": str(self.work / "tools")}}
        self.workflow_env = {k: to_string(v) for k, v in
                             substitute(self.spec.get("env") or {}, self.scope(env={})).items()}
        for name in self.job_order():
            self.run_job(name, self.spec["jobs"][name])
        failed = [job for job, result in self.report.jobs.items() if result == "failure"]
        if failed:
            step = next((s for s in self.report.steps if s.job == failed[0] and s.status == "failure"), None)
            detail = f" at step {step.step!r}:\n{(step.log or '')[-4000:]}" if step else ""
            raise RehearsalError(f"job {failed[0]} failed{detail}")
        return self.report

    def job_order(self) -> list[str]:
        jobs, order = self.spec["jobs"], []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in order:
                return
            if name in path:
                raise RehearsalError(f"jobs depend on each other in a cycle: {' -> '.join((*path, name))}")
            if name not in jobs:
                raise RehearsalError(f"job {path[-1]} needs {name!r}, which the workflow does not define")
            for need in _as_list(jobs[name].get("needs")):
                visit(need, (*path, name))
            order.append(name)

        for name in jobs:
            visit(name, ())
        return order

    def scope(self, env: Mapping[str, str], failed: bool = False, **contexts: Any) -> Scope:
        return Scope({**self.contexts, "env": dict(env), "secrets": contexts.pop("secrets", {}),
                      "needs": contexts.pop("needs", {}), "matrix": contexts.pop("matrix", {}),
                      "steps": contexts.pop("steps", {}), "job": contexts.pop("job", {}),
                      "strategy": contexts.pop("strategy", {}), **contexts},
                     failed=failed, workspace=self.repo)

    def run_job(self, name: str, job: dict) -> None:
        needs = {n: self.needs[n] for n in _as_list(job.get("needs"))}
        needs_failed = any(n["result"] != "success" for n in needs.values())
        scope = self.scope(self.workflow_env, failed=needs_failed, needs=needs)
        if not condition(job.get("if"), scope):
            self.log(f"job {name}: skipped (if: {job.get('if', 'success()')})")
            self.report.jobs[name] = "skipped"
            self.needs[name] = {"result": "skipped", "outputs": {}}
            return
        legs = self.matrix(name, job, scope)
        outputs: dict[str, str] = {}
        result = "success"
        for leg in legs:
            leg_name = name if leg is None else f"{name} ({', '.join(_leg_label(v) for v in leg.values())})"
            leg_result, leg_outputs = self.run_leg(leg_name, job, needs, leg or {})
            self.report.jobs[leg_name] = leg_result
            outputs.update({k: v for k, v in leg_outputs.items() if v})
            if leg_result == "failure":
                result = "failure"
        self.needs[name] = {"result": result, "outputs": outputs}

    def matrix(self, name: str, job: dict, scope: Scope) -> list[dict | None]:
        spec = (job.get("strategy") or {}).get("matrix")
        if spec is None:
            return [None]
        spec = substitute(spec, scope)
        if not isinstance(spec, dict):
            raise RehearsalError(f"job {name}: strategy.matrix is not a mapping: {spec!r}")
        if "include" in spec or "exclude" in spec:
            raise RehearsalError(f"job {name}: the rehearsal does not support matrix include/exclude")
        keys = list(spec)
        for key in keys:
            if not isinstance(spec[key], list):
                raise RehearsalError(f"job {name}: matrix.{key} is not a list: {spec[key]!r}")
        legs = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(spec[k] for k in keys))]
        if not legs:
            raise RehearsalError(f"job {name}: the matrix is empty (GitHub would fail the run)")
        return legs

    def run_leg(self, name: str, job: dict, needs: dict, matrix: dict) -> tuple[str, dict]:
        temp = self.work / "runner-temp" / _slug(name)  # each job (leg) has its own, empty RUNNER_TEMP
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        self.contexts["runner"]["temp"] = str(temp)
        environment = job.get("environment")
        environment = environment.get("name") if isinstance(environment, dict) else environment
        base = dict(matrix=matrix, needs=needs, strategy={"fail-fast": False, "job-index": 0, "job-total": 1})
        environment = to_string(substitute(environment, self.scope(self.workflow_env, **base)))
        secrets = {"GITHUB_TOKEN": ""}
        if environment == "release":
            secrets["HF_TOKEN"] = PLACEHOLDER_TOKEN
        base["secrets"] = secrets
        for key in ("runs-on", "concurrency", "timeout-minutes"):  # evaluated (must not fail), not used
            substitute(job.get(key), self.scope(self.workflow_env, **base))
        job_env = {**self.workflow_env, **{k: to_string(v) for k, v in
                                           substitute(job.get("env") or {}, self.scope(self.workflow_env,
                                                                                       **base)).items()}}
        self.log(f"job {name}: running" + (f" (environment {environment})" if environment else ""))
        steps: dict[str, dict] = {}
        added_env: dict[str, str] = {}
        added_path: list[str] = []
        failed = False
        defaults = ((job.get("defaults") or {}).get("run") or {})
        for index, step in enumerate(job.get("steps") or []):
            label = step.get("name") or step.get("id") or step.get("uses") or f"step {index + 1}"
            env_now = {**job_env, **added_env}
            scope = self.scope(env_now, failed=failed, steps=steps, **base)
            if not condition(step.get("if"), scope):
                self.report.steps.append(StepResult(name, label, "skipped"))
                if step.get("id"):
                    steps[step["id"]] = {"outputs": {}, "outcome": "skipped", "conclusion": "skipped"}
                continue
            step_env = {**env_now, **{k: to_string(v) for k, v in substitute(step.get("env") or {}, scope).items()}}
            started = time.time()
            files = self.step_files(index)
            try:
                if "uses" in step:
                    self.use_action(name, label, step, scope)
                    log = None
                else:
                    log = self.run_script(name, label, index, step, defaults, step_env, files, added_path)
                outcome = "success"
            except RehearsalError as e:
                outcome, log = "failure", str(e)
                self.log(f"  {label}: FAILED\n{e}")
            seconds = round(time.time() - started, 2)
            conclusion = "success" if outcome == "success" or step.get("continue-on-error") else "failure"
            outputs = _read_pairs(files["GITHUB_OUTPUT"])
            added_env.update(_read_pairs(files["GITHUB_ENV"]))
            added_path[:0] = [p for p in files["GITHUB_PATH"].read_text().splitlines() if p.strip()][::-1]
            self.report.summary += files["GITHUB_STEP_SUMMARY"].read_text()
            if step.get("id"):
                steps[step["id"]] = {"outputs": outputs, "outcome": outcome, "conclusion": conclusion}
            self.report.steps.append(StepResult(name, label, outcome, seconds, log))
            if outcome == "success":
                self.log(f"  {label}: ok ({seconds:.1f} s)")
            failed = failed or conclusion == "failure"
        result = "failure" if failed else "success"
        final = self.scope(job_env, failed=failed, steps=steps, **base)
        outputs = {k: to_string(v) for k, v in substitute(job.get("outputs") or {}, final).items()}
        return result, outputs

    def step_files(self, index: int) -> dict[str, Path]:
        folder = Path(self.contexts["runner"]["temp"]) / "_runner_file_commands"
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for var in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY"):
            files[var] = folder / f"{var.lower()}_{index}"
            files[var].write_text("")
        return files

    def run_script(self, job: str, label: str, index: int, step: dict, defaults: dict, env: dict[str, str],
                   files: dict[str, Path], added_path: list[str]) -> str:
        script = step["run"]
        if EXPRESSION.search(script):
            raise RehearsalError(f"job {job}, step {label!r}: its run: script contains ${{{{ }}}}; pass the value "
                                 "through env: instead (GitHub's advice against script injection)")
        shell = step.get("shell") or defaults.get("shell") or "bash"
        if shell != "bash":
            raise RehearsalError(f"job {job}, step {label!r}: shell {shell!r}: the rehearsal runs bash only")
        workdir = step.get("working-directory") or defaults.get("working-directory")
        cwd = self.repo / workdir if workdir else self.repo
        path = self.work / "scripts" / f"{_slug(job)}-{index:02d}.sh"
        path.write_text(script)
        log = self.work / "logs" / f"{_slug(job)}-{index:02d}-{_slug(label)}.log"
        event = self.work / "event.json"
        event.write_text(json.dumps(self.contexts["github"]["event"]))
        full_env = {**self.base_env(), **env, **{k: str(v) for k, v in files.items()}}
        full_env.update(GITHUB_WORKSPACE=str(self.repo), GITHUB_EVENT_NAME="workflow_dispatch",
                        GITHUB_EVENT_PATH=str(event), GITHUB_SHA=self.contexts["github"]["sha"],
                        GITHUB_REF="refs/heads/main", GITHUB_REPOSITORY="rehearsal/mla-zoo", GITHUB_RUN_ID="1",
                        GITHUB_JOB=job.split(" ")[0], RUNNER_TEMP=self.contexts["runner"]["temp"], RUNNER_OS="Linux",
                        RUNNER_ARCH="X64", CUDA_VISIBLE_DEVICES="")
        if added_path:
            full_env["PATH"] = os.pathsep.join([*added_path, full_env["PATH"]])
        timeout = step.get("timeout-minutes")
        self.log(f"  {label}: running")
        with log.open("w") as out:
            proc = subprocess.Popen([*SHELL, str(path)], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1)
            for line in proc.stdout:
                out.write(line)
                if self.echo:
                    sys.stderr.write(line)
            try:
                code = proc.wait(timeout=float(timeout) * 60 if timeout else None)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
            raise RehearsalError(f"job {job}, step {label!r} exited with {code}; its last lines ({log}):\n{tail}")
        return str(log)

    # actions

    def use_action(self, job: str, label: str, step: dict, scope: Scope) -> None:
        action = step["uses"].split("@")[0]
        if action not in STAND_IN_ACTIONS:
            raise RehearsalError(f"job {job}, step {label!r}: the rehearsal has no stand-in for {step['uses']}; "
                                 f"it knows {', '.join(STAND_IN_ACTIONS)} (add one in {Path(__file__).name})")
        inputs = {k: to_string(v) for k, v in substitute(step.get("with") or {}, scope).items()}
        if action == "actions/upload-artifact":
            self.upload(job, label, inputs)
        elif action == "actions/download-artifact":
            self.download(job, label, inputs)

    def upload(self, job: str, label: str, inputs: dict[str, str]) -> None:
        name = inputs.get("name") or "artifact"
        patterns = [p.strip() for p in inputs.get("path", "").splitlines() if p.strip()]
        include = [p for p in patterns if not p.startswith("!")]
        exclude = [p[1:] for p in patterns if p.startswith("!")]
        found: list[Path] = []
        for pattern in include:
            path = Path(os.path.expanduser(pattern))
            path = path if path.is_absolute() else self.repo / path
            matches = [Path(p) for p in _glob(str(path))]
            for match in matches:
                found += [f for f in ([match] if match.is_file() else sorted(match.rglob("*"))) if f.is_file()]
        found = [f for f in dict.fromkeys(found) if not any(fnmatch.fnmatch(str(f), e) or
                                                              fnmatch.fnmatch(str(f), str(self.repo / e))
                                                              for e in exclude)]
        if not found:
            if inputs.get("if-no-files-found", "warn") == "error":
                raise RehearsalError(f"job {job}, step {label!r}: no files match the artifact {name}'s path:\n"
                                     f"{inputs.get('path', '')}")
            self.log(f"  {label}: warning: no files for the artifact {name}")
            return
        root = Path(os.path.commonpath([str(f.parent) for f in found]))
        target = self.work / "artifacts" / name
        if target.exists() and inputs.get("overwrite", "false") != "true":
            raise RehearsalError(f"job {job}, step {label!r}: an artifact named {name} already exists")
        shutil.rmtree(target, ignore_errors=True)
        for f in found:
            dest = target / f.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        self.log(f"  {label}: artifact {name}: {len(found)} files")

    def download(self, job: str, label: str, inputs: dict[str, str]) -> None:
        name = inputs.get("name")
        source = self.work / "artifacts" / (name or "")
        if not name or not source.is_dir():
            raise RehearsalError(f"job {job}, step {label!r}: no artifact named {name!r} was uploaded")
        dest = Path(os.path.expanduser(inputs.get("path") or str(self.repo)))
        dest = dest if dest.is_absolute() else self.repo / dest
        shutil.copytree(source, dest, dirs_exist_ok=True)


def load_workflow(path: str | Path) -> dict:
    """A workflow file as GitHub reads it: YAML 1.1 would read the key `on` (and yes/no/off) as a
    boolean; here only true and false are booleans."""
    import yaml

    class WorkflowLoader(yaml.SafeLoader):
        pass

    WorkflowLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    booleans = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
    WorkflowLoader.add_implicit_resolver("tag:yaml.org,2002:bool", booleans, list("tTfF"))
    return yaml.load(Path(path).read_text(), Loader=WorkflowLoader)


def _glob(pattern: str) -> list[str]:
    import glob

    return sorted(glob.glob(pattern, recursive=True))


def _leg_label(value: Any) -> str:
    if isinstance(value, Mapping):
        return to_string(value.get("name", json.dumps(value, sort_keys=True)))
    return to_string(value)


def _as_list(value: Any) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48]


def _write_exec(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _read_pairs(path: Path) -> dict[str, str]:
    """NAME=value lines and NAME<<DELIMITER blocks, as in GITHUB_OUTPUT / GITHUB_ENV."""
    values, lines, i = {}, path.read_text().splitlines(), 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            block = []
            while i < len(lines) and lines[i] != delimiter:
                block.append(lines[i])
                i += 1
            i += 1
            values[name] = "\n".join(block)
        elif "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    return values


# ----------------------------------------------------------------------------- the pip stand-in


def pip_stand_in(argv: list[str]) -> int:
    """`pip` during a rehearsal: installs nothing; `pip install ...` checks that each requirement is
    already satisfied by this interpreter (a local project by its name and the requirements of the
    extras asked for), so a workflow that needs a package this environment lacks fails here."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    if not argv or argv[0] != "install":
        print(f"rehearsal: pip {' '.join(argv)}: not run")
        return 0
    with_value = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                  "-f", "--find-links", "--target", "-t", "--prefix", "--root", "--python-version", "--platform"}
    wanted: list[Requirement] = []
    no_deps = "--no-deps" in argv
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-r", "--requirement"):
            print(f"rehearsal: pip install -r is not checked ({next(args, '')})")
            continue
        if arg in with_value:
            next(args, None)
            continue
        if arg.startswith("-") and arg not in ("-e", "--editable"):
            continue
        if arg in ("-e", "--editable"):
            arg = next(args, "")
        wanted += _local_project(arg) if arg.startswith((".", "/")) else [Requirement(arg)]
    missing, seen = [], set()
    while wanted:
        req = wanted.pop()
        key = (req.name.lower(), str(req.specifier), tuple(sorted(req.extras)))
        if key in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            missing.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            missing.append(f"{req} (installed: {dist.version})")
        if not no_deps:
            wanted += _extras_requirements(dist, req.extras)
    if missing:
        print("rehearsal: pip install would change this environment; not satisfied here:\n  " + "\n  ".join(missing))
        return 1
    print(f"rehearsal: pip install: {len(seen)} requirements already satisfied, nothing installed")
    return 0


def _local_project(spec: str) -> list:
    """`.[a,b]` or a path: the project's name with those extras, read from its pyproject.toml."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - python 3.10
        import tomli as tomllib
    path, _, extras = spec.partition("[")
    project = tomllib.loads((Path(path) / "pyproject.toml").read_text())["project"]
    return [Requirement(f"{project['name']}[{extras}" if extras else project["name"])]


def _extras_requirements(dist, extras) -> list:
    """The requirements of an installed distribution for its base and the given extras."""
    from packaging.requirements import Requirement

    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None:
            out.append(req)
            continue
        for extra in ("", *extras):
            if req.marker.evaluate({"extra": extra}):
                req.marker = None
                out.append(req)
                break
    return out


# ----------------------------------------------------------------------------- entry


def rehearse_workflow(workflow: str | Path, hub_endpoint: str, work: str | Path, inputs: dict[str, Any] | None = None,
                      *, gpus: int = 1, vars: dict[str, str] | None = None, echo: bool = False,
                      log: Callable[[str], None] | None = None) -> RehearsalReport:
    """Run any workflow of the project as a workflow_dispatch with these inputs."""
    kwargs = {} if log is None else {"log": log}
    return Rehearsal(Path(workflow), Path(work), dict(inputs or {}), hub_endpoint, gpus=gpus, vars=dict(vars or {}),
                     echo=echo, **kwargs).run()


def rehearse(recipe: str, hub_endpoint: str, work: str | Path, *, version: str | None = None,
             publish: bool = False, gpus: int = 1, workflow: str | Path | None = None,
             vars: dict[str, str] | None = None, echo: bool = False,
             log: Callable[[str], None] | None = None) -> RehearsalReport:
    """Run the release workflow for one recipe as a workflow_dispatch (dry-run unless `publish`)."""
    from .recipe import load_recipe

    loaded = load_recipe(recipe)
    recipe_path = loaded.path.resolve()
    try:
        recipe_arg = str(recipe_path.relative_to(REPO))
    except ValueError:
        recipe_arg = str(recipe_path)
    inputs = {"recipe": recipe_arg, "version": version or loaded.release.version, "dry-run": not publish}
    return rehearse_workflow(workflow or REPO / RELEASE_WORKFLOW, hub_endpoint, work, inputs, gpus=gpus, vars=vars,
                             echo=echo, log=log)
