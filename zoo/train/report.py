"""What `mla-zoo finetune` writes about a run: run.json (its state, for --resume) and training.json
(its report) as typed, versioned reports, and the training curve `training.png`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mla_zoo.modeling.schema import Report
from mla_zoo.modeling.sources import SourceInfo

from .data import DataSource
from .settings import FinetuneSettings

TRAINER_FILES = ("checkpoints/<stage>/checkpoint-N: model.safetensors (weights), trainer_state.json, optimizer.pt, "
                 "scheduler.pt, rng_state*.pth (torch files the Trainer reads back with weights_only=True); "
                 "training_args.bin (a pickle) is deleted on save")


def upgrade_settings(settings: dict) -> dict:
    """FinetuneSettings as the first, unversioned files wrote them (other names, run options inside)."""
    s = {k: v for k, v in settings.items() if k not in ("resume", "overwrite", "progress", "extra")}
    s["learning_rate"] = s.pop("lr", s.get("learning_rate"))
    s["kl_chunk"] = s.pop("chunk_size", s.get("kl_chunk"))
    return s


@dataclass
class StageResult:
    """One stage of a run (the last session's numbers where the stage was resumed)."""

    steps: int  # global step reached
    tokens: int
    learning_rate: float
    final_loss: float | None
    final_parts: dict[str, Any]  # kl, ce or layer_rel_mse at the last log
    train_loss_mean: float | None
    session_seconds: float
    session_steps: int
    tokens_per_second: float
    steady_tokens_per_second: float | None
    resumed_from: str | None
    log_history: list[dict[str, Any]] = field(default_factory=list)  # the Trainer's logs
    kl_impl: str | None = None  # the global stage's loss as run (liger, fused or chunked; `kl_impl` auto resolved)


@dataclass
class RunState(Report):
    """run.json: what a run is (student and teacher identity, settings) and how far it got."""

    FILE = "run.json"
    SCHEMA_VERSION = 2

    student: str
    student_hash: str
    teacher: str
    teacher_sha256: str
    settings: FinetuneSettings
    stage_steps: dict[str, int]
    world_size: int
    stages_done: list[str] = field(default_factory=list)
    stage_results: dict[str, StageResult] = field(default_factory=dict)  # without log histories
    sessions: int = 1
    finished: bool = False

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        results = {k: {**v, "learning_rate": v.get("lr")} for k, v in data.get("stage_results", {}).items()}
        for r in results.values():
            r.pop("lr", None)
        return {**data, "settings": upgrade_settings(data["settings"]), "stage_results": results}


@dataclass
class PerplexityPoint:
    stage: str
    step: int
    tokens: int | None
    perplexity: float


@dataclass
class TrainingReport(Report):
    """training.json: the run's settings, data, losses, perplexity curve and throughput."""

    FILE = "training.json"
    SCHEMA_VERSION = 2

    student: str
    teacher: str
    teacher_source: SourceInfo
    data: DataSource
    settings: FinetuneSettings  # resolved: stages in order, bf16 and eval_seq_len filled in
    stage_steps: dict[str, int]
    world_size: int
    tokens_per_step: int
    data_rows: int
    tokens_seen: int
    final_losses: dict[str, float | None]
    stages: dict[str, StageResult]
    perplexity_curve: list[PerplexityPoint]
    throughput_tokens_per_second: dict[str, float]
    steady_tokens_per_second: dict[str, float | None]
    device: str
    wall_seconds: float
    device_seconds: float | None
    cpu_seconds: float
    replicas_in_sync: bool
    trainer_files: str = TRAINER_FILES
    plot: str | None = None
    peak_gpu_memory_bytes: list[int] | None = None  # per process (rank order): torch.cuda.max_memory_allocated

    SUMMARY = ("tokens_seen", "stage_steps", "final_losses", "throughput_tokens_per_second",
               "steady_tokens_per_second", "perplexity_curve", "device", "world_size", "wall_seconds")

    def summary(self) -> dict:
        """The headline numbers (what `mla-zoo build` keeps in its finetune stage record)."""
        full = self.to_dict()
        return {k: full[k] for k in self.SUMMARY}

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        stages = {k: {**{kk: vv for kk, vv in v.items() if kk != "lr"}, "learning_rate": v.get("lr")}
                  for k, v in data["stages"].items()}
        old = {k: v for k, v in data.items() if k != "notes"}
        return {**old, "settings": upgrade_settings(data["settings"]), "stages": stages}


def plot_training(report: TrainingReport, path: Path) -> None:
    """Loss per stage and perplexity against tokens seen (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.perplexity_curve
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 6, 4), squeeze=False)
    ax = axes[0][0]
    for stage, r in report.stages.items():
        pts = [(h.get("tokens", h["step"]), h["loss"]) for h in r.log_history if "loss" in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"{stage} loss", marker=".")
    ax.set_xlabel("tokens seen (per stage)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training loss")
    if curve:
        ax = axes[0][1]
        for stage in report.stages:
            pts = [(c.tokens, c.perplexity) for c in curve if c.stage == stage]
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
