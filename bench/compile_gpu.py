"""Global-stage distillation throughput with and without torch.compile, side by side in one run, on a
SmolLM2-135M-shaped teacher (random weights, the real tokenizer) and its MLA conversion (d_kv=32).

    python bench/compile_gpu.py --tokenizer DIR [--steps 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finetune_gpu import make_models
from mla_zoo.zoo.train.finetune import run_finetune
from mla_zoo.zoo.train.settings import FinetuneSettings


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--work", default="/tmp/compilebench")
    args = p.parse_args()
    work = Path(args.work)
    teacher, student = make_models(work, args.tokenizer)
    for compile_ in (False, True):
        s = FinetuneSettings(data="data/train.txt", seq_len=1024, batch_size=32, max_steps=args.steps,
                             stages=("global",), save_steps=10_000, compile=compile_)
        r = run_finetune(student, work / f"ft-{compile_}", str(teacher), s, overwrite=True, progress=False)
        print(json.dumps({"compile": compile_, "steady_tokens_per_second": r.steady_tokens_per_second,
                          "wall_seconds": r.wall_seconds}), flush=True)


if __name__ == "__main__":
    main()
