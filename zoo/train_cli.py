"""`mla-zoo synth-data` and `mla-zoo finetune` (registered into the main CLI by `register`)."""

from __future__ import annotations

import argparse
import json
import os


def cmd_synth_data(args) -> int:
    from .synth_data import synth_data

    report = synth_data(args.source, args.output, args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                        temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens,
                        cache=args.cache, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {report['tokens']:,} tokens ({report['samples']} samples from {report['prompt_count']} prompts, "
          f"{report['rows']} rows of {args.seq_len}) to {args.output} in {report['seconds']:.1f} s; "
          f"generation {report['generated_tokens_per_second']:,.0f} tokens/s on {report['device']} "
          f"({report['settings']['cache']} cache, {report['settings']['dtype']})")
    return 0


def cmd_finetune(args) -> int:
    from .finetune import FinetuneSettings, run_finetune

    settings = FinetuneSettings(
        data=args.data, seq_len=args.seq_len, tokens=args.tokens, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, temperature=args.temperature, ce_weight=args.ce_weight,
        stages=tuple(x.strip() for x in args.stages.split(",") if x.strip()), layerwise_steps=args.layerwise_steps,
        layerwise_lr=args.layerwise_lr, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
        eval_text=args.eval_text,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, eval_seq_len=args.eval_seq_len, seed=args.seed,
        chunk_size=args.kl_chunk, logging_steps=args.logging_steps, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    report = run_finetune(args.checkpoint, args.output, args.teacher, settings)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one summary
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "stages"}, indent=2))
    else:
        losses = ", ".join(f"{k} {v:.4g}" for k, v in report["final_losses"].items() if v is not None)
        tput = ", ".join(f"{k} {v:,.0f}" for k, v in report["throughput_tokens_per_second"].items())
        print(f"trained {report['tokens_seen']:,} tokens ({report['stage_steps']}); final loss: {losses}; "
              f"tokens/s: {tput} on {report['device']} x {report['world_size']}")
        if report["perplexity_curve"]:
            first, last = report["perplexity_curve"][0], report["perplexity_curve"][-1]
            print(f"perplexity {first['perplexity']:.3f} -> {last['perplexity']:.3f} on {args.eval_text}")
        print(f"wrote {args.output}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("synth-data", help="sample distillation data from the original model (data-free)")
    s.add_argument("source", help="the original model: any SOURCE accepted by convert (e.g. smollm2-135m)")
    s.add_argument("-o", "--output", required=True, help="output directory (shards + synth.json)")
    s.add_argument("--tokens", type=int, required=True, help="tokens to write (prompts + answers)")
    s.add_argument("--seq-len", type=int, default=512, help="row length of the packed shards")
    s.add_argument("--batch-size", type=int, default=64, help="prompts sampled at once")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--max-new-tokens", type=int, default=None, help="answer length cap (default: --seq-len)")
    s.add_argument("--cache", default="auto", choices=["auto", "static", "dynamic"],
                   help="generate()'s KV cache: static (fixed shapes, fast on CUDA), dynamic; auto = static on CUDA")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="sampling dtype (auto: bf16 on CUDA, fp32 on CPU)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_synth_data)

    f = sub.add_parser("finetune", help="recover a converted checkpoint by distillation from the original model")
    f.add_argument("checkpoint", help="an mla-zoo checkpoint (from `mla-zoo convert`)")
    f.add_argument("-o", "--output", required=True, help="run directory; the fine-tuned checkpoint is written here")
    f.add_argument("--teacher", required=True, help="the original model (any SOURCE, e.g. smollm2-135m)")
    f.add_argument("--data", required=True,
                   help="file/dir/glob of .txt/.jsonl/.parquet, a synth-data dir, or hf:NAME[:CONFIG][:SPLIT]")
    f.add_argument("--seq-len", type=int, default=1024)
    g = f.add_mutually_exclusive_group()
    g.add_argument("--tokens", type=int, help="length of the global stage in tokens")
    g.add_argument("--max-steps", type=int, help="length of the global stage in optimizer steps")
    f.add_argument("--batch-size", type=int, default=8, help="sequences per device per micro-step")
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--warmup-ratio", type=float, default=0.05)
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (KL scaled by T^2)")
    f.add_argument("--ce-weight", type=float, default=0.0, help="weight of next-token CE added to the KL")
    f.add_argument("--stages", default="layerwise,global",
                   help="comma-separated: layerwise,global (default; layer-wise runs first) or global alone")
    f.add_argument("--layerwise-steps", type=int, help="default: 10%% of the global stage (all steps when alone)")
    f.add_argument("--layerwise-lr", type=float, help="default: --lr")
    f.add_argument("--save-steps", type=int, default=500)
    f.add_argument("--save-total-limit", type=int, default=2, help="Trainer checkpoints kept per stage")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT")
    f.add_argument("--overwrite", action="store_true", help="delete an existing OUTPUT and start over")
    f.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast and a bf16 teacher (default: on CUDA)")
    f.add_argument("--gradient-checkpointing", action="store_true")
    f.add_argument("--compile", action="store_true",
                   help="torch.compile student and teacher: faster past ~1000 steps (bench/RESULTS.md)")
    f.add_argument("--eval-text", help="measure perplexity on this text during training")
    f.add_argument("--eval-every", type=int, default=100, help="steps between perplexity measurements")
    f.add_argument("--eval-tokens", type=int, default=16384, help="tokens of --eval-text scored each time")
    f.add_argument("--eval-seq-len", type=int, default=None, help="default: min(--seq-len, 1024)")
    f.add_argument("--kl-chunk", type=int, default=1024, help="positions per chunk of the vocabulary-sized KL")
    f.add_argument("--logging-steps", type=int, default=10)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    f.set_defaults(func=cmd_finetune)
