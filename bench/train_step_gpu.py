"""Where a step of finetune's global stage goes: the frozen teacher's forward, the student's forward, the
vocabulary-sized KL loss, the backward, gradient clipping and the AdamW step, each timed on its own, side by
side for every `kl_impl` that runs here (liger where Liger-Kernel is installed, fused, chunked), against the
whole step as `transformers.Trainer` runs it, with a CUDA-kernel profile of one step of each.

    python bench/train_step_gpu.py --out $OUT/train_step.json   # GPU; ~2 minutes (+~2 per variant with --compile)
    python bench/train_step_gpu.py --tiny --out /tmp/ts.json    # CPU check of the script: tiny model, seconds

The models are built as finetune's global stage builds them: the teacher is `sources.resolve(--teacher)` in
fp32, then frozen and cast to bf16 on CUDA (`finetune.prepare`); the student is a d_kv=32 conversion of it
(4 RoPE pairs per head, weight-only SVD: the recipe's shapes, speed does not depend on the weights), saved and
loaded back in fp32 as finetune loads it (`finetune.load_student`), or `--student DIR`. The Trainer is
`trainers.GlobalTrainer` with `trainers.training_args` (fp32 master weights under bf16 autocast, fused AdamW,
clip 1.0), so its `compute_loss` and `kl_impl` resolution (`distill.pick_kl_impl`) are the run's own.
Inputs are random token ids (time does not depend on the text).

For each variant: `Trainer.train()` runs `--warmup` + `--steps` + 1 steps; the whole step ("trainer") is the
median time between two steps' starts (`on_step_begin`: data loading, the Trainer's per-step
`isnan(loss)` sync and callbacks included). Then `--steps` steps run part by part through the same Trainer
(`training_step` with forward hooks on the teacher and the student and a mark after `compute_loss`, then
`accelerator.clip_grad_norm_`, `optimizer.step`, `lr_scheduler.step`, `zero_grad`), each after a
synchronize; parts are CUDA-event times (host `perf_counter` times beside them: a part whose host time is
close to its GPU time is launch-bound), medians over the steps. Shares are of the sum of parts. The
profile is one such step under `torch.profiler`: the top CUDA kernels (name, ms, calls) and the kernel time
of the whole step (busy share: kernel time / step time). On CPU (`--tiny`) every time is host time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from mla_zoo.modeling import sources
from mla_zoo.modeling.convert import convert_model, save_checkpoint
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.train import data as data_mod
from mla_zoo.zoo.train import distill
from mla_zoo.zoo.train.distill import liger_available
from mla_zoo.zoo.train.finetune import compile_layers, load_student, ready_student
from mla_zoo.zoo.train.settings import FinetuneSettings
from transformers import TrainerCallback

PARTS = ("teacher_fwd", "student_fwd", "loss", "backward", "clip", "optimizer", "other")
VARIANTS = ("liger", "fused", "fused-eager", "chunked")  # fused-eager: the fused loss's chunk not compiled on CUDA


# ------------------------------------------------------------------------------------------ clock


class Clock:
    """Marks on the GPU timeline (CUDA events) and on the host (perf_counter); host only on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self) -> tuple:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return event, time.perf_counter()

    def ms(self, a: tuple, b: tuple) -> float:
        """Device ms from mark a to mark b (call after a synchronize)."""
        return a[0].elapsed_time(b[0]) if self.cuda else (b[1] - a[1]) * 1e3

    @staticmethod
    def host_ms(a: tuple, b: tuple) -> float:
        return (b[1] - a[1]) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Marks the start and end of every optimizer step the Trainer runs."""

    def __init__(self, clock: Clock):
        self.clock, self.begins, self.ends = clock, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(self.clock.mark())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self.clock.mark())


# ------------------------------------------------------------------------------------------ models


def tiny_teacher():
    """A tiny random Llama (as tests/conftest.py's `tiny_source`), fp32, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), None, sources.SourceInfo("tiny", "tiny", "tiny", "llama", "0")


def convert_student(teacher, tokenizer, info, out: Path, tiny: bool) -> Path:
    """The teacher converted (fixed RoPE pairs, weight-only SVD: no calibration) and saved as `mla-zoo convert`
    saves it; d_kv=32 with 4 RoPE pairs per head (the smollm2-135m-dkv32 recipe's shapes), 8 and 1 when tiny."""
    settings = ConvertSettings(kv_rank_per_head=8 if tiny else 32, rope_pairs=1 if tiny else 4, rope_strategy="high",
                               svd="joint", dtype="float32" if tiny else "bfloat16")
    mla, report = convert_model(teacher, tokenizer, info, settings, progress=False)
    return save_checkpoint(mla, tokenizer, report, out, overwrite=True)


def body_params(model) -> int:
    """Parameters outside the embedding and the LM head."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def flops_per_token(student, teacher, seq_len: int) -> float:
    """Model FLOPs of one training token (no recomputation counted): student fwd + bwd (3 x 2 x params),
    teacher fwd (2 x params), the four LM-head passes (teacher fwd, student fwd, bwd: 8 V H) and causal
    attention (2 S x heads x head_dim per layer and forward pass, 4 passes)."""
    c = teacher.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = 4 * c.num_hidden_layers * 2 * seq_len * c.num_attention_heads * head_dim
    return 6 * body_params(student) + 2 * body_params(teacher) + 8 * c.vocab_size * c.hidden_size + attention


# ------------------------------------------------------------------------------------------ a variant


def make_trainer(student, teacher, s: FinetuneSettings, rows: torch.Tensor, work: Path, steps: int, callbacks):
    """The global stage's Trainer as `finetune.train_stage` builds it (its global branch)."""
    from mla_zoo.zoo.train.trainers import GlobalTrainer, training_args
    from transformers.trainer_callback import PrinterCallback

    s = ready_student(student, s, "global", teacher.device)
    args = training_args(work / "checkpoints", s, steps, s.learning_rate, s.bf16, s.gradient_checkpointing, False)
    trainer = GlobalTrainer(model=student, args=args, train_dataset=data_mod.PackedDataset(rows),
                            data_collator=data_mod.collate, callbacks=callbacks, teacher=teacher,
                            tokens_per_step=rows.shape[1] * s.batch_size, loss_settings=s, bf16=s.bf16)
    trainer.remove_callback(PrinterCallback)  # the loss logs (progress off) would clutter the table
    return trainer


def timed_step(trainer, ids: torch.Tensor, clock: Clock) -> dict[str, tuple]:
    """One optimizer step, part by part, as the Trainer's loop runs it (one micro-batch: no accumulation)."""
    model = trainer.model_wrapped  # as prepared by the Trainer (autocast forward; compiled with --compile)
    marks: dict[str, tuple] = {}

    def at(name):
        def hook(*_):
            marks[name] = clock.mark()
        return hook

    compute_loss = trainer.compute_loss  # GlobalTrainer.compute_loss, bound

    def marked_compute_loss(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        marks["loss_end"] = clock.mark()
        return out

    hooks = [trainer.teacher.model.register_forward_pre_hook(at("teacher_start")),
             trainer.teacher.model.register_forward_hook(at("teacher_end")),
             model.register_forward_pre_hook(at("student_start")), model.register_forward_hook(at("student_end"))]
    trainer.compute_loss = marked_compute_loss
    try:
        clock.sync()
        marks["start"] = clock.mark()
        trainer.training_step(model, {"input_ids": ids})  # compute_loss + backward
        marks["backward_end"] = clock.mark()
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        marks["clip_end"] = clock.mark()
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        marks["end"] = clock.mark()
        clock.sync()
    finally:
        del trainer.compute_loss
        for h in hooks:
            h.remove()
    return marks


SPANS = {"teacher_fwd": ("teacher_start", "teacher_end"), "student_fwd": ("student_start", "student_end"),
         "loss": ("student_end", "loss_end"), "backward": ("loss_end", "backward_end"),
         "clip": ("backward_end", "clip_end"), "optimizer": ("clip_end", "end")}


def split(marks: dict[str, tuple], clock: Clock, host: bool) -> dict[str, float]:
    ms = Clock.host_ms if host else clock.ms
    parts = {k: ms(marks[a], marks[b]) for k, (a, b) in SPANS.items()}
    total = ms(marks["start"], marks["end"])
    parts["other"] = total - sum(parts.values())  # before the teacher, between teacher and student
    parts["total"] = total
    return parts


def profile_step(trainer, ids: torch.Tensor, clock: Clock, top: int) -> dict:
    """Top kernels of one step by total time: [{name, ms, calls}], with their sum and count (CPU ops on CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activity = ProfilerActivity.CUDA if clock.cuda else ProfilerActivity.CPU
    with torch_profile(activities=[activity]) as prof:
        marks = timed_step(trainer, ids, clock)

    def us(e):
        if not clock.cuda:
            return e.self_cpu_time_total
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)

    events = [e for e in prof.key_averages() if us(e) > 0]
    rows = sorted(events, key=us, reverse=True)
    return {"step_ms": round(clock.ms(marks["start"], marks["end"]), 2),
            "kernel_ms": round(sum(us(e) for e in events) / 1e3, 2), "kernel_calls": sum(e.count for e in events),
            "top": [{"name": e.key[:100], "ms": round(us(e) / 1e3, 3), "calls": e.count} for e in rows[:top]]}


def run_variant(variant: str, base: FinetuneSettings, student_dir: Path, teacher, ids_rows: torch.Tensor, work: Path,
                clock: Clock, a) -> dict:
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    impl, _, mode = variant.partition("-")
    distill.COMPILE_KL_CHUNK = mode != "eager"
    s = replace(base, kl_impl=impl)
    student = load_student(student_dir)
    step_clock = StepClock(clock)
    trainer = make_trainer(student, teacher, s, ids_rows, work / variant, a.warmup + a.steps + 1, [step_clock])
    t0 = time.perf_counter()
    trainer.train()
    clock.sync()
    train_s = time.perf_counter() - t0
    b = step_clock.begins
    periods = [clock.ms(b[i], b[i + 1]) for i in range(a.warmup, len(b) - 1)]
    in_step = [clock.ms(x, y) for x, y in list(zip(b, step_clock.ends, strict=True))[a.warmup:]]

    ids = ids_rows[: a.batch_size].to(trainer.args.device)  # [B, S]
    steps = [timed_step(trainer, ids, clock) for _ in range(a.steps)]
    gpu = {k: statistics.median(split(m, clock, False)[k] for m in steps) for k in (*PARTS, "total")}
    host = {k: statistics.median(split(m, clock, True)[k] for m in steps) for k in (*PARTS, "total")}
    prof = profile_step(trainer, ids, clock, a.top)
    tokens = a.batch_size * a.seq_len
    trainer_ms = statistics.median(periods)
    result = {
        "kl_impl": trainer.kl_impl,  # as GlobalTrainer resolved it
        "kl_chunk_compiled": distill.COMPILE_KL_CHUNK and clock.cuda and trainer.kl_impl == "fused",
        "parts_ms": {k: round(v, 3) for k, v in gpu.items()},
        "parts_host_ms": {k: round(v, 3) for k, v in host.items()},
        "share": {k: round(gpu[k] / gpu["total"], 4) for k in PARTS},
        "trainer_step_ms": round(trainer_ms, 3),
        "trainer_in_step_ms": round(statistics.median(in_step), 3),
        "trainer_step_ms_all": [round(p, 2) for p in periods],
        "tokens_per_second": {"parts": round(tokens / gpu["total"] * 1e3, 1),
                              "trainer": round(tokens / trainer_ms * 1e3, 1)},
        "train_seconds": round(train_s, 2),
        "first_step_ms": round(clock.ms(b[0], b[1]), 1),  # with --compile: the compile of student and teacher
        "profile": prof,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if clock.cuda else None,
    }
    del trainer, student, steps
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return result


def report(impl: str, r: dict, flops: float, cuda: bool) -> None:
    """One line per part, then the totals and the top kernels."""
    unit = "GPU" if cuda else "CPU"
    for k in PARTS:
        print(f"{impl:8s} {k:12s} {r['parts_ms'][k]:9.2f} ms {100 * r['share'][k]:5.1f}%   "
              f"(host {r['parts_host_ms'][k]:8.2f} ms)", flush=True)
    tps = r["tokens_per_second"]
    p = r["profile"]
    print(f"{impl:8s} {'sum of parts':12s} {r['parts_ms']['total']:9.2f} ms  = {tps['parts']:,.0f} tokens/s "
          f"({tps['parts'] * flops / 1e12:.1f} model TFLOP/s); Trainer step {r['trainer_step_ms']:.2f} ms = "
          f"{tps['trainer']:,.0f} tokens/s; {unit} kernels {p['kernel_ms']:.1f} ms of a {p['step_ms']:.1f} ms step "
          f"({p['kernel_calls']} calls); peak {r['peak_memory_gib']} GiB; first step {r['first_step_ms'] / 1e3:.1f} s",
          flush=True)
    for row in p["top"]:
        print(f"{impl:8s}   {row['ms']:9.3f} ms {row['calls']:6d}x  {row['name']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results here (one JSON object)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps (medians)")
    p.add_argument("--warmup", type=int, default=3, help="Trainer steps before the timed ones")
    p.add_argument("--kl-impl", nargs="+", choices=VARIANTS, default=None,
                   help="variants (default: every one that runs here)")
    p.add_argument("--kl-chunk", type=int, default=FinetuneSettings.kl_chunk, help="finetune's `kl_chunk`")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher, as finetune's `compile`")
    p.add_argument("--bf16-weights", action="store_true", help="finetune's `bf16_weights`: bf16 student weights")
    p.add_argument("--trainable", choices=("all", "attention"), default="all", help="finetune's `trainable`")
    p.add_argument("--gradient-checkpointing", action="store_true", help="finetune's `gradient_checkpointing`")
    p.add_argument("--teacher", default="smollm2-135m", help="the teacher SOURCE (default: the bundled SmolLM2-135M)")
    p.add_argument("--student", help="an existing conversion of the teacher (default: convert it here, d_kv=32)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per variant")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and its conversion, batch 2 x 64, "
                                                       "2 steps after 1: checks the script on a CPU")
    a = p.parse_args()
    if a.tiny:
        a.batch_size, a.seq_len, a.steps, a.warmup = 2, 64, 2, 1
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    clock = Clock(cuda)
    variants = a.kl_impl or [v for v in VARIANTS if v != "liger" or liger_available(device)]
    if not cuda:
        variants = [v for v in variants if v != "fused-eager"]  # the same as fused off CUDA
    # finetune's resolved settings: bf16 on CUDA (`prepare`), global stage only, no save within the run
    base = FinetuneSettings(data="random", seq_len=a.seq_len, batch_size=a.batch_size, stages=("global",),
                            max_steps=a.warmup + a.steps + 1, bf16=cuda, compile=a.compile,
                            bf16_weights=a.bf16_weights, kl_chunk=a.kl_chunk, trainable=a.trainable,
                            gradient_checkpointing=a.gradient_checkpointing, save_steps=10**9)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("accelerate", "liger-kernel", "triton"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    print(json.dumps(versions), flush=True)

    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if a.tiny:
            teacher, tokenizer, info = tiny_teacher()
        else:
            teacher, tokenizer, info = sources.resolve(a.teacher, dtype=torch.float32)  # as finetune.prepare
        student_dir = Path(a.student) if a.student else convert_student(teacher, tokenizer, info, work / "student",
                                                                         a.tiny)
        # finetune.prepare: frozen, on the device, bf16 when training in bf16, its body compiled with `compile`
        teacher.requires_grad_(False).eval()
        teacher.to(device=device, dtype=torch.bfloat16 if base.bf16 else torch.float32)
        if base.compile:
            compile_layers(teacher)
        probe = load_student(student_dir)
        flops = flops_per_token(probe, teacher, a.seq_len)
        student_info = {"dir": str(a.student) if a.student else "converted here", "params": sum(
            q.numel() for q in probe.parameters()), "kv_lora_rank": probe.config.kv_lora_rank,
            "qk_rope_head_dim": probe.config.qk_rope_head_dim, "attn_implementation": probe.config._attn_implementation}
        del probe
        print(f"models ready in {time.perf_counter() - t0:.1f} s: teacher {info.name}, student {student_info}; "
              f"variants {variants}; {a.batch_size} x {a.seq_len} tokens a step, {flops / 1e6:.0f} MFLOP/token",
              flush=True)
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, teacher.config.vocab_size, (a.batch_size * base.max_steps, a.seq_len),
                             generator=g)  # [rows, S] random token ids
        results = {}
        for impl in variants:
            results[impl] = run_variant(impl, base, student_dir, teacher, rows, work, clock, a)
            report(impl, results[impl], flops, cuda)

    out = {**versions, "settings": {**asdict(base), **{k: getattr(a, k) for k in ("steps", "warmup", "tiny")}},
           "teacher": info.name, "student": student_info, "flops_per_token": flops, "variants": results}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
