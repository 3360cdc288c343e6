"""`mla-zoo convert` end to end on tiny checkpoints: every strategy and SVD variant yields a checkpoint
that loads through its own remote code in a process where mla-zoo is NOT importable; bad input gets
a clear error and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA
from mla_zoo.zoo.cli import main

REMOTE_LOAD = r"""
import importlib.util, json, sys
assert importlib.util.find_spec("mla_zoo") is None, "mla_zoo must not be importable here"
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(ids).logits
out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
print(json.dumps({"class": type(model).__module__, "logits": logits[0, -1].tolist(), "gen": out[0].tolist()}))
"""


def load_in_clean_process(ckpt: Path, ids: list[int]) -> dict:
    """Python without site-packages' .pth hooks (so no editable mla_zoo) and cwd outside the repo."""
    import transformers

    sites = dict.fromkeys(str(Path(m.__file__).parents[1]) for m in (transformers, torch))  # in order, no dups
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join(sites), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(ckpt.parent / "hf_modules"))
    proc = subprocess.run([sys.executable, "-S", "-c", REMOTE_LOAD, str(ckpt), json.dumps(ids)],
                          capture_output=True, text=True, env=env, cwd=ckpt.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def convert(src, out, *extra) -> int:
    return main(["convert", str(src), "-o", str(out), "--dtype", "float32", *extra])


@pytest.mark.parametrize("strategy", ["high", "low", "uniform", "2-norm"])
@pytest.mark.parametrize("svd", ["joint", "split", "whitened", "output-aware"])
def test_every_strategy_and_svd_gives_a_loadable_checkpoint(source_dir, tmp_path, strategy, svd):
    out = tmp_path / "mla"
    calib = ["--calib-text", str(DATA / "calib.txt"), "--calib-tokens", "512"] if strategy == "2-norm" else []
    assert convert(source_dir("llama-gqa"), out, "--rope-strategy", strategy, "--svd", svd,
                   "--kv-rank-per-head", "8", "--rope-pairs", "2", *calib) == 0
    for name in ("model.safetensors", "config.json", "configuration_llama_mla.py", "modeling_llama_mla.py",
                 "tokenizer.json", "generation_config.json", "conversion.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "conversion.json").read_text())
    assert report["settings"]["rope_strategy"] == strategy and report["settings"]["svd"] == svd
    assert report["settings"]["kv_lora_rank"] == 16 and report["settings"]["kv_rank_per_head"] == 8
    assert report["kv_cache"]["reduction"] == pytest.approx(1 - (16 + 2 * 4) / (2 * 2 * 16))
    if svd == "joint" and strategy == "2-norm":  # one full clean-process load is enough per svd
        from transformers import AutoModelForCausalLM

        ids = [5, 17, 42, 99, 7, 250]
        remote = load_in_clean_process(out, ids)
        assert remote["class"].startswith("transformers_modules")
        local = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            want = local(torch.tensor([ids])).logits[0, -1]
        assert (torch.tensor(remote["logits"]) - want).abs().max() < 1e-5


def test_lossless_checkpoint_matches_source_logits_after_reload(source_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = source_dir("qwen2-bias")
    out = tmp_path / "mla"
    assert convert(src, out, "--rope-strategy", "high", "--rope-pairs", "8", "--kv-rank", "32") == 0
    ids = torch.randint(3, 384, (2, 16))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()(ids).logits
    assert (want - got).abs().max() < 1e-4


def error_of(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_bad_input_gets_clear_errors_and_leaves_nothing(source_dir, tmp_path, capsys):
    src = source_dir("llama-gqa")
    out = tmp_path / "out"
    assert "rope-pairs must be in [1, 8]" in error_of(capsys, "convert", str(src), "-o", str(out), "--rope-pairs", "9")
    assert "in [1, 60]" in error_of(capsys, "convert", str(src), "-o", str(out), "--kv-rank", "999",
                                    "--rope-strategy", "high")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "is empty" in error_of(capsys, "convert", str(src), "-o", str(out), "--calib-text", str(empty))
    assert "not found" in error_of(capsys, "convert", str(tmp_path / "nope.gguf"), "-o", str(out))
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    err = error_of(capsys, "convert", str(gpt2), "-o", str(out))
    assert "unsupported architecture 'gpt2'" in err and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in Path(src).iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "missing or corrupt" in error_of(capsys, "convert", str(corrupt), "-o", str(out))

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "mla-zoo did not write" in error_of(capsys, "convert", str(src), "-o", str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_numbers_are_checked_when_the_flags_are_parsed(source_dir, tmp_path, capsys):
    """Before any model loads: each bad value exits 2 with a line naming the flag and the valid range."""
    src, out = source_dir("llama-gqa"), tmp_path / "out"
    heldout = str(DATA / "heldout.txt")
    for argv, message in [
        (["eval", str(src), "--text", heldout, "--seq-len", "1"], "--seq-len must be an int >= 2 (got 1)"),
        (["eval", str(src), "--text", heldout, "--max-tokens", "0"], "--max-tokens must be an int >= 2 (got 0)"),
        (["eval", str(src), "--text", str(tmp_path / "none.txt")], "--text names a file that does not exist"),
        (["convert", str(src), "-o", str(out), "--eval-seq-len", "1"], "--eval-seq-len must be an int >= 2 (got 1)"),
        (["convert", str(src), "-o", str(out), "--kv-rank", "0"], "--kv-rank must be an int >= 1 (got 0)"),
        (["convert", str(src), "-o", str(out), "--eval-text", str(tmp_path / "none.txt")],
         "--eval-text names a file that does not exist"),
        (["synth-data", str(src), "-o", str(out), "--tokens", "10", "--temperature", "0"],
         "--temperature must be a number > 0 (got 0.0)"),
    ]:
        assert "error: " + message in error_of(capsys, *argv), argv
    assert not out.exists()


def test_every_command_has_a_help_line_and_there_is_a_version(capsys):
    from mla_zoo.zoo.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert {"convert", "eval", "synth-data", "finetune", "build", "publish", "list", "info", "pull"} <= set(
        commands.choices)
    assert all(action.help for action in commands._choices_actions)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("mla-zoo ")


def test_failed_save_leaves_no_partial_checkpoint(tmp_path):
    """A failure while writing (here: the tokenizer cannot be saved) removes the temporary dir."""
    from conftest import convert_tiny, tiny_source
    from mla_zoo.modeling.convert import save_checkpoint

    mla, report = convert_tiny(tiny_source("llama-gqa"), rope_pairs=2, kv_lora_rank=8)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(mla, BrokenTokenizer(), report, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_convert_from_a_hub_id(source_dir, tmp_path):
    """SOURCE as a Hub id: the real huggingface_hub client downloads it from the local test Hub."""
    from hub_server import HubServer
    from huggingface_hub import HfApi

    with HubServer() as hub:
        api = HfApi(endpoint=hub.endpoint, token="test-token")
        api.create_repo("mla-zoo/tiny-llama")
        api.upload_folder(repo_id="mla-zoo/tiny-llama", folder_path=str(source_dir("llama-gqa")))
        out = tmp_path / "mla"
        proc = subprocess.run(
            [sys.executable, "-m", "mla_zoo.zoo.cli", "convert", "mla-zoo/tiny-llama", "-o", str(out),
             "--rope-strategy", "high", "--svd", "joint", "--json"],
            capture_output=True, text=True, env=hub.client_env(tmp_path / "hf_home"), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        assert report["source"]["spec"] == "mla-zoo/tiny-llama"
        assert report["source"]["base_model"] == "mla-zoo/tiny-llama"
        assert (out / "model.safetensors").is_file()
        assert not hub.errors


def test_eval_reports_teacher_agreement_and_behaviour(source_dir, tmp_path, capsys):
    """`mla-zoo eval --teacher --prompts`: a lossless conversion agrees with its teacher everywhere."""
    src = source_dir("llama-gqa")
    out = tmp_path / "mla"
    assert convert(src, out, "--rope-strategy", "high", "--rope-pairs", "8", "--kv-rank", "32") == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(DATA / "heldout.txt"), "--max-tokens", "600", "--seq-len", "200",
                 "--teacher", str(src), "--prompts", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1_agreement"] > 0.99
    assert result["perplexity"] == pytest.approx(result["teacher_perplexity"], rel=1e-4)
    assert len(result["behaviour"]) == 31 and all("answer" in b for b in result["behaviour"])  # behaviour.jsonl
    assert result["tokens"] == 597  # 3 windows of 200 tokens, each scoring 199


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loading_snippet_asks_nothing(source_dir, tmp_path):
    """The README's snippet for loading a converted checkpoint, run as written (its path swapped for a tiny
    checkpoint) with stdin closed: no y/N prompt for remote code, for the tokenizer either."""
    import re

    out = tmp_path / "mla"
    assert convert(source_dir("llama-gqa"), out, "--rope-strategy", "high", "--svd", "joint") == 0
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                   if "AutoTokenizer.from_pretrained(\"out/smollm2-mla\"" in block)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", snippet.replace("out/smollm2-mla", str(out))], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "[y/N]" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_readme_says_where_build_writes():
    """`mla-zoo build RECIPE -o DIR` writes DIR/hub/ and DIR/release.json (tests/test_zoo.py checks the code):
    the README says the same for its own example."""
    import re

    text = README.read_text()
    out = re.search(r"mla-zoo build \S+ -o (\S+)", text)[1]
    assert f"`{out}/hub/`" in text and f"`{out}/release.json`" in text
    assert f"mla-zoo publish {out}" in text and "`out/hub/`" not in text


def test_no_progress_bars_when_stderr_is_not_a_terminal(source_dir, tmp_path, capsys):
    """A log file gets no progress-bar lines: not mla-zoo's (conversion, calibration, perplexity, data
    packing, the Trainer's), nor transformers' and huggingface_hub's own ("Loading weights")."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging

    src, out = source_dir("llama-gqa"), tmp_path / "mla"
    capsys.readouterr()
    logging.enable_progress_bar()  # as in a fresh process: main() turns them off itself
    enable_progress_bars()
    assert main(["convert", str(src), "-o", str(out), "--calib-text", str(DATA / "calib.txt"), "--calib-tokens",
                 "256", "--eval-text", str(DATA / "heldout.txt"), "--eval-tokens", "300", "--eval-seq-len", "100"]) == 0
    assert main(["eval", str(out), "--text", str(DATA / "heldout.txt"), "--max-tokens", "300", "--seq-len", "100"]) == 0
    assert main(["finetune", str(out), "-o", str(tmp_path / "ft"), "--teacher", str(src), "--data",
                 str(DATA / "calib.txt"), "--seq-len", "32", "--batch-size", "2", "--max-steps", "2",
                 "--save-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s]" not in err and "%|" not in err, err[-2000:]


def test_help_does_not_import_torch():
    """Browsing the zoo starts fast: `mla-zoo --help` and `mla-zoo list --help` never load torch."""
    code = ("import sys\n"
            "from mla_zoo.zoo.cli import main\n"
            "for argv in (['--help'], ['list', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: mla-zoo list" in proc.stdout
