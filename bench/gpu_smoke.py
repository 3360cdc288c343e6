"""GPU smoke check of the MLA model: both attention paths agree in bf16 on CUDA, generate() works
with the compressed cache, and a rough training-step throughput of a SmolLM2-shaped MLA model.

    python bench/gpu_smoke.py            (on the GPU machine; prints one JSON line per check)
"""

from __future__ import annotations

import json
import time

import torch
from mla_zoo.modeling.convert import convert_model
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.modeling.sources import SourceInfo
from transformers import LlamaConfig, LlamaForCausalLM


def smollm2_shaped(layers: int = 30) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    dev = torch.device("cuda")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    src = smollm2_shaped()
    mla, _ = convert_model(src, None, SourceInfo("random", "-", "random", "llama", "0"),
                           ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="high", svd="joint"),
                           progress=False)
    mla = mla.to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, 49152, (4, 300), device=dev)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    with torch.no_grad():
        outs = {}
        for mode in ("explicit", "absorbed"):
            mla.config.mla_attention = mode
            outs[mode] = mla(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        mla.config.mla_attention = "auto"
        rel = ((outs["explicit"] - outs["absorbed"]).norm() / outs["explicit"].norm()).item()
        print(json.dumps({"check": "explicit vs absorbed bf16", "relative_error": rel}))
        g1 = mla.generate(input_ids=ids[:, :20], attention_mask=mask[:, :20], max_new_tokens=16, do_sample=False)
        g0 = mla.generate(input_ids=ids[:, :20], attention_mask=mask[:, :20], max_new_tokens=16, do_sample=False,
                          use_cache=False)
        print(json.dumps({"check": "cached == uncached greedy (bf16)", "equal_rows": int((g1 == g0).all(1).sum())}))

    # rough training throughput: student only, bf16 autocast-free (weights in bf16), seq 2048
    mla.train()
    opt = torch.optim.AdamW(mla.parameters(), lr=1e-5, fused=True)
    for bs in (8, 16):
        x = torch.randint(0, 49152, (bs, 2048), device=dev)
        for step in range(6):
            if step == 2:
                torch.cuda.synchronize()
                t0 = time.time()
            loss = mla(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        tps = 4 * x.numel() / (time.time() - t0)
        print(json.dumps({"check": "student train step", "batch": bs, "seq": 2048, "tokens_per_s": round(tps),
                          "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}))


if __name__ == "__main__":
    main()
