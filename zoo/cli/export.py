"""`mla-zoo export`, `build-kernels` and `generate`: the ONNX side (mla_zoo.export)."""

from __future__ import annotations

import json
from dataclasses import asdict

from mla_zoo.export.exporter import ExportSettings
from mla_zoo.export.kernels.build import BuildSettings
from mla_zoo.export.runner import GenerateSettings

from .command import Command, Output


def export(settings: ExportSettings, out: Output) -> int:
    from mla_zoo.export.exporter import run_export

    report = run_export(settings)
    if out.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    nodes = "portable body inlined" if report.portable else f"{report.mla_nodes} MultiHeadLatentAttention nodes"
    widths = sorted(set(report.latent_dims))
    latent = str(widths[0]) if len(widths) == 1 else f"{widths[0]}-{widths[-1]} (per layer)"
    print(f"wrote {report.model_path} ({report.dtype}, {report.num_layers} layers, {nodes}; cache "
          f"{latent} + {report.key_rope_dim} values per token per layer, {report.cache_bytes_per_token:,} bytes "
          f"per token) in {report.seconds:.1f} s")
    return 0


def build_kernels(settings: BuildSettings, out: Output) -> int:
    from mla_zoo.export.kernels.build import build_kernels as build

    report = build(settings)
    if out.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"{'built' if report.rebuilt else 'up to date'}: {report.library}")
    return 0


def generate(settings: GenerateSettings, out: Output) -> int:
    from mla_zoo.export.runner import run_generate

    report = run_generate(settings)
    if out.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(report.text)
    return 0


COMMANDS = (
    Command("export", "export an MLA checkpoint to ONNX: one fused MultiHeadLatentAttention node per layer",
            (ExportSettings, Output), export),
    Command("build-kernels", "build the onnxruntime kernel library of the MultiHeadLatentAttention op",
            (BuildSettings, Output), build_kernels),
    Command("generate", "generate text from a checkpoint (torch) or an ONNX export (onnxruntime)",
            (GenerateSettings, Output), generate),
)
