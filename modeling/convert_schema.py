"""The convert stage's schema: `ConvertSettings` (the `[conversion]` section of a recipe, the flags of
`mla-zoo convert`) and `ConversionReport` (conversion.json). No torch here: commands that only read
reports (`mla-zoo list`, `info`, `pull`, `publish`, `--help`) import this, not `convert.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import partial_rope, rank_allocation
from .common import SettingsError, synth_shards
from .schema import Report, Settings, setting
from .sources import SourceInfo

DTYPES = ("float32", "bfloat16", "float16")  # of the written weights: names of torch dtypes
SVD_METHODS = ("joint", "split", "whitened", "output-aware")  # lowrank; output-aware: convert.output_weights
REFITS = ("output", "none")  # refit: output = every o_proj re-solved against the source's attention outputs


@dataclass
class ConvertSettings(Settings):
    """How a model is converted: the `[conversion]` section of a recipe, the flags of `mla-zoo convert`."""

    kv_lora_rank: int | None = setting(
        None, min=1, aliases=["--kv-rank"],
        help="TOTAL latent width = d_kv x n_kv_heads (default: kv_rank_per_head x n_kv_heads)")
    kv_rank_per_head: int | None = setting(None, min=1, help="the paper's d_kv, latent width per KV head "
                                                              "(default head_dim/2)")
    rope_pairs: int | None = setting(None, min=1, help="RoPE frequency pairs kept per head, R (default head_dim/16)")
    rope_strategy: str = setting("2-norm", choices=partial_rope.STRATEGIES, help="which RoPE pairs each head keeps")
    svd: str = setting("output-aware", choices=SVD_METHODS,
                       help="low-rank method: output-aware (default) = whitened, with each KV head's value rows "
                            "weighted by the output projection that reads them; whitened = activation-aware joint "
                            "SVD; joint; split")
    refit: str = setting("output", choices=REFITS,
                         help="after the SVD: output (default) = each layer's output projection re-solved by ridge "
                              "least squares to reproduce the source's attention outputs on the calibration tokens, "
                              "layer by layer on the converted model's own inputs; none = the source's")
    calib_text: str | None = setting(None, path="file-or-dir",
                                     help="calibration data (2-norm, whitened, output-aware, refit): a UTF-8 text, "
                                          "or a directory written by `mla-zoo synth-data` (the teacher's own mixed "
                                          "samples: data-free, and closer to every domain than one text); default: a "
                                          "few of the model's own samples")
    calib_tokens: int | None = setting(None, min=1, help="calibration tokens (default 4096 of `calib_text`, "
                                                         "1024 self-sampled)")
    calib_seq_len: int = setting(512, min=2, help="calibration row length")
    dtype: str = setting("auto", choices=("auto", *DTYPES), help="dtype of the written weights (auto: the source's; "
                                                                  "bfloat16 for a GGUF source, which is dequantised)")
    seed: int = setting(0, min=0, help="random seed (self-sampled calibration)")
    rank_allocation: str = setting("uniform", choices=rank_allocation.SCHEMES,
                                   help="uniform: every layer kv_lora_rank; energy: per-layer ranks at the same total, "
                                        "more where the whitened SVD loses most (needs per-layer ranks in the model)")

    def check_files(self) -> None:
        """As Settings.check_files, and a `calib_text` directory must be one that `mla-zoo synth-data` wrote."""
        super().check_files()
        calib = Path(self.calib_text) if self.calib_text else None
        if calib is not None and calib.is_dir() and not synth_shards(calib):
            raise SettingsError(f"`calib_text` names a directory without `mla-zoo synth-data` shards "
                                f"(shard-*.safetensors): {calib}")


@dataclass
class KVCacheSize:
    """KV-cache size per token of the source model (before) and its MLA conversion (after)."""

    bytes_per_token_before: int  # all layers
    bytes_per_token_after: int
    reduction: float  # 1 - after / before
    values_per_token_per_layer_before: int
    values_per_token_per_layer_after: int


@dataclass
class CalibrationSource:
    kind: str  # "text" | "synth-data" (token ids of `mla-zoo synth-data`) | "self-samples"
    tokens: int
    file: str | None = None  # kinds "text" and "synth-data"
    note: str | None = None


@dataclass
class LayerRefit:
    """One layer's output refit (`refit`): ||W_o X - Y||^2 / ||Y||^2 on the calibration tokens, before and after."""

    error_before: float
    error_after: float


@dataclass
class OneShotPerplexity:
    """Perplexity before and after conversion, without fine-tuning (`mla-zoo convert --eval-text`)."""

    text: str
    tokens: int
    seq_len: int
    perplexity_before: float
    perplexity_after: float


@dataclass
class ConversionReport(Report):
    """conversion.json: what was converted, how, and what it saves."""

    SCHEMA_VERSION = 3  # 2: kv_lora_rank alone; 3: refit
    FILE = "conversion.json"

    settings: ConvertSettings  # resolved: every default filled in from the source's shape
    kv_cache: KVCacheSize
    svd_retained_energy: list[float]  # per layer
    rope_pairs: list[list[list[int]]]  # [layer][kv_head] -> kept pairs
    calibration: CalibrationSource | None  # None: no statistics needed
    source: SourceInfo
    source_sliding_window: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    one_shot: OneShotPerplexity | None = None
    kv_lora_ranks: list[int] | None = None  # per layer, when `rank_allocation` is not uniform
    output_refit: list[LayerRefit] | None = None  # per layer, when `refit` is output

    def mean_refit_errors(self) -> tuple[float, float]:
        """The output refit's relative output errors, means over layers: (before, after)."""
        n = len(self.output_refit)
        return (sum(r.error_before for r in self.output_refit) / n, sum(r.error_after for r in self.output_refit) / n)

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        """Version 1 (unversioned) stored the rank twice, as kv_rank and kv_lora_rank; versions before 3 had no
        refit (the output projections are the source's)."""
        settings = dict(data["settings"])
        if version < 2:
            settings["kv_lora_rank"] = settings.pop("kv_rank", settings.get("kv_lora_rank"))
            per_head = settings.get("kv_rank_per_head")
            if isinstance(per_head, float):  # the rank was not a multiple of the KV heads
                settings["kv_rank_per_head"] = int(per_head) if per_head.is_integer() else None
        settings.setdefault("refit", "none")
        return {**data, "settings": settings}
