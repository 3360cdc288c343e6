"""`mla-zoo synth-data` and `mla-zoo finetune`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from mla_zoo.modeling.common import is_main_process
from mla_zoo.modeling.schema import Settings, setting
from mla_zoo.zoo.train.settings import FinetuneSettings, SynthSettings

from .command import Command, Output


@dataclass
class SynthCommand(Settings):
    source: str = setting(positional=True, help="the original model: any SOURCE accepted by convert "
                                                "(e.g. smollm2-135m)")
    output: str = setting(aliases=["-o"], help="output directory (shards + synth.json)")
    overwrite: bool = setting(False, help="replace an existing output directory (only one that synth-data wrote)")


def synth(c: SynthCommand, settings: SynthSettings) -> int:
    from mla_zoo.modeling import sources
    from mla_zoo.zoo.train.synth import synth_data

    sources.locate(c.source)  # a missing path fails before any model loads
    r = synth_data(c.source, c.output, settings, overwrite=c.overwrite, progress=True,
                   distributed=True)  # under torchrun / accelerate launch, the processes share the work
    if not is_main_process():  # one summary
        return 0
    print(f"wrote {r.tokens:,} tokens ({r.samples} samples from {r.prompt_count} prompts, "
          f"{r.rows} rows of {r.settings.seq_len}) to {c.output} in {r.seconds:.1f} s; "
          f"generation {r.generated_tokens_per_second:,.0f} tokens/s on {r.device} "
          f"({r.settings.cache} cache, {r.settings.dtype}) x {r.world_size} processes")
    return 0


@dataclass
class FinetuneCommand(Settings):
    checkpoint: str = setting(positional=True, help="an mla-zoo checkpoint (from `mla-zoo convert`)")
    output: str = setting(aliases=["-o"], help="run directory; the fine-tuned checkpoint is written here")
    teacher: str = setting(help="the original model (any SOURCE, e.g. smollm2-135m)")
    resume: bool = setting(False, help="continue the run in OUTPUT from its newest complete checkpoints")
    overwrite: bool = setting(False, help="delete an existing OUTPUT (only a run directory, with run.json) and "
                                          "start over")
    progress: bool = setting(True, help="progress bars (shown only when stderr is a terminal)")


def finetune(c: FinetuneCommand, settings: FinetuneSettings, out: Output) -> int:
    from mla_zoo.modeling import sources
    from mla_zoo.zoo.train.finetune import run_finetune

    sources.locate(c.teacher)  # a missing path fails before any model loads
    r = run_finetune(c.checkpoint, c.output, c.teacher, settings, resume=c.resume, overwrite=c.overwrite,
                     progress=c.progress and sys.stderr.isatty())
    if not is_main_process():  # under torchrun: one summary
        return 0
    if out.json:
        data = r.to_dict()
        del data["stages"]  # the per-step logs: training.json has them
        print(json.dumps(data, indent=2))
        return 0
    losses = ", ".join(f"{k} {v:.4g}" for k, v in r.final_losses.items() if v is not None)
    tput = ", ".join(f"{k} {v:,.0f}" for k, v in r.throughput_tokens_per_second.items())
    print(f"trained {r.tokens_seen:,} tokens ({r.stage_steps}); final loss: {losses}; "
          f"tokens/s: {tput} on {r.device} x {r.world_size}")
    if r.perplexity_curve:
        first, last = r.perplexity_curve[0], r.perplexity_curve[-1]
        print(f"perplexity {first.perplexity:.3f} -> {last.perplexity:.3f} on {settings.eval_text}")
    print(f"wrote {c.output}")
    return 0


COMMANDS = (
    Command("synth-data", "sample distillation data from the original model (data-free)",
            (SynthCommand, SynthSettings), synth),
    Command("finetune", "recover a converted checkpoint by distillation from the original model",
            (FinetuneCommand, FinetuneSettings, Output), finetune),
)
