"""The `transformers.Trainer` classes of `mla-zoo finetune` (one per stage), their callbacks and arguments.

Importing this module imports the Trainer stack (seconds): `finetune.py` imports it when a run starts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from mla_zoo.zoo.evaluate.metrics import perplexity
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from .distill import distill_loss, on_policy_step, student_rows, teacher_layer_io


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
    """Whole-model distillation: chunked KL (+ CE) between final hidden states through the LM heads."""

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
                                       s.temperature, s.ce_weight, s.kl_chunk, impl=s.kl_impl)
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


def training_args(output_dir: Path, s, steps: int, lr: float, bf16: bool, grad_ckpt: bool,
                  progress: bool) -> TrainingArguments:
    """The Trainer's arguments for one stage of `s` (FinetuneSettings): AdamW (0.9, 0.95), clip 1.0, cosine."""
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5.2x renamed gradient checkpointing (the old name is a deprecated alias there; 5.17 has only it)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=lr, weight_decay=s.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(s.warmup_ratio * steps), max_steps=steps, logging_steps=s.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        bf16=bf16, seed=s.seed, data_seed=s.seed, report_to="none", disable_tqdm=not progress,
        dataloader_drop_last=True, dataloader_num_workers=0, remove_unused_columns=False,
        ddp_find_unused_parameters=False, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # lets accelerate run several CPU processes (gloo) under torchrun
        torch_compile=s.compile,
        **{ckpt: grad_ckpt, f"{ckpt}_kwargs": {"use_reentrant": False} if grad_ckpt else None},
    )
