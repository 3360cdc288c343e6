"""Fine-tuning by distillation: the losses against plain references, the layer-wise targets, a
short global run, exact resume, input errors, and 2-process (gloo) DDP runs, one killed and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, REPO, convert_tiny, tiny_source
from mla_zoo.zoo.cli import main
from mla_zoo.zoo.train.data import pack_rows
from mla_zoo.zoo.train.distill import LayerwiseStudent, distill_loss, teacher_layer_io
from mla_zoo.zoo.train.finetune import compile_layers
from reference import reference_kl


def peaked_source(seed: int = 0):
    """A tiny GQA model whose next-token distributions are far from uniform (a random model's are
    nearly flat, which makes every KL tiny)."""
    model = tiny_source("llama-gqa", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    """Teacher dir, a lossy and a lossless conversion of it (written by `mla-zoo convert`)."""
    root = tmp_path_factory.mktemp("ft")
    teacher = root / "teacher"
    peaked_source().save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    lossy = root / "lossy"
    assert main(["convert", str(teacher), "-o", str(lossy), "--rope-pairs", "1", "--kv-rank", "8",
                 "--rope-strategy", "high", "--svd", "joint"]) == 0
    other = root / "other"  # another model of the same shape: a different conversion
    assert main(["convert", str(teacher), "-o", str(other), "--rope-pairs", "2", "--kv-rank", "8",
                 "--rope-strategy", "high", "--svd", "joint"]) == 0
    return {"root": root, "teacher": teacher, "lossy": lossy, "other": other}


@torch.no_grad()
def kl_to_teacher(student, teacher, rows) -> float:
    return float(reference_kl(student(rows).logits.double(), teacher(rows).logits.double()))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def test_compiled_layers_train_as_the_eager_model_with_one_graph_for_all_layers():
    """`compile` (finetune.compile_layers, regional compilation): the loss and every gradient as in eager mode
    (fp32, inductor on the CPU), the state dict's names unchanged, and ONE dynamo graph serving every layer."""
    import copy

    from torch._dynamo.utils import counters

    eager, _ = convert_tiny(tiny_source("llama-gqa"), rope_pairs=2, kv_lora_rank=8)
    eager.train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(compiled)
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))  # [B, S]
    losses = []
    for m in (eager, compiled):
        loss = m(input_ids=ids, use_cache=False).logits.float().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert len(eager.model.layers) == 2 and counters["stats"]["unique_graphs"] == 1
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_layerwise_targets_of_a_compiled_teacher_are_the_eager_ones_at_every_step():
    """`teacher_layer_io` on a teacher whose layers `compile` compiled (finetune compiles the teacher before both
    stages): its hooks see every call's own inputs and attention outputs. On the H100 (torch 2.11) the hooks inside
    the compiled layers were not called and the layer-wise stage failed on empty targets; it runs eagerly now."""
    import copy

    from mla_zoo.zoo.train.distill import teacher_layer_io

    eager = tiny_source("llama-gqa").eval()
    compiled = copy.deepcopy(eager)
    compile_layers(compiled)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second call: hooks registered anew, after the first call compiled
        ids = torch.randint(0, 384, (2, 16), generator=g)  # [B, S]
        got, want = teacher_layer_io(compiled, ids), teacher_layer_io(eager, ids)
        for got_part, want_part in zip(got, want, strict=True):  # layer inputs, then attention outputs
            assert len(got_part) == len(want_part) == 2
            for a, b in zip(got_part, want_part, strict=True):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_chunked_kl_equals_unchunked_with_gradients(ce_weight):
    g = torch.Generator().manual_seed(0)
    b, s, h, v, temp = 2, 7, 6, 11, 2.0
    s_head = torch.nn.Linear(h, v, bias=False).double()
    t_head = torch.nn.Linear(h, v, bias=False).double()
    s_hidden = torch.randn(b, s, h, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 5:] = 0  # right padding

    loss, parts = distill_loss(s_hidden, t_hidden, s_head, t_head, ids, mask, temp, ce_weight, chunk_size=3)
    grads = torch.autograd.grad(loss, [s_hidden, s_head.weight])

    keep = mask.bool()
    s_logits, t_logits = s_head(s_hidden), t_head(t_hidden)
    want = reference_kl(s_logits[keep], t_logits[keep], temp)
    if ce_weight:
        targets = ids[:, 1:][mask[:, 1:].bool()]
        ce = torch.nn.functional.cross_entropy(s_logits[:, :-1][mask[:, 1:].bool()], targets)
        want = want + ce_weight * ce
    want_grads = torch.autograd.grad(want, [s_hidden, s_head.weight])
    # chunks compute their softmax in fp32, so agreement is to fp32 precision
    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, want.item())
    for got, ref in zip(grads, want_grads, strict=True):
        assert (got - ref).abs().max().item() < 1e-5
    assert set(parts) == ({"kl", "ce"} if ce_weight else {"kl"})


def test_layerwise_loss_is_zero_for_a_lossless_conversion():
    teacher = peaked_source()
    cfg = teacher.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    student, _ = convert_tiny(teacher, rope_pairs=head_dim // 2,
                              kv_lora_rank=min(cfg.num_key_value_heads * head_dim, cfg.hidden_size))
    ids = torch.randint(3, cfg.vocab_size, (2, 20))
    inputs, targets = teacher_layer_io(teacher, ids)
    with torch.no_grad():
        loss, parts = LayerwiseStudent(student)(inputs, targets)
        # the hooked targets are the teacher's attention outputs: the residual stream adds up
        h1 = inputs[0] + targets[0] + teacher.model.layers[0].mlp(
            teacher.model.layers[0].post_attention_layernorm(inputs[0] + targets[0]))
    assert torch.allclose(h1, inputs[1], atol=1e-5)
    assert float(loss) < 1e-8
    assert parts["per_layer"].shape == (cfg.num_hidden_layers,)


def test_layerwise_loss_decreases_for_a_lossy_conversion():
    teacher = peaked_source()
    student, _ = convert_tiny(teacher, rope_pairs=1, kv_lora_rank=8)
    wrapper = LayerwiseStudent(student)
    student.requires_grad_(False)
    for layer in student.model.layers:
        layer.self_attn.requires_grad_(True)
    opt = torch.optim.Adam([p for p in wrapper.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(3, teacher.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    inputs, targets = teacher_layer_io(teacher, ids)
    losses = []
    for _ in range(8):
        loss, _ = wrapper(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[0] > 0.05
    assert losses[-1] < 0.7 * losses[0]


def test_layerwise_on_student_inputs_is_the_stage_fed_the_students_own_hidden_states():
    """inputs "student" equals the teacher-input stage fed the hidden states of an ordinary student forward
    (detached): the same loss and the same gradients for every block; the MLPs, run without grad, get none."""
    teacher = peaked_source()
    student, _ = convert_tiny(teacher, rope_pairs=1, kv_lora_rank=8)
    ids = torch.randint(3, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    inputs, targets = teacher_layer_io(teacher, ids)
    with torch.no_grad():
        hidden = student(ids, output_hidden_states=True).hidden_states[:-1]  # layer l's input, l < n_layers
    assert not torch.allclose(hidden[1], inputs[1], atol=1e-3)  # lossy: the two trajectories part
    attn = [p for layer in student.model.layers for p in layer.self_attn.parameters()]
    loss, parts = LayerwiseStudent(student, "student")(inputs, targets)
    grads = torch.autograd.grad(loss, attn)
    want, want_parts = LayerwiseStudent(student)(list(hidden), targets)
    want_grads = torch.autograd.grad(want, attn)
    assert torch.allclose(loss, want, rtol=1e-5) and torch.allclose(parts["per_layer"], want_parts["per_layer"],
                                                                    rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)
    loss, _ = LayerwiseStudent(student, "student")(inputs, targets)
    loss.backward()
    assert all(p.grad is None for layer in student.model.layers for p in layer.mlp.parameters())


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def test_the_global_stage_can_train_the_attention_blocks_alone(dirs):
    """`trainable` attention: every weight outside the attention blocks (embeddings, MLPs, norms, head) is written
    back bit for bit, the attention blocks change, and the KL falls."""
    from safetensors.torch import load_file

    out = dirs["root"] / "attention-only"
    assert main(["finetune", str(dirs["lossy"]), "-o", str(out), "--teacher", str(dirs["teacher"]), "--data",
                 str(DATA / "calib.txt"), "--seq-len", "48", "--batch-size", "4", "--max-steps", "6", "--lr", "2e-3",
                 "--stages", "global", "--trainable", "attention", "--warmup-ratio", "0", "--logging-steps", "1",
                 "--save-steps", "100", "--no-progress"]) == 0
    before, after = load_file(dirs["lossy"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".mlp." in k for k in before) and any("embed" in k for k in before)
    assert changed and all(".self_attn." in k for k in changed), sorted(changed)
    report = json.loads((out / "training.json").read_text())
    assert report["settings"]["trainable"] == "attention"
    losses = [h["loss"] for h in report["stages"]["global"]["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]


def test_cli_run_both_stages_lowers_kl_and_writes_a_checkpoint(dirs, tokenizer):
    from mla_zoo.zoo.evaluate.evaluation import load_model

    out = dirs["root"] / "run"
    code = main(["finetune", str(dirs["lossy"]), "-o", str(out), "--teacher", str(dirs["teacher"]),
                 "--data", str(DATA / "calib.txt"), "--seq-len", "48", "--batch-size", "4", "--max-steps", "8",
                 "--lr", "3e-4", "--stages", "layerwise,global", "--layerwise-steps", "4", "--layerwise-lr", "2e-3",
                 "--warmup-ratio", "0", "--logging-steps", "1", "--save-steps", "100", "--eval-text",
                 str(DATA / "heldout.txt"), "--eval-every", "4", "--eval-tokens", "240", "--no-progress"])
    assert code == 0
    report = json.loads((out / "training.json").read_text())
    assert (out / "training.png").is_file() and (out / "modeling_llama_mla.py").is_file()
    assert (out / "conversion.json").read_text() == (dirs["lossy"] / "conversion.json").read_text()
    assert report["stage_steps"] == {"layerwise": 4, "global": 8}
    assert report["tokens_seen"] == 12 * 4 * 48
    layer_losses = [h["loss"] for h in report["stages"]["layerwise"]["log_history"] if "loss" in h]
    assert layer_losses[-1] < layer_losses[0]
    assert [p["step"] for p in report["perplexity_curve"]] == [0, 4, 0, 4, 8]
    assert report["throughput_tokens_per_second"]["global"] > 0
    assert report["stages"]["global"]["kl_impl"] == "fused"  # `auto` without CUDA and liger; no CE term
    assert report["stages"]["layerwise"]["kl_impl"] is None
    assert not list(out.glob("checkpoints/*/checkpoint-*/training_args.bin"))  # no pickles left

    teacher, _ = load_model(str(dirs["teacher"]))
    before, _ = load_model(str(dirs["lossy"]))
    after, _ = load_model(str(out))  # through the remote code, as users load it
    rows = pack_rows(str(DATA / "calib.txt"), tokenizer, 48, max_rows=32, progress=False).long()  # the rows it saw
    kl_before, kl_after = kl_to_teacher(before, teacher, rows), kl_to_teacher(after, teacher, rows)
    assert kl_after < 0.85 * kl_before, (kl_before, kl_after)


class CrashAt:
    """Simulates a crash right after the Trainer saved checkpoint-`step`."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt("simulated crash")

        return _Crash()


def test_resume_after_a_crash_matches_an_uninterrupted_run(dirs):
    from mla_zoo.zoo.train.finetune import run_finetune
    from mla_zoo.zoo.train.report import TrainingReport
    from mla_zoo.zoo.train.settings import FinetuneSettings
    from safetensors.torch import load_file

    settings = FinetuneSettings(data=str(DATA / "calib.txt"), seq_len=32, batch_size=2, max_steps=6, save_steps=3,
                                learning_rate=2e-3, logging_steps=1)
    full = dirs["root"] / "full"
    run_finetune(dirs["lossy"], full, str(dirs["teacher"]), settings, progress=False)
    crashed = dirs["root"] / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(dirs["lossy"], crashed, str(dirs["teacher"]), settings, progress=False, callbacks=[CrashAt(3)])
    assert (crashed / "checkpoints" / "global" / "checkpoint-3").is_dir()
    assert not (crashed / "training.json").exists()
    report = run_finetune(dirs["lossy"], crashed, str(dirs["teacher"]), settings, resume=True, progress=False)
    assert report.stages["global"].resumed_from.endswith("checkpoint-3")
    assert report.stages["global"].session_steps == 3
    # the whole report is written, and read back the same
    assert TrainingReport.read(crashed) == report
    # a finished run is not trained again: its report is returned as it is
    again = run_finetune(dirs["lossy"], crashed, str(dirs["teacher"]), settings, resume=True, progress=False)
    assert again == report

    def final_loss(path):
        history = json.loads((path / "training.json").read_text())["stages"]["global"]["log_history"]
        return [h for h in history if "loss" in h][-1]

    a, b = final_loss(full), final_loss(crashed)
    assert a["step"] == b["step"] == 6
    assert abs(a["loss"] - b["loss"]) < 1e-6 * max(1.0, a["loss"])
    wa, wb = load_file(full / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-6


class FailSave:
    """Simulates a run killed while the Trainer saves checkpoint-`step`: torch.save of the scheduler
    (written after the weights and the optimizer) fails."""

    def __init__(self, monkeypatch, step: int):
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith(f"checkpoint-{step}/scheduler.pt"):
                raise KeyboardInterrupt("killed while saving")
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)


def test_a_run_killed_while_saving_resumes_from_the_newest_complete_checkpoint(dirs, monkeypatch, capsys):
    """Checkpoints are written in a staging dir and renamed into place whole; --resume skips (and removes)
    an incomplete one, saying which checkpoint it resumes from and why."""
    from mla_zoo.zoo.train.finetune import run_finetune
    from mla_zoo.zoo.train.settings import FinetuneSettings
    from safetensors.torch import load_file

    settings = FinetuneSettings(data=str(DATA / "calib.txt"), seq_len=32, batch_size=2, max_steps=6, save_steps=2,
                                learning_rate=2e-3, logging_steps=1, stages=("global",), save_total_limit=5)
    full = dirs["root"] / "full-2"
    run_finetune(dirs["lossy"], full, str(dirs["teacher"]), settings, progress=False)
    killed = dirs["root"] / "killed"
    with monkeypatch.context() as mp:
        FailSave(mp, 4)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(dirs["lossy"], killed, str(dirs["teacher"]), settings, progress=False)
    ckpts = killed / "checkpoints" / "global"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2"]  # the partial one is not there
    assert (ckpts / ".staging" / "checkpoint-4" / "model.safetensors").is_file()  # it stayed in the staging dir
    # what a kill -9 while saving left in the versions that wrote checkpoints in place
    (ckpts / "checkpoint-4").mkdir()
    capsys.readouterr()
    report = run_finetune(dirs["lossy"], killed, str(dirs["teacher"]), settings, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint-4 is incomplete (no trainer_state.json: its save was interrupted): removed" in err
    assert "resuming from checkpoint-2, the newest complete checkpoint" in err
    assert report.stages["global"].resumed_from.endswith("checkpoint-2") and report.stages["global"].session_steps == 4
    assert not (ckpts / ".staging").exists()
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    wa, wb = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-6
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no temporary dir left in the run dir


def test_a_five_step_run_trains_its_one_step_layerwise_stage(dirs):
    """`--max-steps 5` gives the layer-wise stage 1 step: warm-up rounding must not leave it at learning rate 0."""
    from mla_zoo.zoo.train.finetune import run_finetune
    from mla_zoo.zoo.train.settings import FinetuneSettings
    from safetensors.torch import load_file

    settings = FinetuneSettings(data=str(DATA / "calib.txt"), seq_len=32, batch_size=2, max_steps=5, logging_steps=1)
    out = dirs["root"] / "five"
    report = run_finetune(dirs["lossy"], out, str(dirs["teacher"]), settings, progress=False)
    assert report.stage_steps == {"layerwise": 1, "global": 5}
    before, after = load_file(dirs["lossy"] / "model.safetensors"), load_file(out / "stages" / "layerwise" /
                                                                             "model.safetensors")
    changed = [k for k in before if "self_attn" in k and not torch.equal(before[k], after[k])]
    assert changed, "the layer-wise stage left every attention weight as it was"
    assert all(torch.equal(before[k], after[k]) for k in before if "self_attn" not in k)


def test_perplexity_windows_do_not_follow_the_training_rows(dirs, capsys):
    """Training on 32-token rows, the perplexity during training keeps `mla-zoo eval`'s 1024-token windows
    (here capped by the tiny model's 256 positions, which it says), so the two numbers compare."""
    from mla_zoo.zoo.train.finetune import run_finetune
    from mla_zoo.zoo.train.settings import FinetuneSettings

    settings = FinetuneSettings(data=str(DATA / "calib.txt"), seq_len=32, batch_size=2, max_steps=1,
                                stages=("global",), eval_text=str(DATA / "heldout.txt"), eval_tokens=600)
    report = run_finetune(dirs["lossy"], dirs["root"] / "windows", str(dirs["teacher"]), settings, progress=False)
    assert report.settings.eval_seq_len == 256
    assert "perplexity windows of 256 tokens, the model's max_position_embeddings" in capsys.readouterr().err


def test_training_reports_of_the_first_format_still_load():
    from mla_zoo.zoo.train.report import TrainingReport

    report = TrainingReport.read(REPO / "bench" / "results" / "recovery" / "ft32.training.json")  # unversioned
    assert report.settings.learning_rate == 3e-4 and report.settings.layerwise_lr == 1e-3  # was "lr"
    assert report.stages["global"].learning_rate == 3e-4 and report.stage_steps == {"layerwise": 150, "global": 300}
    assert TrainingReport.from_json(report.to_json()) == report


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_input_errors_are_clear(dirs, tmp_path, capsys, tokenizer):
    base = ["finetune", str(dirs["lossy"]), "--teacher", str(dirs["teacher"]), "--max-steps", "1", "--no-progress",
            "--seq-len", "32"]
    # numbers are checked when the flags are parsed, before anything loads
    code, err = run_cli(capsys, *base, "-o", str(tmp_path / "a"), "--data", "x", "--batch-size", "0")
    assert code == 2 and "--batch-size must be an int >= 1 (got 0)" in err
    code, err = run_cli(capsys, *base, "-o", str(tmp_path / "a"), "--data", "x", "--tokens", "5")
    assert code == 2 and "give --tokens or --max-steps, not both" in err
    code, err = run_cli(capsys, *base, "-o", str(tmp_path / "a"), "--data", "x", "--warmup-ratio", "1")
    assert code == 2 and "--warmup-ratio must be a number in [0, 1) (got 1.0)" in err
    code, err = run_cli(capsys, *base, "-o", str(tmp_path / "a"), "--data", "x", "--stages", "global,middle")
    assert code == 2 and "--stages must be one of layerwise, global (got 'middle')" in err
    assert not (tmp_path / "a").exists()
    code, err = run_cli(capsys, *base, "-o", str(tmp_path / "a"), "--data", str(tmp_path / "*.jsonl"))
    assert code == 2 and "--data" in err and "matches no files" in err
    code, err = run_cli(capsys, *base, "-o", str(tmp_path / "a"), "--data", str(DATA / "calib.txt"),
                        "--seq-len", "512")
    assert code == 2 and "--seq-len 512 is beyond the model's max_position_embeddings (256)" in err

    # a teacher whose tokenizer encodes text differently (same vocabulary size)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([(DATA / "heldout.txt").read_text()[::-1]], trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrong = tmp_path / "wrong-teacher"
    peaked_source().save_pretrained(wrong)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(
        wrong)
    code, err = run_cli(capsys, "finetune", str(dirs["lossy"]), "--teacher", str(wrong), "--max-steps", "1",
                        "-o", str(tmp_path / "b"), "--data", str(DATA / "calib.txt"), "--seq-len", "32",
                        "--no-progress")
    assert code == 2 and "encodes text differently" in err

    # --resume into a run directory whose checkpoints come from another model
    first = tmp_path / "first"
    args = ["--teacher", str(dirs["teacher"]), "--data", str(DATA / "calib.txt"), "--seq-len", "32",
            "--batch-size", "2", "--max-steps", "1", "--no-progress", "-o", str(first)]
    assert main(["finetune", str(dirs["lossy"]), *args]) == 0
    capsys.readouterr()
    code, err = run_cli(capsys, "finetune", str(dirs["other"]), *args, "--resume")
    assert code == 2 and "trained from another model" in err
    code, err = run_cli(capsys, "finetune", str(dirs["lossy"]), *args)  # neither --resume nor --overwrite
    assert code == 2 and "--overwrite" in err
    code, err = run_cli(capsys, "finetune", str(dirs["lossy"]), *args[:-1], str(tmp_path / "none"), "--resume")
    assert code == 2 and "nothing to resume" in err


# ----------------------------------------------------------------------------------------------
# Two processes (DDP over gloo on CPU)
# ----------------------------------------------------------------------------------------------


def test_two_process_gloo_run(dirs):
    out = dirs["root"] / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mla_zoo.zoo.cli", "finetune", str(dirs["lossy"]), "-o", str(out), "--teacher", str(dirs["teacher"]),
           "--data", str(DATA / "calib.txt"), "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
           "--stages", "layerwise,global", "--layerwise-steps", "2", "--save-steps", "2", "--gradient-checkpointing",
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, failure(proc)
    report = json.loads((out / "training.json").read_text())
    assert report["world_size"] == 2 and report["replicas_in_sync"]
    assert report["tokens_per_step"] == 2 * 2 * 32
    assert report["stages"]["global"]["steps"] == 3
    assert (out / "model.safetensors").is_file()
    assert Path(out / "checkpoints" / "global" / "checkpoint-3").is_dir()


def failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed torchrun printed: every process's traceback (the first failure is usually not the
    last one printed, which is the main process's broken collective)."""
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    return "\n".join(errors[-40:]) + "\n--- the end of stderr ---\n" + proc.stderr[-3000:]


def torchrun_finetune(dirs, out, *extra) -> list[str]:
    """`mla-zoo finetune` in 2 CPU processes (gloo): a global stage of 12 steps, a checkpoint every 2."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mla_zoo.zoo.cli", "finetune", str(dirs["lossy"]), "-o", str(out), "--teacher", str(dirs["teacher"]),
            "--data", str(DATA / "calib.txt"), "--seq-len", "32", "--batch-size", "2", "--max-steps", "12",
            "--stages", "global", "--save-steps", "2", "--lr", "2e-3", "--logging-steps", "1", "--no-progress", *extra]


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(dirs):
    """SIGKILL of torchrun and both workers once the first checkpoint is in place, then `--resume` with
    2 processes again: the losses and final weights are those of a run that was never stopped, and the
    losses those of 1 process at the same global batch."""
    import time

    import psutil
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    full, killed = dirs["root"] / "ddp-full", dirs["root"] / "ddp-killed"
    proc = subprocess.run(torchrun_finetune(dirs, full), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, failure(proc)

    first = killed / "checkpoints" / "global" / "checkpoint-2"
    run = subprocess.Popen(torchrun_finetune(dirs, killed), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not first.is_dir() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    family = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]  # torchrun + workers
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)
    assert first.is_dir() and not (killed / "training.json").exists(), "the run was not killed mid-way"

    proc = subprocess.run(torchrun_finetune(dirs, killed, "--resume"), env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, failure(proc)
    report = json.loads((killed / "training.json").read_text())
    resumed = report["stages"]["global"]["resumed_from"]
    assert report["world_size"] == 2 and resumed and 2 <= int(resumed.rsplit("-", 1)[1]) < 12

    def losses(path):
        history = json.loads((path / "training.json").read_text())["stages"]["global"]["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    # bit for bit on CPU: the same losses at every step (before the kill and after) and the same weights
    a, b = losses(full), losses(killed)
    assert max(a) == 12 and a == b
    # and the same losses as ONE process at the same global batch (2 rows x 2 accumulated micro-batches)
    one = dirs["root"] / "one-process"
    cmd = torchrun_finetune(dirs, one, "--grad-accum", "2")
    proc = subprocess.run([sys.executable, *cmd[cmd.index("-m", 2):]], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, failure(proc)
    c = losses(one)
    assert c.keys() == a.keys() and max(abs(a[k] - c[k]) for k in a) < 1e-6
    wa, wb = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no temporary dir left in the run dir
