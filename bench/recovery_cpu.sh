#!/usr/bin/env bash
# One-shot quality of SmolLM2-135M-Instruct -> MLA on every domain of the evaluation suite (CPU, no
# fine-tuning): convert at d_kv = 32 (-68.75% KV) and 8 (-87.5%), then `mla-zoo eval --suite` against the
# original. Writes bench/results/recovery/oneshot_suite_dkv{32,8}.json. About 10 minutes on 2 cores.
#
#   bash bench/recovery_cpu.sh            # MAX_TOKENS=8192 per domain by default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/recovery
TMP=${TMP:-/tmp/mla-zoo-oneshot}
mkdir -p "$OUT" "$TMP"
for d in ${DKVS:-32 8}; do
  mla-zoo convert smollm2-135m -o "$TMP/dkv$d" --kv-rank-per-head "$d" --rope-pairs 4 --rope-strategy 2-norm \
    --svd whitened --calib-text data/calib.txt --calib-tokens 4096 --dtype float32 --overwrite --json \
    > "$TMP/convert$d.json"
  mla-zoo eval "$TMP/dkv$d" --teacher smollm2-135m --suite --max-tokens "${MAX_TOKENS:-8192}" --json \
    > "$OUT/oneshot_suite_dkv$d.json"
done
