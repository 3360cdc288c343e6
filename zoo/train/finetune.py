"""`mla-zoo finetune`: recover an MLA conversion by distillation from its original model.

Built on `transformers.Trainer` (one Trainer per stage, each with its own `compute_loss`, in
`trainers.py`), so checkpointing, resuming, mixed precision, gradient accumulation and multi-GPU
(DDP under `torchrun` / `accelerate launch`) are the Trainer's own. Stages, in order:

* `layerwise`: every converted attention block learns to reproduce the ORIGINAL block's output
  on the teacher's hidden states (all layers at once, independent problems; only attention
  weights train). See `distill.LayerwiseStudent`.
* `global`: the whole student learns the teacher's next-token distributions: KL(teacher ||
  student) at temperature T, optionally + CE, computed in chunks (`distill.distill_loss`).

The teacher is the original model, frozen, in the same process and on the same device (bf16
when training in bf16); under DDP every process holds its own replica of it.

A run: `prepare` (check the inputs, open or resume OUT, load the models and the data), then
`train_stage` for each stage, then `make_report`, then `write_output`. Layout of OUT:
    run.json                  the run's identity and progress (`RunState`)
    checkpoints/<stage>/checkpoint-N/   the Trainer's checkpoints (weights as safetensors)
    stages/<stage>/           the student after a stage that is followed by another one
    config.json, model.safetensors, remote code, tokenizer, conversion.json   <- the result
    training.json (`TrainingReport`), training.png
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from mla_zoo.modeling import sources
from mla_zoo.modeling.common import FinetuneError, check_json_files, check_output_dir, read_text, remove_stale, temp_dir
from mla_zoo.modeling.convert import save_checkpoint
from mla_zoo.modeling.convert_schema import ConversionReport
from mla_zoo.zoo.evaluate import EvalSettings

from . import data as data_mod
from .distill import LayerwiseStudent
from .report import PerplexityPoint, RunState, StageResult, TrainingReport, plot_training
from .settings import COMPILE_PAYS_TOKENS, FinetuneSettings

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
EVAL_SEQ_LEN = next(f.default for f in fields(EvalSettings) if f.name == "seq_len")  # as `mla-zoo eval`
FINAL = "final"  # the final checkpoint is staged in OUT/.final.tmp-PID@HOST-* (`common.temp_dir`)


def checkpoint_hash(path: str | Path) -> str:
    """Identity of an mla-zoo checkpoint: config, conversion report and the safetensors headers
    (names, shapes, dtypes, offsets) of its weight files. Cheap even for large models."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "conversion.json"):
        f = path / name
        h.update(name.encode())
        h.update(f.read_bytes() if f.is_file() else b"-")
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode())
            h.update(fh.read(n))
    return h.hexdigest()


def compile_layers(model) -> None:
    """`compile`: regional compilation, each decoder layer compiled in place (`nn.Module.compile`). The layers
    run one code path, so dynamo compiles it once for all of them: SmolLM2-MLA's first forward + backward on a CPU
    takes 12.7 s instead of the whole model's 69.3 s, for the same step (bench/compile_layers_cpu.py). Names and
    state dicts stay as they are (no `_orig_mod.` prefix)."""
    for layer in model.model.layers:
        layer.compile()


def ready_student(student, s: FinetuneSettings, stage: str, device) -> FinetuneSettings:
    """The student as `stage` trains it: on `device`, in train mode, its layers compiled with `compile` (again for
    each stage: `train` may have reloaded it), and what the stage trains - the layer-wise stage the attention
    blocks alone, the global stage every weight (`trainable` all) or the attention blocks alone (`trainable`
    attention). With `bf16_weights` the global stage's weights become bf16: the settings returned then have
    bf16 autocast off."""
    student.to(device)
    student.train()
    if s.compile:
        compile_layers(student)
    student.requires_grad_(stage == "global" and s.trainable == "all")
    for layer in student.model.layers:
        layer.self_attn.requires_grad_(True)
    if stage == "global" and s.bf16_weights:  # bf16 weights instead of fp32 master weights under autocast
        student.to(torch.bfloat16)
        s = replace(s, bf16=False)
    return s


def compile_pays(s: FinetuneSettings, cuda: bool) -> bool:
    """Whether compiling pays for a run: on CUDA, from COMPILE_PAYS_TOKENS tokens of global stage on."""
    tokens = s.tokens if s.tokens is not None else s.max_steps and s.max_steps * s.batch_size * s.grad_accum * s.seq_len
    return cuda and "global" in s.stages and bool(tokens) and tokens >= COMPILE_PAYS_TOKENS


def stage_steps(s: FinetuneSettings, rows_per_step: int, data_rows: int | None) -> dict[str, int]:
    """Optimizer steps of each stage; {} while the length depends on the data (one pass) not yet read."""
    if s.max_steps is not None:
        main = s.max_steps
    elif s.tokens is not None:
        main = math.ceil(s.tokens / (rows_per_step * s.seq_len))
    elif data_rows is not None:
        main = max(1, data_rows // rows_per_step)  # one pass over the data
    else:
        return {}
    steps = {}
    if "layerwise" in s.stages:
        alone = s.stages == ("layerwise",)
        steps["layerwise"] = s.layerwise_steps or (main if alone else max(1, main // 10))
    if "global" in s.stages:
        steps["global"] = main
    return steps


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------


@dataclass
class FinetuneRun:
    """Everything `prepare` decided and loaded, that the stages and the report use."""

    checkpoint: Path
    out: Path
    teacher: str  # as given (a SOURCE)
    settings: FinetuneSettings  # resolved: bf16 and eval_seq_len filled in
    resume: bool
    progress: bool
    state: Any  # accelerate's PartialState (the process group under torchrun)
    run: RunState
    student: Any
    tokenizer: Any
    teacher_model: Any
    teacher_info: sources.SourceInfo
    data: data_mod.DataSource
    rows: torch.Tensor  # [rows, seq_len] packed token ids
    steps: dict[str, int]
    rows_per_step: int
    eval_text: str | None
    started: float
    cpu_started: float

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.settings.seq_len


def load_student(path):
    """The MLA checkpoint at `path` as fine-tuning trains it: fp32 weights (the master copy under bf16 autocast)."""
    from mla_zoo.modeling.remote.modeling_llama_mla import LlamaMLAForCausalLM

    return LlamaMLAForCausalLM.from_pretrained(path, dtype=torch.float32)


def _open_out(out: Path, inputs: dict, ckpt_hash: str, resume: bool, overwrite: bool,
              is_main: bool) -> RunState | None:
    """Check OUT against `resume` / `overwrite` and the output rule (`common.check_output_dir`: only a
    run directory, one with run.json, is resumed or replaced); the existing run's state when resuming."""
    if resume and not (out / RunState.FILE).is_file():
        raise FinetuneError(f"`resume`: {out} holds no run.json (nothing to resume); drop `resume` to start a run")
    if not (resume or overwrite) and (out / RunState.FILE).is_file():
        raise FinetuneError(f"{out} holds a run already; pass `resume` to continue it or `overwrite` to start over")
    check_output_dir(out, marker=RunState.FILE, overwrite=resume or overwrite, inputs=inputs)
    remove_stale(out / FINAL)
    if resume:
        run = RunState.read(out)
        if run.student_hash != ckpt_hash:
            raise FinetuneError(f"`resume`: the checkpoints in {out} were trained from another model "
                                f"({run.student}), not from this `checkpoint`; use a new `output` directory")
        return run
    if overwrite and out.exists() and any(out.iterdir()) and is_main:
        shutil.rmtree(out)
    return None


def prepare(checkpoint: str | Path, out: str | Path, teacher: str, settings: FinetuneSettings, *, resume: bool,
            overwrite: bool, progress: bool) -> FinetuneRun | TrainingReport:
    """Check every input, open OUT (resuming a run there), load student, teacher and data.
    Returns the run's TrainingReport instead when OUT holds this run, finished."""
    from accelerate import PartialState
    from mla_zoo.modeling.remote.configuration_llama_mla import LlamaMLAConfig
    from transformers import AutoTokenizer

    started, cpu_started = time.time(), time.process_time()
    s, ckpt, out = settings, Path(checkpoint), Path(out)
    if not sources.is_mla_checkpoint(ckpt):
        raise FinetuneError(f"{ckpt} is not an mla-zoo checkpoint (no config.json with model_type llama_mla); "
                            "convert a model with `mla-zoo convert` first")
    check_json_files(ckpt)  # a cut-off file is named here, not deep inside transformers
    s.check_files()
    config = LlamaMLAConfig.from_pretrained(ckpt)
    data_mod.check_seq_len(s.seq_len, config)
    data_info = data_mod.describe(s.data)  # a spec matching nothing fails here, before any model loads
    eval_text = read_text(s.eval_text, "eval_text") if s.eval_text else None
    cuda = torch.cuda.is_available()
    eval_seq_len = s.eval_seq_len or min(EVAL_SEQ_LEN, config.max_position_embeddings)
    if eval_text is not None and s.eval_seq_len is None and eval_seq_len < EVAL_SEQ_LEN:
        print(f"finetune: perplexity windows of {eval_seq_len} tokens, the model's max_position_embeddings "
              f"(`mla-zoo eval` uses {EVAL_SEQ_LEN}): set `eval_seq_len` to choose", file=sys.stderr)
    s = replace(s, eval_seq_len=eval_seq_len, bf16=cuda if s.bf16 is None else s.bf16)
    s = replace(s, compile=compile_pays(s, cuda) if s.compile is None else s.compile)
    if eval_text is not None:
        data_mod.check_seq_len(s.eval_seq_len, config, "eval_seq_len")

    state = PartialState(cpu=not cuda)  # joins the process group under torchrun / accelerate
    ckpt_hash = checkpoint_hash(ckpt)
    inputs = {"checkpoint": ckpt, "teacher": teacher, "eval_text": s.eval_text, "data": data_mod.split_spec(s.data)}
    previous = _open_out(out, inputs, ckpt_hash, resume, overwrite, state.is_main_process)
    state.wait_for_everyone()
    if previous is not None and previous.finished and (out / TrainingReport.FILE).is_file():
        if state.is_main_process:
            print(f"{out}: this run already finished")
        return TrainingReport.read(out)

    teacher_model, teacher_tok, teacher_info = sources.resolve(teacher, dtype=torch.float32)
    if previous is not None and previous.teacher_sha256 != teacher_info.sha256:
        raise FinetuneError(f"`resume`: {out} was trained with another teacher ({previous.teacher}); "
                            "pass the same `teacher`")
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)  # our own remote code
    student = load_student(ckpt)
    sources.check_same_tokenizer(tokenizer, teacher_tok, student.config, teacher_model.config)
    if "layerwise" in s.stages:
        for key in ("num_hidden_layers", "hidden_size"):
            if getattr(student.config, key) != getattr(teacher_model.config, key):
                raise FinetuneError(f"the layerwise stage needs the original model as `teacher`: {key} "
                                    f"{getattr(teacher_model.config, key)} != the student's "
                                    f"{getattr(student.config, key)}")

    world = state.num_processes
    rows_per_step = s.batch_size * s.grad_accum * world
    steps = stage_steps(s, rows_per_step, None)
    need = max(steps.values()) * rows_per_step if steps else None

    def write_state(planned: dict[str, int]) -> None:
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            RunState(student=str(ckpt), student_hash=ckpt_hash, teacher=teacher, teacher_sha256=teacher_info.sha256,
                     settings=s, stage_steps=planned, world_size=world,
                     stages_done=previous.stages_done if previous else [],
                     stage_results=previous.stage_results if previous else {},
                     sessions=previous.sessions + 1 if previous else 1).write(out)

    write_state(steps)  # OUT is this run's from now on: a run killed while sampling is resumed, not refused
    if state.is_main_process:  # `teacher:MIX` parts: sampled from the teacher into OUT/synth first
        data_mod.sample_teacher_parts(s.data, teacher, out / "synth", need, s.seq_len, s.seed, progress=progress)
    state.wait_for_everyone()
    spec = data_mod.sample_teacher_parts(s.data, teacher, out / "synth", need, s.seq_len, s.seed, run=False)
    rows = data_mod.pack_rows(spec, tokenizer, s.seq_len, max_rows=need, progress=progress and state.is_main_process)
    if rows.shape[0] < s.batch_size * world:
        raise FinetuneError(f"`data` {s.data} gives {rows.shape[0]} rows of {s.seq_len} tokens, fewer than one batch "
                            f"({s.batch_size} x {world} processes): lower `batch_size` or `seq_len`, or add data")
    steps = steps or stage_steps(s, rows_per_step, rows.shape[0])

    write_state(steps)
    state.wait_for_everyone()

    teacher_model.requires_grad_(False).eval()
    teacher_model.to(device=state.device, dtype=torch.bfloat16 if s.bf16 else torch.float32)
    if s.compile:  # the frozen teacher's layers run every step: compiled too
        compile_layers(teacher_model)
    return FinetuneRun(checkpoint=ckpt, out=out, teacher=teacher, settings=s, resume=resume, progress=progress,
                       state=state, run=RunState.read(out), student=student, tokenizer=tokenizer,
                       teacher_model=teacher_model, teacher_info=teacher_info, data=data_info, rows=rows, steps=steps,
                       rows_per_step=rows_per_step, eval_text=eval_text, started=started, cpu_started=cpu_started)


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------


def _steady(logs: list[dict]) -> float | None:
    """Median of the logged tokens/s, the first interval (start-up, compilation) left out."""
    rates = sorted(h["tokens_per_second"] for h in logs[1:] if "tokens_per_second" in h)
    return rates[len(rates) // 2] if rates else None


def train_stage(r: FinetuneRun, stage: str, callbacks: list) -> StageResult:
    """One stage with its own Trainer, resuming from its newest complete checkpoint in OUT when asked to."""
    from .trainers import (
        STAGING,
        CheckpointCommit,
        GlobalTrainer,
        LayerwiseTrainer,
        PerplexityCallback,
        resumable_checkpoint,
        training_args,
    )

    student = r.student
    s = ready_student(student, r.settings, stage, r.state.device)
    if stage == "layerwise":
        model, trainer_cls, grad_ckpt = LayerwiseStudent(student, s.layerwise_inputs), LayerwiseTrainer, False
        lr = s.layerwise_lr or s.learning_rate
    else:
        model, trainer_cls, lr, grad_ckpt = student, GlobalTrainer, s.learning_rate, s.gradient_checkpointing
    ckpt_dir = r.out / "checkpoints" / stage
    args = training_args(ckpt_dir, s, r.steps[stage], lr, s.bf16, grad_ckpt, r.progress)
    ppl = None
    if r.eval_text is not None:
        ppl = PerplexityCallback(student, r.tokenizer, r.eval_text, s.eval_seq_len, s.eval_every, s.eval_tokens,
                                 s.bf16)
    resume_from = None
    if r.resume and ckpt_dir.is_dir():
        newest, broken = resumable_checkpoint(ckpt_dir)
        r.state.wait_for_everyone()  # every process has looked before the main one removes anything
        if r.state.is_main_process:
            shutil.rmtree(ckpt_dir / STAGING, ignore_errors=True)  # a save in progress when the run was killed
            for path, why in broken:
                shutil.rmtree(path, ignore_errors=True)
                print(f"finetune: {stage} stage: {path.name} is incomplete ({why}): removed", file=sys.stderr)
            if newest is not None:
                print(f"finetune: {stage} stage: resuming from {newest.name}, the newest complete checkpoint",
                      file=sys.stderr)
        resume_from = str(newest) if newest is not None else None
    start_step = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
    commit = CheckpointCommit(ckpt_dir, s.save_total_limit)
    trainer = trainer_cls(model=model, args=args, train_dataset=data_mod.PackedDataset(r.rows),
                          data_collator=data_mod.collate, callbacks=[commit, *([ppl] if ppl else []), *callbacks],
                          teacher=r.teacher_model, tokens_per_step=r.tokens_per_step, loss_settings=s, bf16=s.bf16,
                          start_step=start_step)
    if ppl is not None:
        ppl.trainer = trainer
    t0 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except OOM as e:
        raise FinetuneError(
            f"out of GPU memory in the {stage} stage (batch {s.batch_size} x seq {s.seq_len}): lower `batch_size` "
            "and raise `grad_accum` to keep the same tokens per step, lower `seq_len`, or pass "
            f"`gradient_checkpointing` ({e})") from e
    seconds = time.time() - t0
    # The Trainer's last act on every process globs its output dir (the staging dir): none may still be
    # at it when the main process removes it (a FileNotFoundError there ended a 2-process run on CI).
    r.state.wait_for_everyone()
    if r.state.is_main_process:
        shutil.rmtree(ckpt_dir / STAGING, ignore_errors=True)  # empty: every save was moved out
    done_steps = trainer.state.global_step - start_step
    history = trainer.state.log_history
    losses = [h for h in history if "loss" in h]
    return StageResult(
        steps=trainer.state.global_step,
        tokens=trainer.state.global_step * r.tokens_per_step,
        learning_rate=lr,
        final_loss=losses[-1]["loss"] if losses else None,
        final_parts={k: v for k, v in (losses[-1] if losses else {}).items() if k in ("kl", "ce", "layer_rel_mse")},
        train_loss_mean=result.metrics.get("train_loss"),
        session_seconds=round(seconds, 2),
        session_steps=done_steps,
        tokens_per_second=round(done_steps * r.tokens_per_step / max(seconds, 1e-9), 1),
        steady_tokens_per_second=_steady(losses),
        resumed_from=resume_from,
        log_history=history,
        kl_impl=getattr(trainer, "kl_impl", None),
    )


def _replicas_in_sync(model, device) -> bool:
    """Under DDP: are the replicas' weights identical after training?"""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return True
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().to(device)
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    return all(torch.allclose(g, gathered[0], rtol=1e-9, atol=1e-9) for g in gathered)


def _without_history(results: dict[str, StageResult]) -> dict[str, StageResult]:
    return {k: replace(v, log_history=[]) for k, v in results.items()}


def train(r: FinetuneRun, callbacks: list) -> dict[str, StageResult]:
    """Every stage not yet done, in order; a stage followed by another one leaves its student in
    OUT/stages/<stage> (where a later stage, or a later --resume, starts from)."""
    results = dict(r.run.stage_results)
    for i, stage in enumerate(r.settings.stages):
        stage_out = r.out / "stages" / stage
        if stage in r.run.stages_done:
            r.student = load_student(stage_out)
            continue
        results[stage] = train_stage(r, stage, callbacks)
        if not _replicas_in_sync(r.student, r.state.device):
            raise FinetuneError("the DDP replicas' weights differ after training (please report this)")
        if i + 1 < len(r.settings.stages):
            if r.state.is_main_process:
                save_checkpoint(r.student, r.tokenizer, ConversionReport.read(r.checkpoint), stage_out, overwrite=True)
                r.run.stages_done.append(stage)
                r.run.stage_results = _without_history(results)
                r.run.write(r.out)
            r.state.wait_for_everyone()
    return results


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _peak_memory(world: int) -> list[int] | None:
    """Each process's peak of allocated GPU memory, in rank order (None on CPU); every process calls it."""
    if not torch.cuda.is_available():
        return None
    peaks = [int(torch.cuda.max_memory_allocated())]
    if world > 1:
        import torch.distributed as dist

        peaks = [0] * world
        dist.all_gather_object(peaks, int(torch.cuda.max_memory_allocated()))
    return peaks


def make_report(r: FinetuneRun, results: dict[str, StageResult]) -> TrainingReport:
    """The run's report (every process calls it: the peak memory of each is gathered)."""
    cuda = torch.cuda.is_available()
    world = r.state.num_processes
    elapsed = time.time() - r.started
    return TrainingReport(
        student=str(r.checkpoint), teacher=r.teacher, teacher_source=r.teacher_info, data=r.data,
        settings=r.settings, stage_steps=r.steps, world_size=world, tokens_per_step=r.tokens_per_step,
        data_rows=r.rows.shape[0],
        tokens_seen=sum(x.tokens for x in results.values()),
        final_losses={k: x.final_loss for k, x in results.items()},
        stages=results,
        perplexity_curve=[PerplexityPoint(stage, h["step"], h.get("tokens"), h["perplexity"])
                          for stage, x in results.items() for h in x.log_history if "perplexity" in h],
        throughput_tokens_per_second={k: x.tokens_per_second for k, x in results.items()},
        steady_tokens_per_second={k: x.steady_tokens_per_second for k, x in results.items()},
        device=torch.cuda.get_device_name() if cuda else "cpu",
        wall_seconds=round(elapsed, 2),
        device_seconds=round(elapsed * world, 2) if cuda else None,
        cpu_seconds=round(time.process_time() - r.cpu_started, 2),
        replicas_in_sync=True,
        peak_gpu_memory_bytes=_peak_memory(world),
    )


def write_output(r: FinetuneRun, report: TrainingReport) -> None:
    """The final checkpoint into OUT (in the dtype of the conversion): staged complete (remote code,
    tokenizer, conversion.json, training.png), then moved in file by file with training.json last,
    so a complete training.json always means a complete checkpoint."""
    conversion = ConversionReport.read(r.checkpoint)
    (r.out / TrainingReport.FILE).unlink(missing_ok=True)
    staging = temp_dir(r.out / FINAL)
    try:
        final = save_checkpoint(r.student.to(getattr(torch, conversion.settings.dtype)), r.tokenizer, conversion,
                                staging / "model")
        plot_training(report, final / "training.png")
        report.plot = "training.png"
        report.write(final)
        names = sorted(p.name for p in final.iterdir() if p.name != TrainingReport.FILE) + [TrainingReport.FILE]
        for name in names:
            target = r.out / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(final / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_finetune(checkpoint: str | Path, out: str | Path, teacher: str, settings: FinetuneSettings, *,
                 resume: bool = False, overwrite: bool = False, progress: bool = True,
                 callbacks: list | None = None) -> TrainingReport:
    """Distil CHECKPOINT (an mla-zoo checkpoint) from TEACHER (any SOURCE) into OUT.

    resume: continue the run in OUT from its last checkpoints; overwrite: delete a non-empty OUT
    first; `callbacks`: extra `TrainerCallback`s given to every stage's Trainer.
    """
    r = prepare(checkpoint, out, teacher, settings, resume=resume, overwrite=overwrite, progress=progress)
    if isinstance(r, TrainingReport):  # finished before
        return r
    results = train(r, list(callbacks or []))
    report = make_report(r, results)
    if r.state.is_main_process:
        write_output(r, report)
        r.run.finished = True
        r.run.stage_results = _without_history(results)
        r.run.write(r.out)
    r.state.wait_for_everyone()
    return report
