"""The `transformers.Trainer` classes of `mla-zoo finetune` (one per stage), their callbacks and arguments.

Importing this module imports the Trainer stack (seconds): `finetune.py` imports it when a run starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import torch
from mla_zoo.modeling.common import replace_directory
from mla_zoo.zoo.evaluate.metrics import perplexity
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from .distill import distill_loss, on_policy_step, pick_kl_impl, student_rows, teacher_layer_io


class DistillTrainer(Trainer):
    """What both stages share: the frozen teacher, the loss parts and tokens/s in the logs.

    tokens_per_step: tokens of one optimizer step over all processes; start_step: the global step
    this session starts from (that of the checkpoint it resumes, else 0), for its tokens/s.
    """

    def __init__(self, *args, teacher, tokens_per_step: int, loss_settings, bf16: bool, start_step: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.tokens_per_step = tokens_per_step
        self.loss_settings = loss_settings  # FinetuneSettings: temperature, ce_weight, kl_chunk
        self.use_bf16 = bf16
        self.start_step = start_step
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: the Trainer scales it for GA
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._log_time = time.time()
        self._log_step = start_step

    def track(self, parts: dict) -> None:
        """Add a step's loss parts to the running means shown at the next log."""
        for k, v in parts.items():
            v = v.detach().float()
            self._sums[k] = v if k not in self._sums else self._sums[k] + v
        self._count += 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            now = time.time()
            steps = self.state.global_step - self._log_step
            if steps > 0:
                logs["tokens_per_second"] = round(steps * self.tokens_per_step / max(now - self._log_time, 1e-9), 1)
            logs["tokens"] = self.state.global_step * self.tokens_per_step
            for k, v in self._sums.items():
                v = v / max(self._count, 1)
                logs[k] = round(float(v), 6) if v.numel() == 1 else [round(float(x), 6) for x in v]
            self._sums, self._count = {}, 0
            self._log_time, self._log_step = now, self.state.global_step
        super().log(logs, *args, **kwargs)
        if "loss" in logs:
            for cb in self.callback_handler.callbacks:
                bar = getattr(cb, "training_bar", None) if isinstance(cb, ProgressCallback) else None
                if bar is not None:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_second', 0):.0f}")

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_bf16)


class GlobalTrainer(DistillTrainer):
    """Whole-model distillation: KL (+ CE) between final hidden states through the LM heads, with the loss
    implementation (`kl_impl`: liger, fused or chunked) picked once for the run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.loss_settings
        self.kl_impl = pick_kl_impl(s.kl_impl, self.model.lm_head, self.teacher.lm_head, s.ce_weight, self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]  # [B, S]
        s = self.loss_settings
        on_policy = on_policy_step(s.on_policy, s.seed, self.state.global_step)
        if on_policy:  # the student writes the rows' second halves itself; the teacher scores them
            ids = student_rows(self.accelerator.unwrap_model(model), ids, ids.shape[1] // 2)
        with torch.no_grad():
            t_hidden = self.teacher.model(input_ids=ids, use_cache=False).last_hidden_state  # [B, S, H]
        # Through the (possibly DDP-wrapped) model: its forward returns all hidden states; the
        # LM head then runs chunk by chunk below (logits_to_keep=1 keeps its own logits tiny).
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        s_hidden = out.hidden_states[-1]  # [B, S, H]
        student = self.accelerator.unwrap_model(model)
        with self.autocast(ids.device):
            loss, parts = distill_loss(s_hidden, t_hidden, student.lm_head, self.teacher.lm_head, ids, None,
                                       s.temperature, s.ce_weight, s.kl_chunk, impl=self.kl_impl)
        self.track({**parts, "on_policy": torch.tensor(float(on_policy))})
        return (loss, out) if return_outputs else loss


class LayerwiseTrainer(DistillTrainer):
    """Attention blocks against the original blocks on the teacher's hidden states (`distill.LayerwiseStudent`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        layer_in, targets = teacher_layer_io(self.teacher, inputs["input_ids"])
        loss, parts = model(layer_in, targets)
        self.track({"layer_rel_mse": parts["per_layer"]})
        return (loss, parts) if return_outputs else loss


class PerplexityCallback(TrainerCallback):
    """Perplexity of the student on the eval text at the start and every `every` steps (main process).
    `trainer` is set once the Trainer that logs the values exists."""

    def __init__(self, student, tokenizer, text: str, seq_len: int, every: int, max_tokens: int, bf16: bool):
        self.student, self.tokenizer, self.text = student, tokenizer, text
        self.seq_len, self.every, self.max_tokens, self.bf16 = seq_len, every, max_tokens, bf16
        self.trainer: DistillTrainer | None = None

    def _measure(self, state) -> None:
        if not state.is_world_process_zero:
            return
        was_training = self.student.training
        self.student.eval()
        device = next(self.student.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            ppl = perplexity(self.student, self.tokenizer, self.text, self.seq_len, self.max_tokens,
                             progress=False).perplexity
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


# ----------------------------------------------------------------------------- checkpoints
#
# The Trainer writes checkpoint-N straight into its output_dir, file by file: a run killed while
# saving leaves a partial checkpoint that the next --resume would pick as the newest. So the
# Trainer's output_dir is a staging dir (`STAGING` inside the stage's checkpoint dir), and
# `CheckpointCommit` renames each checkpoint into the checkpoint dir once the Trainer has written
# all of it: there, every checkpoint-N is complete.

STAGING = ".staging"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class CheckpointCommit(TrainerCallback):
    """After each save: drop the pickle the Trainer writes (training_args.bin, never read back), move
    the complete checkpoint from the staging dir into `checkpoint_dir` in one rename, and keep the
    newest `keep` there. Every process waits for all to have written their files first."""

    def __init__(self, checkpoint_dir: Path, keep: int | None):
        self.checkpoint_dir, self.keep = Path(checkpoint_dir), keep

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # under DDP every rank writes its own rng_state_<rank>.pth
        if state.is_world_process_zero:
            name = f"checkpoint-{state.global_step}"
            staged = Path(args.output_dir) / name
            (staged / "training_args.bin").unlink(missing_ok=True)
            replace_directory(staged, self.checkpoint_dir / name)
            done = sorted(checkpoints(self.checkpoint_dir), key=lambda c: c[0])
            for _, old in done[: max(0, len(done) - self.keep)] if self.keep else []:
                shutil.rmtree(old, ignore_errors=True)
        PartialState().wait_for_everyone()


def checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint-N dirs in a stage's checkpoint dir."""
    found = []
    for path in Path(checkpoint_dir).glob("checkpoint-*"):
        m = CHECKPOINT.fullmatch(path.name)
        if m and path.is_dir():
            found.append((int(m[1]), path))
    return found


def incomplete(path: Path, step: int) -> str | None:
    """Why a checkpoint dir cannot be resumed from (None: it can). The Trainer writes trainer_state.json
    last, after the weights, optimizer, scheduler and RNG states."""
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json: its save was interrupted"
    try:
        saved = json.loads(state.read_text())
    except json.JSONDecodeError:
        return "trainer_state.json is cut off: its save was interrupted"
    if saved.get("global_step") != step:
        return f"trainer_state.json is of step {saved.get('global_step')}"
    if not any(path.glob("model*.safetensors")):
        return "no model weights"
    return None


def resumable_checkpoint(checkpoint_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a stage that can be resumed from (None: none), and the newer ones that
    cannot, with why (left by a run killed while saving, before saves were atomic)."""
    broken = []
    for step, path in sorted(checkpoints(checkpoint_dir), key=lambda c: c[0], reverse=True):
        why = incomplete(path, step)
        if why is None:
            return path, broken
        broken.append((path, why))
    return None, broken


def training_args(checkpoint_dir: Path, s, steps: int, lr: float, bf16: bool, grad_ckpt: bool,
                  progress: bool) -> TrainingArguments:
    """The Trainer's arguments for one stage of `s` (FinetuneSettings): AdamW (0.9, 0.95), clip 1.0, cosine.
    The Trainer saves into `checkpoint_dir`/STAGING (see `CheckpointCommit`); `save_total_limit` is
    applied by `CheckpointCommit`. Warm-up steps are rounded down: a stage of few steps (a 5-step
    run's 1-step layer-wise stage) must not spend them all at the warm-up's learning rate of 0."""
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5.2x renamed gradient checkpointing (the old name is a deprecated alias there; 5.17 has only it)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(Path(checkpoint_dir) / STAGING), per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=lr, weight_decay=s.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=int(s.warmup_ratio * steps), max_steps=steps, logging_steps=s.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=s.save_steps, save_total_limit=None,
        bf16=bf16, seed=s.seed, data_seed=s.seed, report_to="none", disable_tqdm=not progress,
        dataloader_drop_last=True, dataloader_num_workers=0, remove_unused_columns=False,
        ddp_find_unused_parameters=False, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # lets accelerate run several CPU processes (gloo) under torchrun
        **{ckpt: grad_ckpt, f"{ckpt}_kwargs": {"use_reentrant": False} if grad_ckpt else None},
    )
