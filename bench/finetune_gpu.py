"""GPU check of `synth-data` and `finetune` on a SmolLM2-135M-shaped model (random weights, the real
tokenizer): sampling throughput (static vs dynamic cache, bf16), distillation throughput per stage
(bf16, seq 2048), peak memory, gradient checkpointing, and the out-of-memory message.

    python bench/finetune_gpu.py --tokenizer DIR [--work /tmp/ftbench] [--steps 20]

DIR holds SmolLM2's tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja);
weights are random because the real ones do not travel to the GPU machine (speed does not depend
on them). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def make_models(work: Path, tokenizer_dir: str) -> tuple[Path, Path]:
    from mla_zoo.modeling.convert import convert_model, save_checkpoint
    from mla_zoo.modeling.convert_schema import ConvertSettings
    from mla_zoo.modeling.sources import SourceInfo

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).eval()
    tdir = work / "teacher"
    teacher.save_pretrained(tdir)
    tok.save_pretrained(tdir)
    mla, report = convert_model(teacher, tok, SourceInfo("random", str(tdir), "random", "llama", "0"),
                                ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="high", svd="joint",
                                                dtype="bfloat16"), progress=False)
    mdir = save_checkpoint(mla, tok, report, work / "mla", overwrite=True)
    return tdir, mdir


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--work", default="/tmp/ftbench")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--synth-tokens", type=int, default=150_000)
    p.add_argument("--synth-batch", type=int, nargs="+", default=[64])
    p.add_argument("--data", default="data/train.txt")
    p.add_argument("--only-synth", action="store_true")
    args = p.parse_args()
    import transformers
    from mla_zoo.modeling.common import FinetuneError
    from mla_zoo.zoo.train.finetune import run_finetune
    from mla_zoo.zoo.train.settings import FinetuneSettings, SynthSettings
    from mla_zoo.zoo.train.synth import synth_data

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    say(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__)
    tdir, mdir = make_models(work, args.tokenizer)

    for cache, batch in [("static", b) for b in args.synth_batch] + [("dynamic", args.synth_batch[0])]:
        t0 = time.time()
        try:
            r = synth_data(str(tdir), work / f"synth-{cache}-{batch}",
                           SynthSettings(tokens=args.synth_tokens, seq_len=512, batch_size=batch, max_new_tokens=256,
                                         fill_rows=False, cache=cache), progress=False)
            say(check=f"synth-data {cache} batch {batch}", generated_tokens_per_second=r.generated_tokens_per_second,
                steady=r.steady_generated_tokens_per_second, tokens=r.tokens, seconds=r.seconds,
                cache_used=r.settings.cache, dtype=r.settings.dtype)
        except Exception as e:  # noqa: BLE001 - report and go on
            say(check=f"synth-data {cache} batch {batch}", error=f"{type(e).__name__}: {e}",
                seconds=round(time.time() - t0, 1))

    if args.only_synth:
        return
    runs = [
        ("global bs8 seq2048", dict(stages=("global",), batch_size=8, seq_len=2048)),
        ("global bs8 seq2048 grad-ckpt", dict(stages=("global",), batch_size=8, seq_len=2048,
                                              gradient_checkpointing=True)),
        ("layerwise bs8 seq2048", dict(stages=("layerwise",), batch_size=8, seq_len=2048)),
    ]
    for name, kw in runs:
        torch.cuda.reset_peak_memory_stats()
        out = work / ("run-" + name.replace(" ", "-"))
        s = FinetuneSettings(data=args.data, max_steps=args.steps, save_steps=10_000, logging_steps=5,
                             eval_text="data/heldout.txt", eval_every=args.steps, eval_tokens=8192, **kw)
        t0 = time.time()
        try:
            r = run_finetune(mdir, out, str(tdir), s, progress=False)
            stage = kw["stages"][0]
            say(check=name, tokens_per_second=r.throughput_tokens_per_second[stage],
                steady_tokens_per_second=r.steady_tokens_per_second[stage],
                final_loss=r.final_losses[stage], perplexity=[c.perplexity for c in r.perplexity_curve],
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), seconds=round(time.time() - t0, 1),
                files=sorted(f.name for f in out.iterdir()))
        except Exception as e:  # noqa: BLE001
            say(check=name, error=f"{type(e).__name__}: {e}"[:500])

    # the pretty out-of-memory error
    try:
        run_finetune(mdir, work / "oom", str(tdir), FinetuneSettings(data=args.data, max_steps=2, batch_size=128,
                                                                    seq_len=2048, save_steps=10_000), progress=False)
        say(check="oom message", error="no OOM at batch 128")
    except FinetuneError as e:
        say(check="oom message", message=str(e)[:300])
    except Exception as e:  # noqa: BLE001
        say(check="oom message", unexpected=f"{type(e).__name__}: {e}"[:300])


if __name__ == "__main__":
    main()
