"""Data-free recovery: `mla-zoo finetune --data teacher:MIX` samples its data from the teacher first, and
`--on-policy` trains on rows the student writes itself (tiny models, CPU)."""

from __future__ import annotations

import json

import torch
from conftest import convert_tiny, tiny_source
from mla_zoo.zoo.cli import main
from mla_zoo.zoo.train.distill import on_policy_step, student_rows
from mla_zoo.zoo.train.finetune import compile_pays
from mla_zoo.zoo.train.settings import COMPILE_PAYS_TOKENS, FinetuneSettings


def test_finetune_on_the_teacher_s_own_samples_and_the_student_s_rows(source_dir, tmp_path):
    teacher = source_dir("llama-gqa")
    lossy = tmp_path / "lossy"
    assert main(["convert", str(teacher), "-o", str(lossy), "--rope-pairs", "1", "--kv-rank", "8",
                 "--rope-strategy", "high", "--svd", "joint", "--dtype", "float32"]) == 0
    out = tmp_path / "run"
    code = main(["finetune", str(lossy), "-o", str(out), "--teacher", str(teacher), "--data",
                 "teacher:chat=0.5+bos=0.5", "--seq-len", "32", "--batch-size", "2", "--max-steps", "4",
                 "--stages", "global", "--on-policy", "0.5", "--logging-steps", "1", "--save-steps", "100",
                 "--no-progress"])
    assert code == 0
    report = json.loads((out / "training.json").read_text())
    assert report["data"]["kind"] == "teacher" and report["data"]["name"] == "chat=0.5+bos=0.5"
    synth = json.loads((out / "synth" / "part-0" / "synth.json").read_text())
    assert synth["tokens"] >= 4 * 2 * 32 and set(synth["tokens_by_source"]) == {"chat", "bos"}
    logged = [h["on_policy"] for h in report["stages"]["global"]["log_history"] if "on_policy" in h]
    want = [float(on_policy_step(0.5, 0, step)) for step in range(4)]
    assert logged == want and 0 < sum(want) < 4  # this seed draws both kinds of step


def test_student_rows_keep_the_prefix_and_the_row_length():
    model, _ = convert_tiny(tiny_source("llama-gqa"), rope_pairs=2, kv_lora_rank=8)
    ids = torch.randint(3, 300, (3, 20))
    model.train()
    torch.manual_seed(0)
    rows = student_rows(model, ids, 8)
    assert rows.shape == ids.shape and torch.equal(rows[:, :8], ids[:, :8]) and model.training
    assert not torch.equal(rows[:, 8:], ids[:, 8:])


def test_compile_pays_from_the_measured_break_even():
    big = FinetuneSettings(data="x", max_steps=COMPILE_PAYS_TOKENS // (8 * 1024) + 1)
    small = FinetuneSettings(data="x", max_steps=100)
    assert compile_pays(big, cuda=True) and not compile_pays(small, cuda=True) and not compile_pays(big, cuda=False)


def test_a_run_killed_while_sampling_its_data_resumes(source_dir, tmp_path, monkeypatch):
    """The run directory is the run's (run.json) before the teacher's samples are drawn: a run killed while
    sampling is continued with `--resume` (and could be replaced with `--overwrite`), not refused as a
    directory mla-zoo did not write. The resumed run equals an uninterrupted one."""
    from mla_zoo.zoo.train import synth
    from safetensors.torch import load_file

    teacher = source_dir("llama-gqa")
    lossy = tmp_path / "lossy"
    assert main(["convert", str(teacher), "-o", str(lossy), "--rope-pairs", "1", "--kv-rank", "8",
                 "--rope-strategy", "high", "--svd", "joint", "--dtype", "float32"]) == 0

    def finetune(out, *extra):
        return main(["finetune", str(lossy), "-o", str(out), "--teacher", str(teacher), "--data", "teacher:bos=1",
                     "--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--stages", "global",
                     "--save-steps", "100", "--no-progress", *extra])

    assert finetune(tmp_path / "full") == 0
    real = synth.sample_chunks

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed while sampling")

    with monkeypatch.context() as mp:
        mp.setattr(synth, "sample_chunks", killed)
        try:
            finetune(tmp_path / "run")
        except KeyboardInterrupt:
            pass
    assert (tmp_path / "run" / "run.json").is_file() and not (tmp_path / "run" / "training.json").exists()
    assert finetune(tmp_path / "run", "--resume") == 0
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
