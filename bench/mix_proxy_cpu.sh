#!/usr/bin/env bash
# Which synth-data mix reaches the far domains, on 2 CPU cores (a small proxy of `recovery_gpu.sh mixes`):
# for each mix, the teacher samples TOKENS tokens, the d_kv=32 conversion (calibrated on the default mix's
# 16k-token sample) is distilled for STEPS steps of 4 x 512 tokens (layer-wise first), and the suite's five
# domains are scored (MAX_TOKENS per domain). Equal tokens, steps and conversion for every mix: only the
# data differs. About 25 minutes a mix.
#
#   bash bench/mix_proxy_cpu.sh                        # bench/results/recovery/proxy_cpu_<mix>.json
#   MIXES="chat=1 text=1" TOKENS=65536 bash bench/mix_proxy_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/recovery
TMP=${TMP:-/tmp/mla-zoo-proxy}
TOKENS=${TOKENS:-49152}
STEPS=${STEPS:-60}
mkdir -p "$OUT" "$TMP"
[ -f "$TMP/calib/synth.json" ] || mla-zoo synth-data smollm2-135m -o "$TMP/calib" --tokens 16384 --seq-len 1024 \
  --overwrite > /dev/null
[ -f "$TMP/mla32/conversion.json" ] || mla-zoo convert smollm2-135m -o "$TMP/mla32" --kv-rank-per-head 32 \
  --rope-pairs 4 --rope-strategy 2-norm --svd whitened --calib-text "$TMP/calib" --calib-tokens 16384 \
  --dtype float32 --overwrite --json > "$TMP/convert.json"
for mix in ${MIXES:-chat=0.7+bos=0.3 chat=0.4+bos=0.2+text=0.4}; do
  tag=${mix//[=+.]/_}
  [ -f "$TMP/data-$tag/synth.json" ] || mla-zoo synth-data smollm2-135m -o "$TMP/data-$tag" --tokens "$TOKENS" \
    --seq-len 512 --mix "$mix" --seed 1 --overwrite > /dev/null
  [ -f "$TMP/ft-$tag/training.json" ] || mla-zoo finetune "$TMP/mla32" -o "$TMP/ft-$tag" --teacher smollm2-135m \
    --data "$TMP/data-$tag" --seq-len 512 --batch-size 4 --stages layerwise,global --layerwise-steps 30 \
    --layerwise-lr 1e-3 --max-steps "$STEPS" --lr 3e-4 --save-steps 1000 --no-progress --overwrite > "$TMP/ft-$tag.log" 2>&1
  mla-zoo eval "$TMP/ft-$tag" --teacher smollm2-135m --suite --max-tokens "${MAX_TOKENS:-4096}" --chat-new-tokens 0 \
    --behaviour-new-tokens 0 --json > "$OUT/proxy_cpu_$tag.json"
done
