#!/usr/bin/env bash
# Does the output-aware SVD's better start survive the layer-wise stage? A 2-core proxy: the whitened and the
# output-aware d_kv=32 conversions (calibrated on recovery_cpu.sh's 16k-token own-sample calibration set), each
# trained by the layer-wise stage alone (30 steps of 4 x 512 tokens of a separate own-sample set, lr 1e-3), then the
# suite's five domains on 2,048 tokens each. ~13 min on 2 cores.
#
#   MIX=chat=0.4+bos=0.2+text=0.4 CALIB=synth CALIB_TOKENS=16384 DKVS=32 CHAT=0 MAX_TOKENS=4096 bash bench/recovery_cpu.sh
#   bash bench/svd_layerwise_cpu.sh      # bench/results/recovery/layerwise_proxy_cpu_{whitened,output_aware}.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/recovery
TMP=${TMP:-/tmp/mla-zoo-layerwise}
CALIB=${CALIB_DIR:-/tmp/mla-zoo-oneshot/calib-synth_chat_0_4_bos_0_2_text_0_4}  # recovery_cpu.sh's, as above
mkdir -p "$TMP"
[ -f "$TMP/data/synth.json" ] || mla-zoo synth-data smollm2-135m -o "$TMP/data" --tokens 16384 --seq-len 512 \
  --mix chat=0.4+bos=0.2+text=0.4 --seed 1 --overwrite > /dev/null
for svd in whitened output-aware; do
  mla-zoo convert smollm2-135m -o "$TMP/mla-$svd" --kv-rank-per-head 32 --rope-pairs 4 --rope-strategy 2-norm \
    --svd "$svd" --calib-text "$CALIB" --calib-tokens 16384 --dtype float32 --overwrite --json > "$TMP/convert-$svd.json"
  mla-zoo finetune "$TMP/mla-$svd" -o "$TMP/ft-$svd" --teacher smollm2-135m --data "$TMP/data" --seq-len 512 \
    --batch-size 4 --stages layerwise --layerwise-steps 30 --layerwise-lr 1e-3 --save-steps 1000 --no-progress \
    --overwrite > "$TMP/ft-$svd.log" 2>&1
  mla-zoo eval "$TMP/ft-$svd" --teacher smollm2-135m --suite --max-tokens 2048 --chat-new-tokens 0 \
    --behaviour-new-tokens 0 --json > "$OUT/layerwise_proxy_cpu_${svd//-/_}.json"
done
