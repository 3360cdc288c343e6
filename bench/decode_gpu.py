"""Decode speed on one GPU: an original Llama-family model against its MLA conversion, side by side.

Both models run in the same framework (their transformers forward), in bf16, over a preallocated
`StaticCache` that is already filled to the context length (prefill excluded: speed does not depend
on the cached values). Each is measured
* eager: one forward per token, launched from Python;
* graph: the same forward captured once in a CUDA graph and replayed (static cache + CUDA graphs,
  what `torch.compile(mode="reduce-overhead")` does, without inductor's fusion);
* compile: `torch.compile(fullgraph=True)` (inductor) of the forward, captured in a CUDA graph
  (`--compile-at` picks the points: compiling every point costs minutes).
The original runs SDPA (flash / memory-efficient kernels), as transformers picks for it; the MLA
model runs its absorbed path with the Triton decode kernel.

For each point the script reports ms/token, tokens/s, peak memory, the bytes one decode step must
read (weights + cache) and the time that takes at the device's measured copy bandwidth (the bound),
and the speed ratio against the bytes ratio. Run on the GPU machine:

    python bench/decode_gpu.py --out $OUT/decode.json                # everything (bench/gpu_decode.sh)
    python bench/decode_gpu.py --models smollm2 --points 16384x16 --modes graph,compile
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from mla_zoo.modeling.remote import modeling_llama_mla
from mla_zoo.modeling.remote.configuration_llama_mla import LlamaMLAConfig
from mla_zoo.modeling.remote.modeling_llama_mla import LlamaMLAForCausalLM
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

# Random-weight shapes (speed does not need trained weights); SmolLM2 uses its real weights.
SHAPES = {
    "smollm2-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
# d_kv per KV head as a fraction of head_dim: hd/2 -> -68.75%, hd/4 -> -81.25%, hd/8 -> -87.5% (R = hd/16)
SETTINGS = {"smollm2": (2, 4, 8), "smollm2-shape": (2, 8), "llama-3.2-1b": (2, 8), "llama-3-8b": (2, 8)}
DEFAULT_POINTS = ["2048x1", "2048x16", "2048x64", "8192x1", "8192x16", "8192x64", "16384x16",
                  "32768x1", "32768x16", "32768x64", "32768xmax"]


@dataclass
class Point:
    model: str  # e.g. "smollm2" or "llama-3-8b"
    variant: str  # "original" or "mla-dkv32"
    mode: str  # eager | graph | compile
    context: int
    batch: int
    ms_per_token: float | None = None  # one decode step for the whole batch
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    step_bytes: int = 0  # weights + cache read by one step
    roofline_ms: float = 0.0  # step_bytes / measured copy bandwidth
    error: str | None = None


@dataclass
class Report:
    device: str
    versions: dict
    copy_gbps: float
    points: list[Point] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    prefill: list[dict] = field(default_factory=list)


def copy_bandwidth() -> float:
    """Device-to-device copy speed in GB/s, counting bytes read + written (the convention of NOTES.md)."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 20
    del x, y
    return 2 * 2 * 1024**3 / seconds / 1e9


def mla_config_for(source: LlamaConfig, d_kv: int, rope_pairs: int) -> LlamaMLAConfig:
    fields = {k: v for k, v in source.to_dict().items() if k in LlamaConfig().to_dict() and k != "architectures"}
    fields.pop("model_type", None)
    pairs = [[list(range(rope_pairs))] * source.num_key_value_heads] * source.num_hidden_layers
    return LlamaMLAConfig(**fields, kv_lora_rank=d_kv * source.num_key_value_heads, rope_pairs=pairs)


def random_model(cls, config):
    torch.manual_seed(0)
    with torch.device("cuda"):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(default)
    return model.eval()


def models_for(name: str, smollm2_dir: Path | None):
    """Yields (variant, model) pairs: the original first, then its MLA conversions."""
    if name == "smollm2":
        from mla_zoo.modeling.sources import materialize_bundled

        original = LlamaForCausalLM.from_pretrained(materialize_bundled("smollm2-135m"), dtype=torch.bfloat16)
        yield "original", original.cuda().eval()
        for frac in SETTINGS[name]:
            d_kv = 64 // frac
            path = smollm2_dir / f"dkv{d_kv}"
            yield f"mla-dkv{d_kv}", LlamaMLAForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        return
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=131072)
    config._attn_implementation = "sdpa"
    yield "original", random_model(LlamaForCausalLM, config)
    for frac in SETTINGS[name]:
        d_kv = config.head_dim // frac
        mla_config = mla_config_for(config, d_kv, config.head_dim // 16)
        mla_config._attn_implementation = "sdpa"
        yield f"mla-dkv{d_kv}", random_model(LlamaMLAForCausalLM, mla_config)


def kv_bytes_per_token(config) -> int:
    if isinstance(config, LlamaMLAConfig):
        return config.kv_cache_values_per_token() * 2
    return 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers * 2


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def filled_cache(model, batch: int, context: int, spare: int) -> StaticCache:
    """A static cache whose layers are allocated and count `context` tokens (values left at zero)."""
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=context + spare)
    if isinstance(cfg, LlamaMLAConfig):
        keys = torch.empty(batch, 1, 0, cfg.kv_lora_rank, dtype=torch.bfloat16, device="cuda")
        values = torch.empty(batch, 1, 0, cfg.num_key_value_heads * cfg.qk_rope_head_dim, dtype=torch.bfloat16,
                             device="cuda")
    else:
        keys = values = torch.empty(batch, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=torch.bfloat16,
                                    device="cuda")
    for layer in cache.layers:
        layer.lazy_initialization(keys, values)
        layer.cumulative_length.fill_(context)
    return cache


def time_decode(model, batch: int, context: int, mode: str, steps: int = 20, masked: bool = True
                ) -> tuple[float, float]:
    """ms per decode step and peak GiB, over `steps` steps after warm-up.

    masked=False: the step attends to every slot of the static cache, with no mask. It reads the same
    bytes as a masked step; for the original it lets SDPA run its GQA kernel (transformers repeats
    K and V for each query head of a group when it is given a mask).
    """
    warm = 3
    spare = steps + warm + 8
    cache = filled_cache(model, batch, context, spare)
    max_len = context + spare
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    positions = torch.full((batch, 1), context, device="cuda")
    mask = torch.ones(batch, 1, 1, max_len, dtype=torch.bool, device="cuda")  # the new slots stay visible

    def step():
        return model(input_ids=ids, attention_mask=mask if masked else None, position_ids=positions,
                     past_key_values=cache,
                     use_cache=True, logits_to_keep=1).logits

    fn = step
    if mode == "compile":
        fn = torch.compile(step, fullgraph=True)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        if mode in ("graph", "compile"):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warm):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        else:
            for _ in range(warm):
                fn()
            run = fn
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        end.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    peak = torch.cuda.max_memory_allocated() / 1024**3
    return ms, peak


def largest_batch(model, context: int) -> int:
    """The largest batch whose cache fits next to the model at `context` tokens (one step must run)."""
    free = torch.cuda.mem_get_info()[0]
    per_seq = kv_bytes_per_token(model.config) * (context + 64)
    guess = int(free * 0.92 // per_seq)
    while guess > 0:
        try:
            time_decode(model, guess, context, "eager", steps=1)
            return guess
        except (torch.OutOfMemoryError, RuntimeError) as e:  # RuntimeError: e.g. 32-bit index limits
            print(f"batch {guess} at {context}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            torch.cuda.empty_cache()
            guess = int(guess * 0.9)
    return 0


def parse_point(text: str) -> tuple[int, str]:
    context, batch = text.split("x", 1)
    return int(context), batch


def measure(report: Report, name: str, smollm2_dir, points, modes, compile_at, masked=True) -> None:
    max_batches = {}
    for variant, model in models_for(name, smollm2_dir):
        wbytes = weight_bytes(model)
        kv = kv_bytes_per_token(model.config)
        for context, batch_text in points:
            if batch_text == "max":
                batch = max_batches[variant] = largest_batch(model, context)
                print(f"{name} {variant}: largest batch at {context} = {batch}", flush=True)
                if batch == 0:
                    continue
            else:
                batch = int(batch_text)
            for mode in modes + (["compile"] if f"{context}x{batch_text}" in compile_at else []):
                p = Point(name, variant, mode if masked else f"{mode}-nomask", context, batch)
                p.step_bytes = wbytes + batch * context * kv
                p.roofline_ms = p.step_bytes / (report.copy_gbps * 1e9) * 1e3
                try:
                    ms, peak = time_decode(model, batch, context, mode, masked=masked)
                    p.ms_per_token, p.tokens_per_s, p.peak_gib = ms, batch / ms * 1e3, peak
                except torch.OutOfMemoryError as e:
                    p.error = f"out of memory: {str(e).splitlines()[0]}"
                    torch.cuda.empty_cache()
                report.points.append(p)
                print(json.dumps(asdict(p)), flush=True)
        del model
        torch.cuda.empty_cache()


def check_real_model(report: Report, smollm2_dir: Path) -> None:
    """On the real SmolLM2 conversion (d_kv=32): kernel vs PyTorch path, and greedy tokens."""
    from transformers import AutoTokenizer

    path = smollm2_dir / "dkv32"
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = LlamaMLAForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    prompts = ["The capital of France is", "Once upon a time, in a small village,"]
    ids = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to("cuda")
    with torch.no_grad():
        pre = model(**ids, use_cache=True)
        nxt = pre.logits[:, -1:].argmax(-1)
        mask = torch.cat((ids["attention_mask"], torch.ones_like(nxt)), 1)
        pos = mask.sum(-1, keepdim=True) - 1
        logits = {}
        for use_kernel in (True, False):
            modeling_llama_mla.USE_TRITON_DECODE = use_kernel
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                        past_key_values=copy.deepcopy(pre.past_key_values), use_cache=True)
            logits[use_kernel] = out.logits.float()
        modeling_llama_mla.USE_TRITON_DECODE = True
    rel = ((logits[True] - logits[False]).norm() / logits[False].norm()).item()
    report.checks["decode_logits_rel_err_kernel_vs_torch"] = rel

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True).to("cuda")
    modeling_llama_mla.USE_TRITON_DECODE = False
    eager = model.generate(**prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
    modeling_llama_mla.USE_TRITON_DECODE = True
    fast = model.generate(**prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64,
                          cache_implementation="static")
    n = prompt["input_ids"].shape[1]
    same = (eager[0, n:] == fast[0, n:]).tolist()
    report.checks["greedy_64_tokens_equal_static_compiled_kernel_vs_eager_torch"] = all(same)
    report.checks["greedy_first_difference"] = same.index(False) if not all(same) else None


def prefill(report: Report, smollm2_dir: Path) -> None:
    """Prefill time (eager, SDPA for both): original vs MLA's explicit path, cache written."""
    from transformers import DynamicCache

    for variant, model in models_for("smollm2", smollm2_dir):
        if variant not in ("original", "mla-dkv32"):
            continue
        for batch, context in ((1, 8192), (16, 2048)):
            ids = torch.randint(0, 1000, (batch, context), device="cuda")
            with torch.no_grad():
                for i in range(4):
                    if i == 1:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True,
                          logits_to_keep=1)
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 3 * 1e3
            report.prefill.append({"variant": variant, "batch": batch, "context": context, "ms": ms,
                                   "tokens_per_s": batch * context / ms * 1e3})
            print(json.dumps(report.prefill[-1]), flush=True)
        del model
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,llama-3.2-1b,llama-3-8b")
    ap.add_argument("--points", default=",".join(DEFAULT_POINTS), help="CONTEXTxBATCH, batch 'max' = largest")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--compile-at", default="16384x16", help="points also measured compiled")
    ap.add_argument("--smollm2-dir", type=Path, default=Path("/tmp/smollm2-mla"),
                    help="dir with dkv32/, dkv16/, dkv8/ conversions of the bundled SmolLM2")
    ap.add_argument("--no-mask", action="store_true", help="attend to every cache slot, no mask (see time_decode)")
    ap.add_argument("--checks", action="store_true", help="kernel-vs-PyTorch and greedy checks on the real model")
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("decode_gpu.json"))
    args = ap.parse_args()
    import triton

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda}
    print(versions, flush=True)
    report = Report(torch.cuda.get_device_name(), versions, copy_bandwidth())
    print(f"copy bandwidth {report.copy_gbps:.0f} GB/s (read + write)", flush=True)

    def save():
        args.out.write_text(json.dumps(asdict(report), indent=1) + "\n")

    if args.checks:
        check_real_model(report, args.smollm2_dir)
        print(report.checks, flush=True)
        save()
    if args.prefill:
        prefill(report, args.smollm2_dir)
        save()
    points = [parse_point(p) for p in args.points.split(",") if p]
    for name in args.models.split(","):
        if name:
            measure(report, name, args.smollm2_dir, points, args.modes.split(","), args.compile_at.split(","),
                    masked=not args.no_mask)
            save()
    print(summary(report), flush=True)


def summary(report: Report) -> str:
    """A markdown table: for each point, the original's best vs each MLA variant's best."""
    best: dict[tuple, Point] = {}
    for p in report.points:
        if p.ms_per_token is None:
            continue
        key = (p.model, p.variant, p.context, p.batch)
        if key not in best or p.ms_per_token < best[key].ms_per_token:
            best[key] = p
    lines = ["| model | context x batch | variant | best mode | ms/token | tokens/s | peak GiB | bytes/step "
             "| roofline ms | x roofline | speed-up | bytes bound |", "|" + "---|" * 12]
    for (model, variant, context, batch), p in sorted(best.items()):
        orig = best.get((model, "original", context, batch))
        speed = f"{orig.ms_per_token / p.ms_per_token:.2f}x" if orig else "-"
        bound = f"{orig.step_bytes / p.step_bytes:.2f}x" if orig else "-"
        lines.append(f"| {model} | {context} x {batch} | {variant} | {p.mode} | {p.ms_per_token:.3f} "
                     f"| {p.tokens_per_s:,.0f} | {p.peak_gib:.1f} | {p.step_bytes / 1e9:.2f} GB "
                     f"| {p.roofline_ms:.3f} | {p.ms_per_token / p.roofline_ms:.2f} | {speed} | {bound} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
