"""`mla-zoo convert` and `mla-zoo eval`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mla_zoo.modeling.convert_schema import ConversionReport, ConvertSettings, OneShotPerplexity
from mla_zoo.modeling.schema import Settings, setting
from mla_zoo.zoo.evaluate import EvalSettings

from .command import Command, Output


@dataclass
class ConvertCommand(Settings):
    output: str = setting(aliases=["-o"], help="output checkpoint directory")
    source: str = setting("smollm2-135m", positional=True,
                          help="local checkpoint dir, .gguf file, Hub id, or the bundled 'smollm2-135m'")
    tokenizer: str | None = setting(None, path="dir", help="a directory with the tokenizer, for a SOURCE without one "
                                                           "(needed by calib_text and eval_text)")
    eval_text: str | None = setting(None, path="file", help="also measure one-shot perplexity before/after on this "
                                                            "text")
    eval_tokens: int | None = setting(None, min=2, help="score at most this many tokens of eval_text")
    eval_seq_len: int = setting(1024, min=2, help="window length of the one-shot perplexity")
    overwrite: bool = setting(False, help="replace an existing output directory (only a checkpoint that mla-zoo "
                                          "wrote)")


def convert(c: ConvertCommand, settings: ConvertSettings, out: Output) -> int:
    import torch
    from mla_zoo.modeling import convert, sources
    from mla_zoo.modeling.common import SettingsError, check_output_dir, read_text
    from mla_zoo.zoo.evaluate.metrics import perplexity

    # Every input is checked before the slow part: the output, the texts, the source, its tokenizer.
    check_output_dir(c.output, marker=ConversionReport.FILE, overwrite=c.overwrite,
                     inputs={"source": c.source, "tokenizer": c.tokenizer, "calib_text": settings.calib_text,
                             "eval_text": c.eval_text})
    c.check_files()
    settings.check_files()
    calib_file = settings.calib_text if settings.calib_text and not Path(settings.calib_text).is_dir() else None
    texts = {name: read_text(path, name) for name, path in (("calib_text", calib_file),  # a synth-data dir: ids
                                                            ("eval_text", c.eval_text)) if path}
    kind = sources.locate(c.source)
    if c.tokenizer is not None and not sources.has_tokenizer(c.tokenizer):
        raise SettingsError(f"`tokenizer` names a directory without tokenizer files: {c.tokenizer}")
    if c.tokenizer is None and kind == "local" and not sources.has_tokenizer(c.source) and texts:
        raise convert.tokenizer_needed(next(iter(texts)))
    model, tokenizer, info = sources.resolve(c.source, dtype=torch.float32)
    if c.tokenizer is not None:
        tokenizer = sources.load_tokenizer(c.tokenizer)
    if tokenizer is None and texts:
        raise convert.tokenizer_needed(next(iter(texts)))
    convert.resolve_settings(settings, model.config)  # range errors before any calibration work
    positions = getattr(model.config, "max_position_embeddings", None)
    if c.eval_text and positions is not None and c.eval_seq_len > positions:
        raise SettingsError(f"`eval_seq_len` {c.eval_seq_len} is beyond the model's {positions} positions")
    mla, report = convert.convert_model(model, tokenizer, info, settings)
    if c.eval_text:
        before = perplexity(model, tokenizer, texts["eval_text"], c.eval_seq_len, c.eval_tokens)
        after = perplexity(mla.float(), tokenizer, texts["eval_text"], c.eval_seq_len, c.eval_tokens)
        mla = mla.to(getattr(torch, report.settings.dtype))
        report.one_shot = OneShotPerplexity(c.eval_text, before.count, c.eval_seq_len, before.perplexity,
                                            after.perplexity)
    written = convert.save_checkpoint(mla, tokenizer, report, c.output, c.overwrite)
    if out.json:
        print(report.to_json(), end="")
    else:
        print(format_report(report))
        print(f"wrote {written}")
    return 0


def format_report(report: ConversionReport) -> str:
    """The human summary of a conversion."""
    s, kv, energy = report.settings, report.kv_cache, report.svd_retained_energy
    per_head = f"{s.kv_rank_per_head} per KV head (d_kv)" if s.kv_rank_per_head else "not a per-head width"
    calib = report.calibration
    lines = [
        f"source          {report.source.name}",
        f"partial RoPE    {s.rope_pairs} pairs per head, strategy {s.rope_strategy}",
        f"latent          kv_lora_rank {s.kv_lora_rank} total = {per_head}, svd {s.svd}",
        "calibration     " + ("none needed (fixed strategy, weight-only SVD)" if calib is None else
                              f"{calib.tokens} tokens of {calib.file}" if calib.kind == "text" else
                              f"{calib.tokens} tokens of the model's own samples ({calib.note})"),
        f"KV cache        {kv.values_per_token_per_layer_before} -> {kv.values_per_token_per_layer_after} values "
        f"per token per layer; {kv.bytes_per_token_before:,} -> {kv.bytes_per_token_after:,} bytes per token "
        f"({s.dtype}, all layers): -{100 * kv.reduction:.2f}%",
        f"SVD energy kept mean {sum(energy) / len(energy):.4f}, "
        f"min {min(energy):.4f} (layer {energy.index(min(energy))})",
    ]
    if report.output_refit:
        before, after = report.mean_refit_errors()
        lines.append(f"output refit    relative output error per layer, mean {before:.3f} -> {after:.3f}")
    lines.append(f"time            {report.seconds:.1f} s")
    if report.one_shot is not None:
        o = report.one_shot
        lines.append(f"perplexity      {o.perplexity_before:.3f} -> {o.perplexity_after:.3f} on {o.text} "
                     f"({o.tokens} tokens, one-shot, no fine-tuning)")
    lines += [f"warning         {w}" for w in report.warnings]
    return "\n".join(lines)


@dataclass
class EvalCommand(Settings):
    model: str = setting(positional=True, help="MLA checkpoint dir, or any SOURCE accepted by convert "
                                               "(e.g. smollm2-135m)")
    teacher: str | None = setting(None, help="the original model: adds its perplexity and the top-1 agreement with "
                                             "it")
    device: str | None = setting(None, help="cpu or cuda (default: cuda when available)")


def evaluate(c: EvalCommand, settings: EvalSettings, out: Output) -> int:
    import torch
    from mla_zoo.modeling import sources
    from mla_zoo.modeling.common import check_json_files
    from mla_zoo.zoo.evaluate.evaluation import evaluate

    settings.check_files()
    for spec in (c.model, c.teacher):  # both checked before either loads
        if spec is not None and sources.locate(spec) == "local":
            check_json_files(spec)
    device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if settings.suite:
        from mla_zoo.zoo.evaluate import format_suite
        from mla_zoo.zoo.evaluate.evaluation import evaluate_suite

        suite = evaluate_suite(c.model, c.teacher, settings, device=device, progress=not out.json)
        print(suite.to_json() if out.json else format_suite(suite), end="\n" if not out.json else "")
        return 0
    r = evaluate(c.model, settings, teacher=c.teacher, device=device)
    if out.json:
        print(r.to_json(), end="")
        return 0
    print(f"{r.model}: perplexity {r.perplexity:.3f} over {r.tokens} tokens of {r.text}; "
          f"KV cache {r.kv_cache_bytes_per_token:,} bytes/token ({r.kv_cache_dtype})")
    if r.top1_agreement is not None:
        print(f"teacher {r.teacher}: perplexity {r.teacher_perplexity:.3f}; "
              f"top-1 agreement {100 * r.top1_agreement:.1f}%")
    for b in r.behaviour:
        print(f"[{'ok' if b.ok else '--'}] {b.prompt} -> {b.answer!r}")
    for task, metrics in r.tasks.items():
        print(f"{task}: {metrics}")
    return 0


COMMANDS = (
    Command("convert", "convert a Llama/Mistral/Qwen2 checkpoint to MLA (MHA2MLA)",
            (ConvertCommand, ConvertSettings, Output), convert),
    Command("eval", "perplexity and KV-cache size of a model on a text, or the multi-domain suite against its "
                    "original (--suite)",
            (EvalCommand, EvalSettings, Output), evaluate),
)
