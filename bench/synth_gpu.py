"""Where synth-data's sampling time goes: the teacher's decode step in `generate()`, variant by variant,
side by side in one run, with a CUDA-kernel profile of each (the bundled SmolLM2-135M-Instruct, bf16).

    python bench/synth_gpu.py --out $OUT/synth_gpu.json   # GPU only; ~5 minutes (each compiled variant compiles)

Each variant samples `--new` tokens at temperature 1 (no EOS stop: synth-data's filled rows) after a
`--prompt-len`-token prompt, into a static cache of `--cache-len` slots (synth-data's rows: 1024), at batch
`--batch`. The defaults put the timed steps around the middle of the cache (slots 448..576 of 1024), where a
synth-data row spends its average step: SDPA and `packed_gqa` read every slot at every step, the flex decode
attention only the filled ones. The first call warms up (compiles), the second is timed; ms/step = (its time -
the prompt's prefill, timed alone) / new tokens. Variants: the attention (transformers' SDPA, which repeats K/V
for the GQA groups; `packed_gqa`; `flex_decode`, filled slots only) x compiled or not (transformers compiles
the decode step of a static cache itself: `disable_compile` turns it off). Also timed alone: the sampling of
one token from [batch, vocab] logits, and the bytes bounds of a step (weights + the whole static cache, or
+ the filled slots only, read at the copy bandwidth measured here).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from mla_zoo.modeling import sources
from mla_zoo.zoo.train.flex_decode import use_flex_decode
from mla_zoo.zoo.train.packed_gqa import use_packed_gqa
from transformers import StaticCache


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e9


def sample(model, batch: int, prompt: int, new: int, cache_len: int, compiled: bool) -> None:
    ids = torch.randint(100, 10000, (batch, prompt), device="cuda")  # [B, P]
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
                   do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
                   disable_compile=not compiled)


def profile(model, batch: int, prompt: int, new: int, cache_len: int, compiled: bool, top: int = 12) -> list[dict]:
    """The CUDA kernels of one call, by total time: [{name, ms, calls}]."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        sample(model, batch, prompt, new, cache_len, compiled)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    return [{"name": e.key[:90], "ms": round(e.device_time_total / 1e3, 2), "calls": e.count} for e in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--cache-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=448)
    p.add_argument("--variants", nargs="+", default=["sdpa", "packed", "flex", "packed-eager"],
                   choices=["sdpa", "packed", "flex", "packed-eager", "flex-eager"],
                   help="in this order (the attention switch stays on: sdpa must come first)")
    args = p.parse_args()
    if args.prompt_len + args.new > args.cache_len:
        p.error(f"--prompt-len + --new ({args.prompt_len + args.new}) is beyond --cache-len {args.cache_len}")
    results: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "batch": args.batch,
                     "prompt_len": args.prompt_len, "new_tokens": args.new, "cache_len": args.cache_len,
                     "copy_gb_s": round(copy_bandwidth(), 1)}
    import transformers

    results["transformers"] = transformers.__version__
    print(json.dumps(results), flush=True)
    model, _, _ = sources.resolve("smollm2-135m", dtype=torch.bfloat16)
    model.to("cuda").eval()
    c = model.config
    kv_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    step_bytes = weights + args.batch * args.cache_len * kv_bytes  # the whole static cache is read each step
    filled = args.prompt_len + args.new / 2  # the timed steps' average filled slots
    results["bytes_bound_ms"] = round(step_bytes / (results["copy_gb_s"] * 1e9) * 1e3, 2)
    results["bytes_bound_filled_ms"] = round((weights + args.batch * filled * kv_bytes)
                                             / (results["copy_gb_s"] * 1e9) * 1e3, 2)

    logits = torch.randn(args.batch, c.vocab_size, device="cuda")  # [B, vocab] fp32, as generate keeps them
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        torch.multinomial(torch.softmax(logits, dim=-1), 1)  # [B, 1]
    torch.cuda.synchronize()
    results["sampling_ms"] = round((time.perf_counter() - t) / 20 * 1e3, 3)

    variants = []
    for variant in args.variants:
        attention, compiled = variant.removesuffix("-eager"), not variant.endswith("-eager")
        switched = {"sdpa": lambda m: m.config._attn_implementation == "sdpa", "packed": use_packed_gqa,
                    "flex": use_flex_decode}[attention](model)
        if not switched:
            raise SystemExit(f"the model cannot switch to {attention} from {model.config._attn_implementation}")
        with torch.no_grad():
            run = (model, args.batch, args.prompt_len)
            sample(*run, args.new, args.cache_len, compiled)  # warm-up (compiles)
            sample(*run, 1, args.cache_len, compiled)
            torch.cuda.synchronize()
            t = time.perf_counter()
            sample(*run, 1, args.cache_len, compiled)  # the prefill and the first token, alone
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            sample(*run, args.new + 1, args.cache_len, compiled)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t - prefill
            kernels = profile(*run, min(args.new, 32), args.cache_len, compiled)
        row = {"attention": model.config._attn_implementation, "compiled": compiled,
               "prefill_ms": round(prefill * 1e3, 1), "ms_per_step": round(seconds / args.new * 1e3, 2),
               "tokens_per_second": round(args.batch * args.new / seconds), "top_kernels": kernels}
        variants.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        for k in kernels[:6]:
            print("   ", json.dumps(k), flush=True)
    results["variants"] = variants
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
