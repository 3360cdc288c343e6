"""`mla-zoo finetune`: recover an MLA conversion by distillation from its original model.

Built on `transformers.Trainer` (one Trainer per stage, each with its own `compute_loss`), so
checkpointing, resuming, mixed precision, gradient accumulation and multi-GPU (DDP under
`torchrun` / `accelerate launch`) are the Trainer's own. Stages, in order:

* `layerwise`: every converted attention block learns to reproduce the ORIGINAL block's output
  on the teacher's hidden states (all layers at once, independent problems; only attention
  weights train). See `distill.LayerwiseStudent`.
* `global`: the whole student learns the teacher's next-token distributions: KL(teacher ||
  student) at temperature T, optionally + CE, computed in chunks (`distill.distill_loss`).

The teacher is the original model, frozen, in the same process and on the same device (bf16
when training in bf16); under DDP every process holds its own replica of it.

Layout of OUT:
    run.json                  identity of the run (student/teacher hashes, settings, stages done)
    checkpoints/<stage>/checkpoint-N/   the Trainer's checkpoints (weights as safetensors)
    stages/<stage>/           the student after a stage that is followed by another one
    config.json, model.safetensors, remote code, tokenizer, conversion.json   <- the result
    training.json, training.png
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from mla_zoo.modeling.common import FinetuneError

from . import data as data_mod
from .distill import DEFAULT_CHUNK, LayerwiseStudent, distill_loss, teacher_layer_io

STAGES = ("layerwise", "global")
PROBE = "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n  Ünïcode — 日本語 🙂 <tag> {x: 1}"
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class FinetuneSettings:
    data: str
    seq_len: int = 1024
    tokens: int | None = None  # length of the global stage in tokens (or max_steps)
    max_steps: int | None = None
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    stages: tuple[str, ...] = ("layerwise", "global")  # layer-wise first measured better (bench/RESULTS.md)
    layerwise_steps: int | None = None  # default: 10% of the global stage (all of it when alone)
    layerwise_lr: float | None = None  # default: lr
    save_steps: int = 500
    save_total_limit: int | None = 2
    bf16: bool | None = None  # None: on CUDA
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the student (Trainer's torch_compile) and the teacher's body
    eval_text: str | None = None
    eval_every: int = 100
    eval_tokens: int = 16384
    eval_seq_len: int | None = None  # default: min(seq_len, 1024)
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK
    logging_steps: int = 10
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes recorded in training.json


# ----------------------------------------------------------------------------------------------
# Identity checks
# ----------------------------------------------------------------------------------------------


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


def check_tokenizers(student_tok, teacher_tok, student_cfg, teacher_cfg) -> None:
    """The KL needs one vocabulary: same size and the same encoding of a probe string."""
    if student_cfg.vocab_size != teacher_cfg.vocab_size or len(student_tok) != len(teacher_tok):
        raise FinetuneError(
            f"the teacher's vocabulary ({teacher_cfg.vocab_size} logits, tokenizer {len(teacher_tok)}) differs from "
            f"the student's ({student_cfg.vocab_size}, {len(student_tok)}): distillation needs the same tokenizer; "
            "pass the model the checkpoint was converted from as --teacher")
    a = student_tok(PROBE, add_special_tokens=False)["input_ids"]
    b = teacher_tok(PROBE, add_special_tokens=False)["input_ids"]
    if a != b or student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise FinetuneError("the teacher's tokenizer encodes text differently from the student's: distillation "
                            "needs the same tokenizer; pass the model the checkpoint was converted from as --teacher")


def check_layerwise_teacher(student_cfg, teacher_cfg) -> None:
    for key in ("num_hidden_layers", "hidden_size"):
        if getattr(student_cfg, key) != getattr(teacher_cfg, key):
            raise FinetuneError(f"the layerwise stage needs the original model as teacher: {key} "
                                f"{getattr(teacher_cfg, key)} != the student's {getattr(student_cfg, key)}")


# ----------------------------------------------------------------------------------------------
# Trainers and callbacks
# ----------------------------------------------------------------------------------------------


def _trainer_classes():
    """Defined lazily so importing this module does not import the Trainer stack."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class _DistillTrainer(Trainer):
        """Shared: the teacher, per-step token count, loss parts and tokens/s in the logs."""

        def __init__(self, *args, teacher, tokens_per_step: int, loss_settings: FinetuneSettings, bf16: bool,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.tokens_per_step = tokens_per_step
            self.loss_settings = loss_settings
            self.use_bf16 = bf16
            self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: the Trainer scales it for GA
            if hasattr(self, "loss_is_scaled_for_ga"):
                self.loss_is_scaled_for_ga = False
            self._sums: dict[str, torch.Tensor] = {}
            self._count = 0
            self._log_time = time.time()
            self._log_step = None

        def _track(self, parts: dict) -> None:
            for k, v in parts.items():
                v = v.detach().float()
                self._sums[k] = v if k not in self._sums else self._sums[k] + v
            self._count += 1

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs:
                now = time.time()
                start = self._log_step if self._log_step is not None else self._initial_step()
                steps = self.state.global_step - start
                if steps > 0:
                    logs["tokens_per_second"] = round(steps * self.tokens_per_step / max(now - self._log_time, 1e-9), 1)
                logs["tokens"] = self.state.global_step * self.tokens_per_step
                for k, v in self._sums.items():
                    v = v / max(self._count, 1)
                    if v.numel() == 1:
                        logs[k] = round(float(v), 6)
                    else:
                        logs[k] = [round(float(x), 6) for x in v]
                self._sums, self._count = {}, 0
                self._log_time, self._log_step = now, self.state.global_step
            super().log(logs, *args, **kwargs)
            if "loss" in logs:
                for cb in self.callback_handler.callbacks:
                    bar = getattr(cb, "training_bar", None) if isinstance(cb, ProgressCallback) else None
                    if bar is not None:
                        bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_second', 0):.0f}")

        def _initial_step(self) -> int:
            return getattr(self, "_start_step", 0)

        def _autocast(self, device: torch.device):
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    class GlobalTrainer(_DistillTrainer):
        """Whole-model distillation: chunked KL (+ CE) between final hidden states through the LM heads."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            s = self.loss_settings
            with torch.no_grad():
                t_hidden = self.teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            # Through the (possibly DDP-wrapped) model: its forward returns all hidden states; the
            # LM head then runs chunk by chunk below (logits_to_keep=1 keeps its own logits tiny).
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            s_hidden = out.hidden_states[-1]
            student = self.accelerator.unwrap_model(model)
            with self._autocast(ids.device):
                loss, parts = distill_loss(s_hidden, t_hidden, student.lm_head, self.teacher.lm_head, ids, None,
                                           s.temperature, s.ce_weight, s.chunk_size)
            self._track(parts)
            return (loss, out) if return_outputs else loss

    class LayerwiseTrainer(_DistillTrainer):
        """Attention blocks against the original blocks on the teacher's hidden states."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            layer_in, targets = teacher_layer_io(self.teacher, ids)
            loss, parts = model(layer_in, targets)
            self._track({"layer_rel_mse": parts["per_layer"]})
            return (loss, parts) if return_outputs else loss

    class PerplexityCallback(TrainerCallback):
        """Perplexity of the student on --eval-text at the start and every `every` steps (main process)."""

        def __init__(self, student, tokenizer, text, seq_len, every, max_tokens, bf16):
            self.student, self.tokenizer, self.text = student, tokenizer, text
            self.seq_len, self.every, self.max_tokens, self.bf16 = seq_len, every, max_tokens, bf16
            self.trainer = None

        def _measure(self, state):
            if not state.is_world_process_zero:
                return
            from .evaluate import perplexity

            was_training = self.student.training
            self.student.eval()
            device = next(self.student.parameters()).device
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                ppl = perplexity(self.student, self.tokenizer, self.text, self.seq_len, self.max_tokens,
                                 progress=False)["perplexity"]
            self.student.train(was_training)
            self.trainer.log({"perplexity": round(ppl, 4), "tokens": state.global_step * self.trainer.tokens_per_step})

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self._measure(state)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
                should_log = control.should_log
                self._measure(state)  # Trainer.log clears control.should_log: keep this step's loss log
                control.should_log = should_log
            return control

    class DropPickledArgs(TrainerCallback):
        """The Trainer also writes training_args.bin (a pickle it never reads back): remove it."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                f = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin"
                f.unlink(missing_ok=True)

    return GlobalTrainer, LayerwiseTrainer, PerplexityCallback, DropPickledArgs


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _training_args(output_dir: Path, s: FinetuneSettings, steps: int, lr: float, bf16: bool, grad_ckpt: bool):
    import inspect

    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=lr, weight_decay=s.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(s.warmup_ratio * steps), max_steps=steps, logging_steps=s.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        bf16=bf16, seed=s.seed, data_seed=s.seed, report_to="none", disable_tqdm=not s.progress,
        dataloader_drop_last=True, dataloader_num_workers=0, remove_unused_columns=False,
        ddp_find_unused_parameters=False, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # lets accelerate run several CPU processes (gloo) under torchrun
        save_safetensors=True,  # the default, and gone from newer versions: passed only where it exists
        torch_compile=s.compile,
    )
    known = inspect.signature(TrainingArguments.__init__).parameters
    # the new name (transformers >= 5.2x) where it exists; its deprecated alias elsewhere
    ckpt_name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    kwargs[ckpt_name] = grad_ckpt
    kwargs[f"{ckpt_name}_kwargs"] = {"use_reentrant": False} if grad_ckpt else None
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in known})


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _stage_steps(s: FinetuneSettings, rows_per_step: int, data_rows: int | None) -> dict[str, int]:
    """Optimizer steps of each requested stage."""
    if s.tokens is not None and s.max_steps is not None:
        raise FinetuneError("pass --tokens or --max-steps, not both")
    tokens_per_step = rows_per_step * s.seq_len
    if s.max_steps is not None:
        main = s.max_steps
    elif s.tokens is not None:
        main = math.ceil(s.tokens / tokens_per_step)
    elif data_rows is not None:
        main = max(1, data_rows // rows_per_step)  # one pass over the data
    else:
        return {}
    if main < 1:
        raise FinetuneError("--tokens / --max-steps must be positive")
    steps = {}
    if "layerwise" in s.stages:
        if s.layerwise_steps is not None:
            steps["layerwise"] = s.layerwise_steps
        else:
            steps["layerwise"] = main if s.stages == ("layerwise",) else max(1, main // 10)
    if "global" in s.stages:
        steps["global"] = main
    if any(v < 1 for v in steps.values()):
        raise FinetuneError("stage lengths must be positive")
    return steps


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _load_student(path):
    from mla_zoo.modeling.remote.modeling_llama_mla import LlamaMLAForCausalLM

    return LlamaMLAForCausalLM.from_pretrained(path, dtype=torch.float32)


def _final_dtype(ckpt: Path) -> torch.dtype:
    conv = _read_json(ckpt / "conversion.json")
    name = conv.get("settings", {}).get("dtype") or _read_json(ckpt / "config.json").get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _prepare_out(out: Path, s: FinetuneSettings, ckpt_hash: str, is_main: bool) -> dict:
    """Check OUT against --resume/--overwrite; returns the existing run.json on resume."""
    run_file = out / "run.json"
    if s.resume:
        if not run_file.is_file():
            raise FinetuneError(f"--resume: {out} holds no run.json (nothing to resume); drop --resume to start a run")
        run = _read_json(run_file)
        if run.get("student_hash") != ckpt_hash:
            raise FinetuneError(f"--resume: the checkpoints in {out} were trained from another model "
                                f"({run.get('student', '?')}), not from this CKPT; use a new -o directory")
        return run
    if out.exists() and any(out.iterdir()):
        if not s.overwrite:
            raise FinetuneError(f"{out} already exists and is not empty; pass --resume to continue that run "
                                "or --overwrite to start over")
        if is_main:
            shutil.rmtree(out)
    return {}


def _steady(logs: list[dict]) -> float | None:
    """Median of the logged tokens/s, the first interval (start-up, compilation) left out."""
    rates = sorted(h["tokens_per_second"] for h in logs[1:] if "tokens_per_second" in h)
    return rates[len(rates) // 2] if rates else None


def _sync_check(model, device) -> bool:
    """Under DDP: are the replicas' weights identical after training?"""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return True
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().to(device)
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    return all(torch.allclose(g, gathered[0], rtol=1e-9, atol=1e-9) for g in gathered)


def run_finetune(ckpt: str | Path, out: str | Path, teacher: str, settings: FinetuneSettings,
                 callbacks: list | None = None) -> dict:
    """Distil CKPT (an mla-zoo checkpoint) from TEACHER (any SOURCE) into OUT; returns training.json.

    `callbacks` are extra `TrainerCallback`s given to every stage's Trainer.
    """
    from accelerate import PartialState
    from mla_zoo.modeling import sources
    from mla_zoo.modeling.common import read_text
    from mla_zoo.modeling.remote.configuration_llama_mla import LlamaMLAConfig
    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from .evaluate import is_mla_checkpoint

    started, cpu_started = time.time(), time.process_time()
    s = settings
    ckpt, out = Path(ckpt), Path(out)
    s.stages = tuple(s.stages)
    if not s.stages or any(st not in STAGES for st in s.stages):
        raise FinetuneError(f"--stages must be a comma-separated subset of {','.join(STAGES)}, "
                            f"got {','.join(s.stages)}")
    s.stages = tuple(st for st in STAGES if st in s.stages)  # layer-wise first
    if not is_mla_checkpoint(ckpt):
        raise FinetuneError(f"{ckpt} is not an mla-zoo checkpoint (no config.json with model_type llama_mla); "
                            "convert a model with `mla-zoo convert` first")
    for name, v in (("--batch-size", s.batch_size), ("--grad-accum", s.grad_accum), ("--save-steps", s.save_steps),
                    ("--eval-every", s.eval_every), ("--logging-steps", s.logging_steps)):
        if v < 1:
            raise FinetuneError(f"{name} must be positive, got {v}")
    if s.temperature <= 0 or s.ce_weight < 0 or s.lr <= 0 or not 0 <= s.warmup_ratio < 1:
        raise FinetuneError("--temperature and --lr must be > 0, --ce-weight >= 0, --warmup-ratio in [0, 1)")
    config = LlamaMLAConfig.from_pretrained(ckpt)
    data_mod.check_seq_len(s.seq_len, config)
    data_info = data_mod.describe(s.data)  # a spec matching nothing fails here, before any model loads
    eval_text = read_text(s.eval_text, "eval_text") if s.eval_text else None
    eval_seq_len = s.eval_seq_len or min(s.seq_len, 1024)
    if eval_text is not None:
        data_mod.check_seq_len(eval_seq_len, config)

    state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group under torchrun / accelerate
    is_main = state.is_main_process
    world = state.num_processes
    ckpt_hash = checkpoint_hash(ckpt)
    run = _prepare_out(out, s, ckpt_hash, is_main)
    state.wait_for_everyone()
    if run.get("finished") and (out / "training.json").is_file():
        if is_main:
            print(f"{out}: this run already finished")
        return _read_json(out / "training.json")

    cuda = torch.cuda.is_available()
    bf16 = cuda if s.bf16 is None else s.bf16
    teacher_model, teacher_tok, teacher_info = sources.resolve(teacher, dtype=torch.float32)
    if run and run.get("teacher_sha256") != teacher_info.sha256:
        raise FinetuneError(f"--resume: {out} was trained with another teacher ({run.get('teacher')}); "
                            "pass the same --teacher")
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)  # our own remote code
    student = _load_student(ckpt)
    check_tokenizers(tokenizer, teacher_tok, student.config, teacher_model.config)
    if "layerwise" in s.stages:
        check_layerwise_teacher(student.config, teacher_model.config)

    rows_per_step = s.batch_size * s.grad_accum * world
    steps = _stage_steps(s, rows_per_step, None)
    need = max(steps.values()) * rows_per_step if steps else None
    rows = data_mod.pack_rows(s.data, tokenizer, s.seq_len, max_rows=need, progress=s.progress and is_main)
    if rows.shape[0] < s.batch_size * world:
        raise FinetuneError(f"--data {s.data} gives {rows.shape[0]} rows of {s.seq_len} tokens, fewer than one batch "
                            f"({s.batch_size} x {world} processes): lower --batch-size or --seq-len, or add data")
    if not steps:
        steps = _stage_steps(s, rows_per_step, rows.shape[0])
    dataset = data_mod.PackedDataset(rows)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        run = {
            "student": str(ckpt), "student_hash": ckpt_hash, "teacher": teacher, "teacher_sha256": teacher_info.sha256,
            "settings": {**asdict(s), "stages": list(s.stages)}, "stage_steps": steps, "world_size": world,
            "stages_done": run.get("stages_done", []), "stage_results": run.get("stage_results", {}),
            "sessions": run.get("sessions", 0) + 1, "finished": False,
        }
        _write_json_atomic(out / "run.json", run)
    state.wait_for_everyone()
    run = _read_json(out / "run.json")

    device = state.device
    teacher_model.requires_grad_(False).eval()
    teacher_model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    if s.compile:  # the frozen teacher's body runs every step: compile it too
        teacher_model.model = torch.compile(teacher_model.model)
    GlobalTrainer, LayerwiseTrainer, PerplexityCallback, DropPickledArgs = _trainer_classes()
    results = dict(run.get("stage_results", {}))
    in_sync = True
    for i, stage in enumerate(s.stages):
        stage_out = out / "stages" / stage
        if stage in run.get("stages_done", []):
            student = _load_student(stage_out)
            continue
        student.to(device)
        student.train()
        if stage == "layerwise":
            student.requires_grad_(False)
            for layer in student.model.layers:
                layer.self_attn.requires_grad_(True)
            model, trainer_cls, grad_ckpt = LayerwiseStudent(student), LayerwiseTrainer, False
            lr = s.layerwise_lr or s.lr
        else:
            student.requires_grad_(True)
            model, trainer_cls, lr, grad_ckpt = student, GlobalTrainer, s.lr, s.gradient_checkpointing
        ckpt_dir = out / "checkpoints" / stage
        args = _training_args(ckpt_dir, s, steps[stage], lr, bf16, grad_ckpt)
        cbs = [DropPickledArgs()]
        ppl_cb = None
        if eval_text is not None:
            ppl_cb = PerplexityCallback(student, tokenizer, eval_text, eval_seq_len, s.eval_every, s.eval_tokens, bf16)
            cbs.append(ppl_cb)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=data_mod.collate,
                              callbacks=cbs + list(callbacks or []), teacher=teacher_model,
                              tokens_per_step=rows_per_step * s.seq_len, loss_settings=s, bf16=bf16)
        if ppl_cb is not None:
            ppl_cb.trainer = trainer
        resume_from = get_last_checkpoint(str(ckpt_dir)) if s.resume and ckpt_dir.is_dir() else None
        trainer._start_step = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
        t0 = time.time()
        try:
            result = trainer.train(resume_from_checkpoint=resume_from)
        except OOM as e:
            raise FinetuneError(
                f"out of GPU memory in the {stage} stage (batch {s.batch_size} x seq {s.seq_len}): lower --batch-size "
                "and raise --grad-accum to keep the same tokens per step, lower --seq-len, or pass "
                f"--gradient-checkpointing ({e})") from e
        seconds = time.time() - t0
        done_steps = trainer.state.global_step - trainer._start_step
        history = trainer.state.log_history
        losses = [h for h in history if "loss" in h]
        results[stage] = {
            "steps": trainer.state.global_step,
            "tokens": trainer.state.global_step * rows_per_step * s.seq_len,
            "lr": lr,
            "final_loss": losses[-1]["loss"] if losses else None,
            "final_parts": {k: v for k, v in (losses[-1] if losses else {}).items()
                            if k in ("kl", "ce", "layer_rel_mse")},
            "train_loss_mean": result.metrics.get("train_loss"),
            "session_seconds": round(seconds, 2),
            "session_steps": done_steps,
            "tokens_per_second": round(done_steps * rows_per_step * s.seq_len / max(seconds, 1e-9), 1),
            "steady_tokens_per_second": _steady(losses),
            "resumed_from": resume_from,
            "log_history": history,
        }
        in_sync = _sync_check(student, device) and in_sync
        if i + 1 < len(s.stages):  # later stages (and a later --resume) start from this result
            if is_main:
                from mla_zoo.modeling.convert import ConversionReport, save_checkpoint

                save_checkpoint(student, tokenizer, ConversionReport.read(ckpt), stage_out, overwrite=True)
                run["stages_done"] = run.get("stages_done", []) + [stage]
                run["stage_results"] = {k: {kk: vv for kk, vv in v.items() if kk != "log_history"}
                                        for k, v in results.items()}
                _write_json_atomic(out / "run.json", run)
            state.wait_for_everyone()

    report = {
        "student": str(ckpt), "teacher": teacher, "teacher_source": asdict(teacher_info), "data": data_info,
        "settings": {**asdict(s), "stages": list(s.stages), "eval_seq_len": eval_seq_len, "bf16": bf16},
        "stage_steps": steps, "world_size": world, "tokens_per_step": rows_per_step * s.seq_len,
        "data_rows": rows.shape[0],
        "tokens_seen": sum(r["tokens"] for r in results.values()),
        "final_losses": {k: r["final_loss"] for k, r in results.items()},
        "stages": results,
        "perplexity_curve": [
            {"stage": st, "step": h["step"], "tokens": h.get("tokens"), "perplexity": h["perplexity"]}
            for st, r in results.items() for h in r.get("log_history", []) if "perplexity" in h
        ],
        "throughput_tokens_per_second": {k: r["tokens_per_second"] for k, r in results.items()},
        "steady_tokens_per_second": {k: r.get("steady_tokens_per_second") for k, r in results.items()},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "wall_seconds": round(time.time() - started, 2),
        "device_seconds": round((time.time() - started) * world, 2) if cuda else None,
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "replicas_in_sync": in_sync,
        "trainer_files": "checkpoints/<stage>/checkpoint-N: model.safetensors (weights), trainer_state.json, "
                         "optimizer.pt, scheduler.pt, rng_state*.pth (torch files the Trainer reads back with "
                         "weights_only=True); training_args.bin (a pickle) is deleted on save",
        **({"notes": s.extra} if s.extra else {}),
    }
    if not in_sync:
        raise FinetuneError("the DDP replicas' weights differ after training (please report this)")
    if is_main:
        _write_output(student.to(_final_dtype(ckpt)), tokenizer, ckpt, out, report)
        run["finished"] = True
        run["stage_results"] = {k: {kk: vv for kk, vv in v.items() if kk != "log_history"} for k, v in results.items()}
        _write_json_atomic(out / "run.json", run)
    state.wait_for_everyone()
    return report


def _write_output(student, tokenizer, ckpt: Path, out: Path, report: dict) -> None:
    """The final checkpoint into OUT: staged complete by save_checkpoint (remote code, tokenizer,
    conversion.json), then moved in file by file with training.json last, so a complete
    training.json always means a complete checkpoint."""
    from mla_zoo.modeling.convert import ConversionReport, save_checkpoint

    (out / "training.json").unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        final = save_checkpoint(student, tokenizer, ConversionReport.read(ckpt), staging / "model")
        plot = plot_training(report, final / "training.png")
        report["plot"] = "training.png" if plot else None
        (final / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        names = sorted(p.name for p in final.iterdir() if p.name != "training.json") + ["training.json"]
        for name in names:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(final / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plot_training(report: dict, path: Path) -> bool:
    """Loss per stage and perplexity against tokens seen (matplotlib Agg); False if unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = report["perplexity_curve"]
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 6, 4), squeeze=False)
    ax = axes[0][0]
    for stage, r in report["stages"].items():
        pts = [(h.get("tokens", h["step"]), h["loss"]) for h in r.get("log_history", []) if "loss" in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"{stage} loss", marker=".")
    ax.set_xlabel("tokens seen (per stage)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training loss")
    if curve:
        ax = axes[0][1]
        for stage in report["stages"]:
            pts = [(c["tokens"], c["perplexity"]) for c in curve if c["stage"] == stage]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=stage, marker="o")
        ax.set_xlabel("tokens seen (per stage)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("held-out perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# Hook for `mla-zoo build` (zoo/build.py): a recipe's [finetune] section
# ----------------------------------------------------------------------------------------------

RECIPE_SUMMARY = ("tokens_seen", "stage_steps", "final_losses", "throughput_tokens_per_second",
                  "steady_tokens_per_second", "perplexity_curve", "device", "world_size", "wall_seconds")


def recipe_settings(spec, resume: bool) -> FinetuneSettings:
    """FinetuneSettings from a recipe's FinetuneSpec (data_file | dataset (+ config, split), steps | tokens,
    learning_rate, batch_size, seq_len, warmup_ratio, and `options`: any other FinetuneSettings field,
    e.g. stages = "layerwise,global", ce_weight, temperature, grad_accum, eval_text, save_steps)."""
    from dataclasses import fields

    if getattr(spec, "data_file", None):
        data = str(spec.data_file)
    elif getattr(spec, "dataset", None):
        config, split = getattr(spec, "dataset_config", None) or "", getattr(spec, "dataset_split", None) or "train"
        data = f"hf:{spec.dataset}:{config}:{split}"
    else:
        raise FinetuneError("the recipe's [finetune] needs data_file or dataset")
    options = {str(k).replace("-", "_"): v for k, v in dict(getattr(spec, "options", None) or {}).items()}
    settable = {f.name for f in fields(FinetuneSettings)} - {"data", "resume", "overwrite", "extra"}
    unknown = sorted(set(options) - settable)
    if unknown:
        raise FinetuneError(f"unknown [finetune.options] {', '.join(unknown)}; known: {', '.join(sorted(settable))}")
    if isinstance(options.get("stages"), str):
        options["stages"] = tuple(x.strip() for x in options["stages"].split(",") if x.strip())
    base = dict(seq_len=spec.seq_len, tokens=spec.tokens, max_steps=spec.steps, batch_size=spec.batch_size,
                lr=spec.learning_rate, warmup_ratio=spec.warmup_ratio)
    return FinetuneSettings(data=data, **{**base, **options}, resume=resume, overwrite=not resume)


def run_recipe_stage(model_dir, out_dir, spec, recipe=None, teacher: str | None = None) -> dict:
    """`mla-zoo build`'s finetune stage: distil `model_dir` into `out_dir` (resuming what an
    interrupted run left there); the checkpoint lands at the top level of `out_dir`. The teacher
    defaults to the source recorded in the checkpoint's conversion.json. Returns a summary."""
    out = Path(out_dir)
    if teacher is None:
        teacher = _read_json(Path(model_dir) / "conversion.json").get("source", {}).get("spec")
        if not teacher:
            raise FinetuneError(f"{model_dir}/conversion.json names no source model: pass the teacher")
    report = run_finetune(model_dir, out, str(teacher), recipe_settings(spec, resume=(out / "run.json").is_file()))
    return {k: report.get(k) for k in RECIPE_SUMMARY}
