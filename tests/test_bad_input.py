"""Bad input, command by command: each case exits with its status and a message that names the
problem (and the flag), and changes nothing on disk: the whole workspace (the output paths included,
which every case here refuses) is hashed before and after. Hub commands run against a closed port
(connection refused), as with no network, and must fail fast."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DATA
from mla_zoo.zoo.cli import main


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 of a file | "dir" | "link -> target"} of everything under root, hidden entries too."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = f"link -> {path.readlink()}"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


RECIPE = """\
[release]
name = "Bad-Input"
repo_id = "mla-zoo/Bad-Input"
version = "0.1.0"
license = "mit"

[source]
model = "../src"

[conversion]
rope_strategy = "high"
svd = "joint"
{conversion}
[eval]
text = "../text.txt"
max_tokens = 64
seq_len = 32
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory, source_dir) -> Path:
    """A workspace: a source, an MLA checkpoint of it, texts, a directory and a file that are not
    mla-zoo's, the same source and checkpoint with a cut-off tokenizer.json, recipes."""
    root = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(source_dir("llama-gqa"), root / "src")
    assert main(["convert", str(root / "src"), "-o", str(root / "ckpt"), "--rope-strategy", "high", "--svd", "joint",
                 "--dtype", "float32"]) == 0
    (root / "text.txt").write_text((DATA / "heldout.txt").read_text()[:4000])
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("my notes")
    (root / "afile.txt").write_text("a file")
    for name in ("src", "ckpt"):
        shutil.copytree(root / name, root / f"{name}-cut")
        tok = root / f"{name}-cut" / "tokenizer.json"
        tok.write_bytes(tok.read_bytes()[: tok.stat().st_size // 2])  # what a kill during the save leaves
    shutil.copytree(root / "src", root / "src-notok", ignore=shutil.ignore_patterns("tokenizer*"))
    (root / "recipes").mkdir()
    (root / "recipes" / "good.toml").write_text(RECIPE.format(conversion=""))
    (root / "recipes" / "rank0.toml").write_text(RECIPE.format(conversion="kv_rank_per_head = 0\n"))
    (root / "recipes" / "nocalib.toml").write_text(RECIPE.format(conversion='calib_text = "../missing.txt"\n'))
    return root


@pytest.fixture
def no_hub(monkeypatch, tmp_path_factory):
    """The Hub at a closed port of 127.0.0.1 (connection refused), its cache outside the workspace."""
    from huggingface_hub import constants, hf_api

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    cache = tmp_path_factory.mktemp("hf-cache")
    for name, value in {"ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache),
                        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HUB_OFFLINE": False}.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_bad_input_test_token")


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    message: str | tuple[str, ...]
    code: int = 2
    hub: bool = False  # needs the (unreachable) Hub


def p(root: Path, name: str) -> str:
    return str(root / name)


CONVERT = [
    Case("source as output", lambda r: ["convert", p(r, "src"), "-o", p(r, "src"), "--overwrite"],
         ("--output", "is the SOURCE", "would destroy it")),
    Case("parent of the source", lambda r: ["convert", p(r, "src"), "-o", str(r), "--overwrite"],
         ("--output", "holds the SOURCE")),
    Case("a directory mla-zoo did not write", lambda r: ["convert", p(r, "src"), "-o", p(r, "notes"), "--overwrite"],
         ("--output", "notes", "mla-zoo did not write", "conversion.json")),
    Case("a file as output", lambda r: ["convert", p(r, "src"), "-o", p(r, "afile.txt"), "--overwrite"],
         ("--output", "afile.txt is a file")),
    Case("an existing checkpoint without --overwrite", lambda r: ["convert", p(r, "src"), "-o", p(r, "ckpt")],
         "already exists; pass --overwrite"),
    Case("missing --eval-text", lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--eval-text", p(r, "no.txt")],
         "--eval-text names a file that does not exist"),
    Case("missing --calib-text", lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--calib-text", p(r, "no.txt")],
         "--calib-text names a file or directory that does not exist"),
    Case("--calib-text is a directory that synth-data did not write",
         lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--calib-text", p(r, "notes")],
         "--calib-text names a directory without `mla-zoo synth-data` shards"),
    Case("--eval-seq-len 1", lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--eval-seq-len", "1"],
         "--eval-seq-len must be an int >= 2 (got 1)"),
    Case("--eval-seq-len beyond the model, before converting",
         lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--eval-text", p(r, "text.txt"),
                    "--eval-seq-len", "512"],
         "--eval-seq-len 512 is beyond the model's 256 positions"),
    Case("--calib-tokens -5", lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--calib-tokens", "-5"],
         "--calib-tokens must be an int >= 1 (got -5)"),
    Case("--kv-rank abc", lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--kv-rank", "abc"],
         "argument --kv-lora-rank/--kv-rank: invalid int value: 'abc'"),
    Case("--rope-pairs beyond the model", lambda r: ["convert", p(r, "src"), "-o", p(r, "new"), "--rope-pairs", "9"],
         "--rope-pairs must be in [1, 8] for head_dim 16, got 9"),
    Case("a path that is not there", lambda r: ["convert", p(r, "no/such/dir"), "-o", p(r, "new")],
         "no such file or directory, and not a Hub id ORG/NAME"),
    Case("a cut-off tokenizer.json", lambda r: ["convert", p(r, "src-cut"), "-o", p(r, "new")],
         ("src-cut/tokenizer.json is not valid JSON", "cut off")),
    Case("--calib-text for a source without a tokenizer",
         lambda r: ["convert", p(r, "src-notok"), "-o", p(r, "new"), "--calib-text", p(r, "text.txt")],
         ("--calib-text needs a tokenizer", "pass --tokenizer", "drop --calib-text")),
    Case("--tokenizer without tokenizer files",
         lambda r: ["convert", p(r, "src-notok"), "-o", p(r, "new"), "--tokenizer", p(r, "notes")],
         "--tokenizer names a directory without tokenizer files"),
    Case("an unreachable Hub id", lambda r: ["convert", "mla-zoo/not-here", "-o", p(r, "new")],
         ("mla-zoo/not-here: no such local path, and as a Hub id", "cannot reach the Hub"), hub=True),
]

EVAL = [
    *[Case(f"--seq-len {v}", lambda r, v=v: ["eval", p(r, "ckpt"), "--text", p(r, "text.txt"), "--seq-len", v],
           f"--seq-len must be an int >= 2 (got {v})") for v in ("1", "0", "-5")],
    *[Case(f"--max-tokens {v}", lambda r, v=v: ["eval", p(r, "ckpt"), "--text", p(r, "text.txt"), "--max-tokens", v],
           f"--max-tokens must be an int >= 2 (got {v})") for v in ("0", "-5")],
    Case("missing --text", lambda r: ["eval", p(r, "ckpt"), "--text", p(r, "no.txt")],
         "--text names a file that does not exist"),
    Case("a local path that is not there", lambda r: ["eval", "out/does-not-exist", "--text", p(r, "text.txt")],
         ("out/does-not-exist: no such local path, and as a Hub id", "cannot reach the Hub"), hub=True),
    Case("a missing teacher, before the model loads",
         lambda r: ["eval", p(r, "ckpt"), "--text", p(r, "text.txt"), "--teacher", p(r, "no/such/teacher")],
         "no/such/teacher: no such file or directory"),
    Case("a checkpoint with a cut-off tokenizer.json", lambda r: ["eval", p(r, "ckpt-cut"), "--text", p(r, "text.txt")],
         "ckpt-cut/tokenizer.json is not valid JSON"),
]

SYNTH = [
    Case("source as output", lambda r: ["synth-data", p(r, "src"), "-o", p(r, "src"), "--tokens", "10",
                                        "--overwrite"], "is the SOURCE"),
    Case("a directory mla-zoo did not write", lambda r: ["synth-data", p(r, "src"), "-o", p(r, "notes"),
                                                         "--tokens", "10", "--overwrite"],
         ("mla-zoo did not write", "synth.json")),
    Case("--tokens 0", lambda r: ["synth-data", p(r, "src"), "-o", p(r, "new"), "--tokens", "0"],
         "--tokens must be an int >= 1 (got 0)"),
    *[Case(f"--temperature {v}", lambda r, v=v: ["synth-data", p(r, "src"), "-o", p(r, "new"), "--tokens", "10",
                                                 "--temperature", v], "--temperature must be a number > 0")
      for v in ("0", "inf", "nan")],
    Case("a missing source", lambda r: ["synth-data", p(r, "no/such/src"), "-o", p(r, "new"), "--tokens", "10"],
         "no such file or directory"),
]


def finetune(r: Path, *extra: str, ckpt: str = "ckpt", out: str = "new") -> list[str]:
    return ["finetune", p(r, ckpt), "-o", p(r, out), "--teacher", p(r, "src"), "--data", p(r, "text.txt"),
            "--seq-len", "32", "--max-steps", "1", "--no-progress", *extra]


FINETUNE = [
    Case("the checkpoint as output", lambda r: finetune(r, "--overwrite", out="ckpt"), "is the CHECKPOINT"),
    Case("a directory mla-zoo did not write", lambda r: finetune(r, "--overwrite", out="notes"),
         ("mla-zoo did not write", "run.json")),
    Case("--resume with nothing to resume", lambda r: finetune(r, "--resume", out="notes"), "nothing to resume"),
    Case("--lr inf", lambda r: finetune(r, "--lr", "inf"), "--lr must be a number > 0 (got inf)"),
    Case("--warmup-ratio 1", lambda r: finetune(r, "--warmup-ratio", "1"), "--warmup-ratio must be a number in [0, 1)"),
    Case("--max-steps 0", lambda r: finetune(r, "--max-steps", "0"), "--max-steps must be an int >= 1 (got 0)"),
    Case("missing --data", lambda r: finetune(r)[:-7] + ["--data", p(r, "no.txt"), "--seq-len", "32", "--max-steps",
                                                         "1", "--no-progress"], ("--data", "no such file")),
    Case("missing --eval-text", lambda r: finetune(r, "--eval-text", p(r, "no.txt")),
         "--eval-text names a file that does not exist"),
    Case("a missing teacher", lambda r: ["finetune", p(r, "ckpt"), "-o", p(r, "new"), "--teacher", p(r, "no/teacher"),
                                         "--data", p(r, "text.txt")], "no/teacher: no such file or directory"),
    Case("a checkpoint with a cut-off tokenizer.json", lambda r: finetune(r, ckpt="ckpt-cut"),
         "ckpt-cut/tokenizer.json is not valid JSON"),
]

EXPORT = [
    Case("the checkpoint as output", lambda r: ["export", p(r, "ckpt"), "-o", p(r, "ckpt"), "--overwrite"],
         ("--output-dir", "is the CHECKPOINT")),
    Case("a directory mla-zoo did not write", lambda r: ["export", p(r, "ckpt"), "-o", p(r, "notes"), "--overwrite"],
         ("--output-dir", "mla-zoo did not write", "genai_config.json")),
    Case("a missing checkpoint", lambda r: ["export", p(r, "no/ckpt"), "-o", p(r, "new"), "--shared-cache"],
         "no/ckpt has no config.json: not a checkpoint directory"),
    Case("generate: a missing model", lambda r: ["generate", p(r, "no/onnx"), "hi"],
         "no/onnx is not a directory: pass a checkpoint"),
    Case("generate: --device gpu", lambda r: ["generate", p(r, "ckpt"), "hi", "--device", "gpu"],
         "argument --device: invalid choice: 'gpu'"),
]

BUILD = [
    Case("a missing recipe", lambda r: ["build", p(r, "recipes/none.toml"), "-o", p(r, "new")], "no recipe file"),
    Case("a directory mla-zoo did not write", lambda r: ["build", p(r, "recipes/good.toml"), "-o", p(r, "notes")],
         ("--output", "mla-zoo did not write")),
    Case("the recipe's own directory", lambda r: ["build", p(r, "recipes/good.toml"), "-o", p(r, "recipes")],
         ("--output", "holds the RECIPE")),
    Case("the directory above the source", lambda r: ["build", p(r, "recipes/good.toml"), "-o", str(r)],
         ("--output", "holds the")),
    Case("a value out of range", lambda r: ["build", p(r, "recipes/rank0.toml"), "-o", p(r, "new")],
         "conversion.kv_rank_per_head must be an int >= 1 (got 0)"),
    Case("a missing input file", lambda r: ["build", p(r, "recipes/nocalib.toml"), "-o", p(r, "new")],
         "conversion.calib_text names a file or directory that does not exist"),
]

HUB = [
    Case("publish: no release there", lambda r: ["publish", p(r, "notes")], "holds no built release"),
    Case("list: no network", lambda r: ["list"], "cannot reach the Hub", hub=True),
    Case("info: no network", lambda r: ["info", "mla-zoo/x"], ("reading mla-zoo/x failed", "cannot reach the Hub"),
         hub=True),
    Case("pull: no network", lambda r: ["pull", "mla-zoo/x@0.1.0"],
         ("downloading mla-zoo/x@v0.1.0 failed", "cannot reach the Hub"), hub=True),
    Case("pull: not a repo id", lambda r: ["pull", "noslash"], "expected ORG/NAME[@vX.Y.Z]"),
    Case("pull: a directory mla-zoo did not write", lambda r: ["pull", "mla-zoo/x", "--local-dir", p(r, "notes")],
         ("--local-dir", "mla-zoo did not write")),
    Case("pull: a file as --local-dir", lambda r: ["pull", "mla-zoo/x", "--local-dir", p(r, "afile.txt")],
         ("--local-dir", "afile.txt is a file")),
]

CASES = [(c.argv(Path("/"))[0], c) for c in CONVERT + EVAL + SYNTH + FINETUNE + EXPORT + BUILD + HUB]


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[f"{cmd}: {c.name}" for cmd, c in CASES])
def test_bad_input(case: Case, ws: Path, request, capsys):
    if case.hub:
        request.getfixturevalue("no_hub")
    if case.argv(ws)[0] == "export":
        pytest.importorskip("onnx", reason="the export command needs the onnx extra")
    before = tree(ws)
    started = time.monotonic()
    try:
        code = main(case.argv(ws))
    except SystemExit as e:  # argparse: a value of the wrong type
        code = e.code
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == case.code, err[-2000:]
    for needle in (case.message,) if isinstance(case.message, str) else case.message:
        assert needle in err, err[-2000:]
    assert "Traceback" not in err
    assert tree(ws) == before  # nothing written, removed or left behind, outputs included
    if case.hub:
        assert seconds < 10, f"{seconds:.1f} s to find the Hub unreachable"


def test_an_output_mla_zoo_wrote_is_replaced_with_overwrite(ws: Path, tmp_path: Path, capsys):
    """The other side of the rule: a checkpoint convert wrote is replaced, with --overwrite, and nothing is left."""
    out = tmp_path / "ckpt"
    shutil.copytree(ws / "ckpt", out)
    (out / "stale.txt").write_text("from the previous conversion")
    assert main(["convert", str(ws / "src"), "-o", str(out), "--overwrite", "--rope-strategy", "high", "--svd",
                 "joint", "--rope-pairs", "2"]) == 0
    assert not (out / "stale.txt").exists() and (out / "conversion.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old copy left next to it
