"""How many calibration tokens the output refit needs: SmolLM2-135M, d_kv=32, whitened SVD, fiction calibration
(data/calib.txt) of 512 or 4,096 tokens, with and without the refit; perplexity on data/heldout.txt and the code
domain (1,024 tokens each, 512-token windows), and how many distinct tokens the greedy answer to the France question
has in 32. The 512-token refit was worse: `refit.MIN_TOKENS_PER_INPUT` now skips it (so that row now repeats the
"none" row, with a warning in the report).

    python bench/refit_tokens_cpu.py    # ~3 min on 2 cores; prints one line per conversion
"""

from __future__ import annotations

from pathlib import Path

from mla_zoo.modeling import convert, sources
from mla_zoo.modeling.common import read_text
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.evaluate.metrics import perplexity

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> None:
    model, tokenizer, info = sources.resolve("smollm2-135m")
    texts = [read_text(REPO / "data/heldout.txt"), read_text(REPO / "data/eval/code.txt")]
    for tokens in (512, 4096):
        for refit in ("none", "output"):
            settings = ConvertSettings(kv_rank_per_head=32, rope_pairs=4, rope_strategy="2-norm", svd="whitened",
                                       refit=refit, calib_text=str(REPO / "data/calib.txt"), calib_tokens=tokens,
                                       dtype="float32")
            mla, _ = convert.convert_model(model, tokenizer, info, settings, progress=False)
            ppl = [perplexity(mla, tokenizer, text, 512, 1024, progress=False).perplexity for text in texts]
            ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            answer = mla.generate(**ids, max_new_tokens=32, do_sample=False)[0, ids["input_ids"].shape[1]:]
            print(tokens, refit, "prose / code perplexity", [round(p, 1) for p in ppl],
                  "distinct answer tokens", len(set(answer.tolist())), flush=True)


if __name__ == "__main__":
    main()
