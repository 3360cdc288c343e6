#!/usr/bin/env bash
# One-shot quality of SmolLM2-135M-Instruct -> MLA on the evaluation suite (CPU, no fine-tuning):
# convert at d_kv = 32 (-68.75% KV) and 8 (-87.5%), then `mla-zoo eval --suite` against the original.
#
#   bash bench/recovery_cpu.sh                 # uniform ranks, the whole suite: oneshot_suite_dkv{32,8}.json
#   ALLOC=energy CHAT=0 bash bench/recovery_cpu.sh   # per-layer ranks (energy), the domains only:
#                                              # oneshot_suite_dkv{32,8}_energy.json
#   CALIB=synth CALIB_TOKENS=16384 DKVS=32 CHAT=0 MAX_TOKENS=4096 bash bench/recovery_cpu.sh
#                                              # calibrated on 16k tokens of the teacher's own samples
#                                              # (`mla-zoo synth-data`, ~5 min on 2 cores): *_synthcalib.json
#   MIX=chat=0.4+bos=0.2+text=0.4 CALIB=synth ...  # another synth-data mix: *_synthcalib_<mix>.json
#   (CALIB=fiction, the default, calibrates on data/calib.txt)
#   SVD=output-aware ...                       # another --svd (default whitened): *_output_aware.json
#   REFIT=output ...                           # the output refit after the SVD (default none): *_refit.json
#
# Writes bench/results/recovery/. MAX_TOKENS (8192) per domain; on 2 cores 7-30 minutes per setting (by load) for the
# domains only (CHAT=0), 75 minutes with the chat and behaviour generations (d_kv=32, a loaded machine).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/recovery
TMP=${TMP:-/tmp/mla-zoo-oneshot}
ALLOC=${ALLOC:-uniform}
CALIB_TOKENS=${CALIB_TOKENS:-4096}
SUFFIX=$([ "$ALLOC" = uniform ] || echo "_$ALLOC")
[ "$CALIB_TOKENS" = 4096 ] || SUFFIX="${SUFFIX}_calib$CALIB_TOKENS"
SVD=${SVD:-whitened}
[ "$SVD" = whitened ] || SUFFIX="${SUFFIX}_${SVD//-/_}"
REFIT=${REFIT:-none}
[ "$REFIT" = none ] || SUFFIX="${SUFFIX}_refit"
mkdir -p "$OUT" "$TMP"
calib=data/calib.txt
if [ "${CALIB:-fiction}" = synth ]; then
  mix_tag=$([ -z "${MIX:-}" ] || echo "_${MIX//[=+.]/_}")
  calib=$TMP/calib-synth$mix_tag
  SUFFIX="${SUFFIX}_synthcalib$mix_tag"
  [ -f "$calib/synth.json" ] || mla-zoo synth-data smollm2-135m -o "$calib" --tokens "$CALIB_TOKENS" --seq-len 1024 \
    --mix "${MIX:-chat=0.7+bos=0.3}" --overwrite > /dev/null
fi
for d in ${DKVS:-32 8}; do
  mla-zoo convert smollm2-135m -o "$TMP/dkv$d$SUFFIX" --kv-rank-per-head "$d" --rope-pairs 4 --rope-strategy 2-norm \
    --svd "$SVD" --refit "$REFIT" --calib-text "$calib" --calib-tokens "$CALIB_TOKENS" --dtype float32 --rank-allocation "$ALLOC" \
    --overwrite --json > "$TMP/convert$d$SUFFIX.json"
  mla-zoo eval "$TMP/dkv$d$SUFFIX" --teacher smollm2-135m --suite --max-tokens "${MAX_TOKENS:-8192}" \
    --chat-new-tokens "${CHAT:-96}" --behaviour-new-tokens "${BEHAVIOUR:-${CHAT:-48}}" --json \
    > "$OUT/oneshot_suite_dkv$d$SUFFIX.json"
done
