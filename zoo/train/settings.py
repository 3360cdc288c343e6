"""The settings of `mla-zoo finetune` (the `[finetune]` section of a recipe and the command's flags) and of
`mla-zoo synth-data`, importable without torch (the CLI reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from mla_zoo.modeling.common import SettingsError
from mla_zoo.modeling.schema import Settings, setting

LAYERWISE_INPUTS = ("teacher", "student")  # distill.LayerwiseStudent
STAGES = ("layerwise", "global")  # in the order they run: layer-wise first measured better (bench/RESULTS.md)
# torch.compile of the global stage: ~90 s up front for 110k -> 184k tokens/s with the compiled KL chunk (H100,
# bench/RESULTS.md, 2026-12-07), so it pays from 90 / (1/110k - 1/184k) = 25M tokens on (32M with the eager loss's
# 130 s for 76.8k -> 111.1k); `compile` unset means on from 32M (CUDA only). Those 90 s were the whole model's
# compilation; `compile` now compiles each decoder layer in place (finetune.compile_layers: one graph for all
# layers, 5.4x less compile time on a CPU), so the threshold is conservative until a GPU measures it.
COMPILE_PAYS_TOKENS = 32_000_000
KL_CHUNK = 1024  # positions per chunk of the vocabulary-sized KL: 1024 x vocab logits (100 MB bf16 at 49k vocab)


@dataclass
class FinetuneSettings(Settings):
    """How a converted checkpoint is recovered by distillation from its original model."""

    data: str = setting(path="data", help="file/dir/glob of .txt/.jsonl/.parquet, a synth-data dir, "
                                          "hf:NAME[:CONFIG][:SPLIT], or a comma-separated mix of them")
    seq_len: int = setting(1024, min=2, help="tokens per training row")
    tokens: int | None = setting(None, min=1, help="length of the global stage in tokens")
    max_steps: int | None = setting(None, min=1, help="length of the global stage in optimizer steps "
                                                      "(neither: one pass over the data)")
    batch_size: int = setting(8, min=1, help="sequences per device per micro-step")
    grad_accum: int = setting(1, min=1, help="micro-steps per optimizer step")
    learning_rate: float = setting(1e-4, gt=0, aliases=["--lr"], help="peak learning rate (cosine schedule)")
    warmup_ratio: float = setting(0.05, min=0, lt=1, help="warm-up share of each stage's steps")
    weight_decay: float = setting(0.0, min=0, help="AdamW weight decay")
    temperature: float = setting(1.0, gt=0, help="distillation temperature (KL scaled by T^2)")
    ce_weight: float = setting(0.0, min=0, help="weight of next-token CE added to the KL")
    stages: tuple[str, ...] = setting(STAGES, choices=STAGES, sep=",",
                                      help="comma-separated: layerwise,global (layer-wise runs first) or one alone")
    layerwise_steps: int | None = setting(None, min=1, help="default: 10%% of the global stage (all steps when alone)")
    layerwise_lr: float | None = setting(None, gt=0, help="default: learning_rate")
    layerwise_inputs: str = setting("teacher", choices=LAYERWISE_INPUTS,
                                    help="the layer-wise stage's block inputs: teacher = the original's hidden states "
                                         "(every block alone); student = the student's own earlier layers' (detached; "
                                         "the output refit's objective, one more no-grad forward a step)")
    trainable: str = setting("all", choices=("all", "attention"),
                             help="what the global stage trains: every weight, or the attention blocks alone (what "
                                  "the conversion changed; embeddings, MLPs, norms and head stay the teacher's)")
    save_steps: int = setting(500, min=1, help="steps between Trainer checkpoints")
    save_total_limit: int | None = setting(2, min=1, help="Trainer checkpoints kept per stage")
    bf16: bool | None = setting(None, help="bf16 autocast and a bf16 teacher (default: on CUDA)")
    gradient_checkpointing: bool = setting(False, help="recompute activations in backward (less memory)")
    compile: bool | None = setting(None, help="torch.compile the decoder layers of student and teacher (default: on "
                                               "CUDA when the global stage has >= COMPILE_PAYS_TOKENS tokens)")
    bf16_weights: bool = setting(False, help="the global stage trains bf16 weights (no fp32 master copy, no "
                                             "autocast): less memory and traffic; measure the quality first")
    on_policy: float = setting(0.0, min=0, max=1, help="share of global-stage steps on rows the STUDENT writes (the "
                                                       "first half of a data row, sampled on), scored by the teacher "
                                                       "(GKD / MiniLLM)")
    kl_impl: str = setting("auto", choices=("auto", "fused", "liger", "chunked"),
                           help="the global stage's loss: fused linear+KL in plain torch, liger-kernel's fused "
                                "JSD (CUDA) or checkpointed chunks; auto: fused where it applies (faster than liger "
                                "on an H100, bench/train_step_gpu.py), else chunked")
    eval_text: str | None = setting(None, path="file", help="measure perplexity on this text during training")
    eval_every: int = setting(100, min=1, help="steps between perplexity measurements")
    eval_tokens: int = setting(16384, min=2, help="tokens of eval_text scored each time")
    eval_seq_len: int | None = setting(None, min=2, help="window length of those measurements (default: 1024, as "
                                                          "`mla-zoo eval`, whatever seq_len is)")
    seed: int = setting(0, min=0, help="random seed (data order, initialisation of the Trainer)")
    kl_chunk: int = setting(KL_CHUNK, min=1, help="positions per chunk of the vocabulary-sized KL")
    logging_steps: int = setting(10, min=1, help="steps between loss logs")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens is not None and self.max_steps is not None:
            raise SettingsError("give `tokens` or `max_steps`, not both")
        if not self.stages:
            raise SettingsError(f"`stages` must name at least one of {', '.join(STAGES)}")
        self.stages = tuple(st for st in STAGES if st in self.stages)  # layer-wise first, each once


# synth-data's `mix`, and of finetune's `teacher:MIX` data: SOURCE=SHARE joined by "+"
MIX = r"(chat|bos|text)=(\d+(\.\d*)?|\.\d+)(\+(chat|bos|text)=(\d+(\.\d*)?|\.\d+))*"


@dataclass
class SynthSettings(Settings):
    """How distillation data is sampled from the original model (`mla-zoo synth-data`)."""

    tokens: int = setting(help="tokens to write (prompts + answers)", min=1)
    mix: str = setting("chat=0.4+bos=0.2+text=0.4", pattern=MIX,
                       what="SOURCE=SHARE joined by '+' (sources: chat, bos, text)",
                       help="shares of the tokens: chat = the teacher's answers to prompts it wrote itself, "
                            "bos = unconditional samples from BOS, text = its continuations of plain-text "
                            "openings (prose, code, documentation, dialogue)")
    prompt_pool: int = setting(2048, min=1, help="distinct prompts the teacher writes for the chat share (at most "
                                                 "one per 128 of its tokens)")
    seq_len: int = setting(512, min=2, help="row length of the packed shards")
    batch_size: int | None = setting(None, min=1, help="requests per generation call (default: 1024 on CUDA, where "
                                                      "continuous batching keeps them busy, 64 on CPU)")
    temperature: float = setting(1.0, gt=0, help="sampling temperature of the samples (1: the teacher's own "
                                                 "distribution)")
    prompt_temperature: float = setting(0.7, gt=0, help="sampling temperature when the teacher writes the prompts "
                                                        "(lower: fewer garbled prompts)")
    fill_rows: bool = setting(True, help="each sample runs to seq_len tokens: the teacher writes on past its EOS "
                                         "(its next turn or document), so no row ends early and every generated "
                                         "token is kept (fixed batches, the fastest); off: answers stop at EOS")
    max_new_tokens: int | None = setting(None, min=1, help="answer length cap without fill_rows (default: seq_len)")
    engine: str = setting("auto", choices=("auto", "continuous", "generate"),
                          help="continuous = transformers' continuous batching (finished rows stop costing), "
                               "generate = fixed batches; auto = generate with fill_rows, else continuous on CUDA")
    cache: str = setting("auto", choices=("auto", "static", "dynamic"),
                         help="generate()'s KV cache: static (fixed shapes, fast on CUDA), dynamic; auto = static on "
                              "CUDA")
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"),
                         help="sampling dtype (auto: bf16 on CUDA, fp32 on CPU)")
    decode_attention: str = setting("auto", choices=("auto", "packed", "flex"),
                                    help="the teacher's decode attention with engine generate: packed = SDPA with a "
                                         "GQA group's heads as rows, reading the whole static cache each step; flex = "
                                         "FlexAttention over the filled cache slots only (fast only compiled: a static "
                                         "cache on CUDA; 1.6x packed's tokens/s on an H100); auto = flex there, else "
                                         "packed")
    seed: int = setting(0, min=0, help="random seed (prompt order and sampling)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fill_rows and self.max_new_tokens is not None:
            raise SettingsError("`max_new_tokens` caps answers that stop at EOS; with `fill_rows` every sample runs "
                                "to seq_len: drop it, or turn fill_rows off")
        if self.fill_rows and self.engine == "continuous":
            raise SettingsError("`fill_rows` samples fixed batches in which no row ends: use engine generate (or "
                                "auto), or turn fill_rows off for continuous batching")
