"""The `mla-zoo` command line: one subcommand per stage of recipe -> convert -> ... -> publish."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_convert(args) -> int:
    import torch
    from mla_zoo.modeling import convert, sources
    from mla_zoo.modeling.common import read_text

    convert.check_output_dir(args.output, args.overwrite)  # fail before the slow part
    settings = convert.ConvertSettings(
        kv_lora_rank=args.kv_rank, kv_rank_per_head=args.kv_rank_per_head, rope_pairs=args.rope_pairs,
        rope_strategy=args.rope_strategy, svd=args.svd, calib_text=args.calib_text,
        calib_tokens=args.calib_tokens, dtype=args.dtype, seed=args.seed,
    )
    if args.calib_text:  # check it before loading the model
        read_text(args.calib_text, "calib_text")
    model, tokenizer, info = sources.resolve(args.source, dtype=torch.float32)
    convert.resolve_settings(settings, model.config)  # range errors before any calibration work
    mla, report = convert.convert_model(model, tokenizer, info, settings)
    if args.eval_text:
        from mla_zoo.zoo.evaluate import perplexity

        text = read_text(args.eval_text, "eval_text")
        before = perplexity(model, tokenizer, text, args.eval_seq_len, args.eval_tokens)
        after = perplexity(mla.float(), tokenizer, text, args.eval_seq_len, args.eval_tokens)
        mla = mla.to(getattr(torch, report.settings.dtype))
        report.one_shot = convert.OneShotPerplexity(args.eval_text, before["tokens"], args.eval_seq_len,
                                                    before["perplexity"], after["perplexity"])
    out = convert.save_checkpoint(mla, tokenizer, report, args.output, args.overwrite)
    if args.json:
        print(report.to_json(), end="")
    else:
        print(format_report(report))
        print(f"wrote {out}")
    return 0


def format_report(report) -> str:
    """The human summary `mla-zoo convert` prints."""
    s, kv, energy = report.settings, report.kv_cache, report.svd_retained_energy
    per_head = f"{s.kv_rank_per_head} per KV head (d_kv)" if s.kv_rank_per_head else "not a per-head width"
    lines = [
        f"source          {report.source.name}",
        f"partial RoPE    {s.rope_pairs} pairs per head, strategy {s.rope_strategy}",
        f"latent          kv_lora_rank {s.kv_lora_rank} total = {per_head}, svd {s.svd}",
        f"calibration     {_calib_line(report.calibration)}",
        f"KV cache        {kv.values_per_token_per_layer_before} -> {kv.values_per_token_per_layer_after} values "
        f"per token per layer; {kv.bytes_per_token_before:,} -> {kv.bytes_per_token_after:,} bytes per token "
        f"({s.dtype}, all layers): -{100 * kv.reduction:.2f}%",
        f"SVD energy kept mean {sum(energy) / len(energy):.4f}, "
        f"min {min(energy):.4f} (layer {energy.index(min(energy))})",
        f"time            {report.seconds:.1f} s",
    ]
    if report.one_shot is not None:
        o = report.one_shot
        lines.append(f"perplexity      {o.perplexity_before:.3f} -> {o.perplexity_after:.3f} on {o.text} "
                     f"({o.tokens} tokens, one-shot, no fine-tuning)")
    lines += [f"warning         {w}" for w in report.warnings]
    return "\n".join(lines)


def _calib_line(c) -> str:
    if c is None:
        return "none needed (fixed strategy, weight-only SVD)"
    if c.kind == "text":
        return f"{c.tokens} tokens of {c.file}"
    return f"{c.tokens} tokens of the model's own samples ({c.note})"


def cmd_eval(args) -> int:
    import torch
    from mla_zoo.zoo.evaluate import evaluate

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [t for t in (args.tasks or "").split(",") if t]
    result = evaluate(args.model, args.text, args.seq_len, args.max_tokens, dtype, teacher=args.teacher,
                      prompts=args.prompts, tasks=tasks, device=device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}: perplexity {result['perplexity']:.3f} over {result['tokens']} tokens of "
          f"{result['text']}; KV cache {result['kv_cache_bytes_per_token']:,} bytes/token ({result['kv_cache_dtype']})")
    if "top1_agreement" in result:
        print(f"teacher {result['teacher']}: perplexity {result['teacher_perplexity']:.3f}; "
              f"top-1 agreement {100 * result['top1_agreement']:.1f}%")
    for b in result.get("behaviour", []):
        print(f"[{'ok' if b['ok'] else '--'}] {b['prompt']} -> {b['answer']!r}")
    for task, metrics in result.get("tasks", {}).items():
        print(f"{task}: {metrics}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mla-zoo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Llama/Mistral/Qwen2 checkpoint to MLA (MHA2MLA)")
    c.add_argument("source", nargs="?", default="smollm2-135m",
                   help="local checkpoint dir, .gguf file, Hub id, or the bundled 'smollm2-135m' (default)")
    c.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    c.add_argument("--kv-rank", type=int, help="TOTAL latent width (kv_lora_rank) = d_kv x n_kv_heads")
    c.add_argument("--kv-rank-per-head", type=int, help="the paper's d_kv (default head_dim/2)")
    c.add_argument("--rope-pairs", type=int, help="RoPE frequency pairs kept per head, R (default head_dim/16)")
    c.add_argument("--rope-strategy", default="2-norm", choices=["high", "low", "uniform", "2-norm"])
    c.add_argument("--svd", default="whitened", choices=["joint", "split", "whitened"],
                   help="low-rank method: whitened = activation-aware joint SVD (default), joint, split")
    c.add_argument("--calib-text", help="calibration text (2-norm, whitened); default: the model's own samples")
    c.add_argument("--calib-tokens", type=int, help="calibration tokens (default 4096 of a text, 1024 self-sampled)")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    c.add_argument("--eval-text", help="also measure one-shot perplexity before/after on this text")
    c.add_argument("--eval-tokens", type=int, default=None, help="score at most this many tokens of --eval-text")
    c.add_argument("--eval-seq-len", type=int, default=1024)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="perplexity and KV-cache size of an MLA checkpoint or an original model")
    e.add_argument("model", help="MLA checkpoint dir, or any SOURCE accepted by convert (e.g. smollm2-135m)")
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--seq-len", type=int, default=1024)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--teacher", help="the original model: adds its perplexity and the top-1 agreement with it")
    e.add_argument("--prompts", action="store_true", help="answer a fixed set of behaviour prompts (greedy)")
    e.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (needs lm-eval and a network)")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    for register in _plugin_registrars():
        register(sub)
    return p


def _plugin_registrars():
    """Subcommands that live in their own modules (zoo publishing, fine-tuning, ...), if present."""
    import importlib

    found = []
    for name in ("mla_zoo.zoo.zoo_cli", "mla_zoo.zoo.train_cli"):
        try:
            found.append(importlib.import_module(name).register)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    from mla_zoo.modeling.common import MlaZooError, name_fields

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MlaZooError as e:
        flag = lambda name: "--kv-rank" if name == "kv_lora_rank" else "--" + name.replace("_", "-")  # noqa: E731
        print(f"mla-zoo {args.command}: error: {name_fields(str(e), flag)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
