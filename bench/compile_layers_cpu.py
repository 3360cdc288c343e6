"""What `finetune --compile` costs to compile: the student's forward + backward eager, with each decoder layer
compiled in place (`finetune.compile_layers`, what `compile` does) and with the whole model under torch.compile
(what it did before), on SmolLM2-135M-MLA (d_kv=32, fp32) on the CPU: the first step (compiling) and the best of
three after it, and the logits' difference from eager.

    python bench/compile_layers_cpu.py [--batch 2 --seq 128]     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from mla_zoo.modeling import sources
from mla_zoo.modeling.convert import convert_model
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.train.finetune import compile_layers


def timed_steps(model, ids: torch.Tensor, steps: int = 3) -> tuple[float, float, torch.Tensor]:
    """(first step's seconds, best later step's seconds, the first step's logits)."""
    times, logits = [], None
    for _ in range(1 + steps):
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=False).logits  # [B, S, V]
        out.pow(2).mean().backward()
        times.append(time.perf_counter() - start)
        logits = out.detach() if logits is None else logits
    return times[0], min(times[1:]), logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args()
    model, tokenizer, info = sources.resolve("smollm2-135m", dtype=torch.float32)
    mla, _ = convert_model(model, tokenizer, info, ConvertSettings(kv_rank_per_head=32, calib_tokens=256,
                                                                   dtype="float32"), progress=False)
    ids = torch.randint(0, mla.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    rows, reference = {}, None
    for way in ("eager", "compile_layers", "whole model"):
        torch._dynamo.reset()
        m = copy.deepcopy(mla).train()
        if way == "compile_layers":
            compile_layers(m)
        elif way == "whole model":
            m = torch.compile(m)
        first, steady, logits = timed_steps(m, ids)
        reference = logits if reference is None else reference
        rows[way] = {"first_step_s": round(first, 2), "steady_step_ms": round(1e3 * steady, 1),
                     "max_abs_logit_diff": float((logits - reference).abs().max())}
        print(json.dumps({way: rows[way]}), flush=True)
    print(json.dumps({"torch": torch.__version__, "layers": mla.config.num_hidden_layers, "batch": a.batch,
                      "seq": a.seq, **rows}))


if __name__ == "__main__":
    main()
