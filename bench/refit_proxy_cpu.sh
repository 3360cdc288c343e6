#!/usr/bin/env bash
# Does the output refit's better start survive training? A 2-core proxy: the output-aware d_kv=32 conversion with
# --refit none and output, both calibrated on bench/svd_layerwise_cpu.sh's 16k-token own-sample set, each trained by
# the layer-wise stage (30 steps of 4 x 512 tokens of that set, lr 1e-3) and then the global stage (40 steps, lr 3e-4),
# with the suite's five domains on 2,048 tokens each after each stage; then the refit start's layer-wise stage again
# with --layerwise-inputs student. ~55 min on 2 cores.
#
#   bash bench/refit_proxy_cpu.sh   # bench/results/recovery/refit_{layerwise,proxy}_cpu_{none,output}.json,
#                                   # refit_layerwise_student_inputs_cpu_output.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/recovery
TMP=${TMP:-/tmp/mla-zoo-layerwise}
DATA=$TMP/data  # svd_layerwise_cpu.sh's sample (made here if missing)
mkdir -p "$TMP"
[ -f "$DATA/synth.json" ] || mla-zoo synth-data smollm2-135m -o "$DATA" --tokens 16384 --seq-len 512 \
  --mix chat=0.4+bos=0.2+text=0.4 --seed 1 --overwrite > /dev/null
suite() { mla-zoo eval "$1" --teacher smollm2-135m --suite --max-tokens 2048 --chat-new-tokens 0 \
  --behaviour-new-tokens 0 --json > "$2"; }
for refit in none output; do
  mla-zoo convert smollm2-135m -o "$TMP/refit-$refit" --kv-rank-per-head 32 --rope-pairs 4 --rope-strategy 2-norm \
    --svd output-aware --refit "$refit" --calib-text "$DATA" --calib-tokens 16384 --dtype float32 --overwrite \
    --json > "$TMP/convert-refit-$refit.json"
  mla-zoo finetune "$TMP/refit-$refit" -o "$TMP/refit-$refit-lw" --teacher smollm2-135m --data "$DATA" --seq-len 512 \
    --batch-size 4 --stages layerwise --layerwise-steps 30 --layerwise-lr 1e-3 --save-steps 1000 --no-progress \
    --overwrite > "$TMP/refit-$refit-lw.log" 2>&1
  suite "$TMP/refit-$refit-lw" "$OUT/refit_layerwise_cpu_$refit.json"
  mla-zoo finetune "$TMP/refit-$refit-lw" -o "$TMP/refit-$refit-global" --teacher smollm2-135m --data "$DATA" \
    --seq-len 512 --batch-size 4 --stages global --max-steps 40 --lr 3e-4 --save-steps 1000 --no-progress \
    --overwrite > "$TMP/refit-$refit-global.log" 2>&1
  suite "$TMP/refit-$refit-global" "$OUT/refit_proxy_cpu_$refit.json"
done
mla-zoo finetune "$TMP/refit-output" -o "$TMP/refit-output-lw-student" --teacher smollm2-135m --data "$DATA" \
  --seq-len 512 --batch-size 4 --stages layerwise --layerwise-steps 30 --layerwise-lr 1e-3 --layerwise-inputs student \
  --save-steps 1000 --no-progress --overwrite > "$TMP/refit-output-lw-student.log" 2>&1
suite "$TMP/refit-output-lw-student" "$OUT/refit_layerwise_student_inputs_cpu_output.json"
