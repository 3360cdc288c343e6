#!/usr/bin/env bash
# Recovery that generalizes (issue 18) on one H200: data-free distillation data from the teacher,
# conversion, distillation, and the multi-domain suite (every domain, the teacher's chat answers,
# behaviour prompts). Run from the repo root on the GPU machine (device tool). Every step writes its
# numbers into $OUT and appends {"step", "seconds"} to $OUT/steps.jsonl. $OUT is emptied before each call,
# so every result is kept in $W (/tmp/recovery) and copied out: a step called again in a later call on the
# same machine skips what is done and resumes the rest (finetune --resume, synth data and suites kept).
#
#   call 1: carry [.gg0, .whl]   cmd: mkdir -p /tmp/stage && cp .gg0/* .whl/* /tmp/stage/
#   call 2: carry [.gg1]         cmd: cp .gg1/* /tmp/stage/ && bash bench/recovery_gpu.sh setup check probe quick
#   call 3.. (same machine):     cmd: bash bench/recovery_gpu.sh quick        (again until quick32.suite.txt comes back)
#   then (same machine):         cmd: bash bench/recovery_gpu.sh throughput
#   release (60 GPU-min; 10-min calls, same machine):
#                                cmd: bash bench/recovery_gpu.sh release      (repeat until release-done.json)
#   mixes (which data mix generalizes; ~8 min each on an H100: QUICK_STEPS x 32 x 1024 sampled tokens, the suite):
#                                cmd: bash bench/recovery_gpu.sh mixes      (MIXES="MIX MIX..." to choose)
#   variants (the quick recipe with other fine-tuning flags, on quick's data and conversion; ~4.5 min each on an
#   H100; the learning rates of 2026-12-07 ran as VARIANTS="--lr=1e-3 --lr=3e-3"):
#                                cmd: bash bench/recovery_gpu.sh quick variants  (default: --compile; --trainable=attention ran 2026-12-07)
#                                (the layer-wise stage on the student's own inputs, CPU proxy 2026-12-08:
#                                 VARIANTS=--layerwise-inputs=student, with SVD=output-aware REFIT=output)
#                                (or `data variants`: quick's sample and conversion without quick's own fine-tuning)
#   last:                        cmd: bash bench/recovery_gpu.sh plots
#
# .gg0/.gg1 are the two halves of the bundled GGUF (the whole file is over one call's 64 MiB); .whl holds
# the gguf wheel and liger-kernel's (pip download --no-deps gguf liger-kernel==0.8.5): the GPU image has
# no network. Without liger-kernel the fused loss runs in plain torch (kl_impl fused).
#
#   quick   (<= 10 GPU-min, d_kv=32, -68.75% KV): QUICK_DATA_TOKENS (18.9M, one pass) of teacher:$MIX data
#           sampled for the run, the conversion calibrated on 16k of them, layer-wise 150 steps + global
#           QUICK_STEPS (576) x 32 x 1024 tokens, then the suite (~9.8 H100-minutes in all).
#           Goal: every domain within +15% of the original's perplexity.
#           ALLOC=energy: per-layer ranks at the same total (names get "-energy"); SVD=output-aware: that
#           conversion (names get "-output-aware"); REFIT=output: the output refit after the SVD (names get
#           "-refit"); QUICK_ONESHOT=0 skips the one-shot suite.
#   release (<= 60 GPU-min per setting): RELEASE_TOKENS (49.2M: one pass of the global stage) teacher tokens
#           sampled once in two halves, shared by d_kv=32 and d_kv=8; layer-wise 300 + global RELEASE_STEPS (1500)
#           steps each (compiled: past COMPILE_PAYS_TOKENS). Expected on an H100 from the quick recipe's rates (not
#           run yet): sampling 2 x ~5 min (99k tokens/s steady), then per setting ~6-7 min (global stage ~184k
#           tokens/s compiled, the suite ~1 min): ~25 min in all, one session's device time, in four 10-minute
#           calls. RELEASE_ONESHOT=0 skips the one-shot suites.
#           Goals: every domain within +5% (d_kv=32) and +10% (d_kv=8); every behaviour prompt the
#           original answers right is kept.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=gpu_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_setup.sh"  # the environment, $OUT, setup's pieces
W=${W:-/tmp/recovery}  # every step's work; another W runs another quick recipe beside (e.g. more tokens and steps)
mkdir -p "$W"
MIX=${MIX:-chat=0.4+bos=0.2+text=0.4}  # the recipes' mix (mixes, 2026-12-07: the worst domain +84% -> +70%)
SUITE=(--suite --max-tokens "${SUITE_TOKENS:-16384}" --dtype float32)
LR=${LR:-1e-3}  # the global stage's peak learning rate (`variants`, 2026-12-07: 3e-4 / 1e-3 / 2e-3 / 3e-3 -> worst +70/54/65/80%)
# the quick budget's training (quick, variants, mixes): layer-wise 150 steps, then QUICK_STEPS global steps
QUICK_TRAINING=(--stages "layerwise,global" --layerwise-steps 150 --layerwise-lr 1e-3 --max-steps "${QUICK_STEPS:-576}")
ALLOC=${ALLOC:-uniform}  # the conversion's rank allocation (energy: per-layer ranks at the same total)
SVD=${SVD:-whitened}  # the conversion's --svd (output-aware: one-shot better in every domain on the CPU, 2026-12-08)
REFIT=${REFIT:-none}  # the conversion's --refit (output: one-shot 21-52% lower perplexity on the CPU, 2026-12-08)
# the conversion's tag, in the names of its conversions, runs and suites: "", "-energy", "-output-aware", ...
TAG=$([ "$ALLOC" = uniform ] || echo "-$ALLOC")$([ "$SVD" = whitened ] || echo "-$SVD")$([ "$REFIT" = none ] || echo "-refit")

setup() {  # the bundled model as an installed package, gguf, liger-kernel (if carried) and mla-zoo itself
  bundled_model --empty-init
  site_wheel gguf
  ls "$STAGE"/liger_kernel-*.whl > /dev/null 2>&1 && site_wheel liger_kernel
  editable_install
  materialize_bundled
  versions "$OUT/versions.txt" "torch.cuda.get_device_name()"
}

check() {  # the GPU paths against their references: liger vs the fused/fp64 reference, continuous batching vs generate
  python3 -m pytest -q -rs --tb=short -p no:logging tests/test_distill.py tests/test_synth.py -k "liger or continuous or fused" \
    > "$OUT/check.log" 2>&1 || true
  tail -4 "$OUT/check.log"
}

convert() {  # convert D CALIB: the recipes' conversion into $W/mlaD$TAG, $SVD SVD on 16k tokens of CALIB
  # (the run's own teacher sample: data-free, and one-shot code perplexity 2.8x lower than with data/calib.txt's
  # fiction); per-layer ranks with ALLOC=energy (default uniform)
  local d=$1 calib=$2
  [ -f "$W/mla$d$TAG/conversion.json" ] && return 0
  mla-zoo convert smollm2-135m -o "$W/mla$d$TAG" --kv-rank-per-head "$d" --rope-pairs 4 --rope-strategy 2-norm \
    --svd "$SVD" --refit "$REFIT" --calib-text "$calib" --calib-tokens 16384 --rank-allocation "$ALLOC" --dtype bfloat16 \
    --overwrite --json > "$OUT/convert$d$TAG.json" 2> /dev/null
}

suite() {  # suite NAME CKPT: the multi-domain suite against the original (kept in $W: $OUT is emptied per call)
  [ -f "$W/$1.suite.json" ] || mla-zoo eval "$2" --teacher smollm2-135m "${SUITE[@]}" --json > "$W/$1.suite.json.tmp"
  [ -f "$W/$1.suite.json" ] || mv "$W/$1.suite.json.tmp" "$W/$1.suite.json"
  cp "$W/$1.suite.json" "$OUT/$1.suite.json"
  python3 -c "from mla_zoo.zoo.evaluate import SuiteReport, format_suite; print(format_suite(SuiteReport.read('$OUT/$1.suite.json')))" \
    | tee "$OUT/$1.suite.txt"
}

synth() {  # synth NAME TOKENS [flags]: teacher samples into $W/NAME (kept; a killed one starts again)
  local name=$1 tokens=$2; shift 2
  [ -f "$W/$name/synth.json" ] || mla-zoo synth-data smollm2-135m -o "$W/$name" --tokens "$tokens" --seq-len 1024 \
    --mix "$MIX" --overwrite "$@" > "$OUT/$name.log" 2>&1
  cp "$W/$name/synth.json" "$OUT/$name.synth.json"
  python3 -c "import json; r = json.load(open('$OUT/$name.synth.json')); print('$name', r['settings']['engine'], {k: r[k] for k in ('tokens', 'seconds', 'prompt_seconds', 'generated_tokens_per_second', 'steady_generated_tokens_per_second')})"
}

finetune() {  # finetune NAME CKPT DATA [flags]: resumes a run that a previous call left unfinished
  local name=$1 ckpt=$2 data=$3; shift 3
  local again=--overwrite
  [ -f "$W/$name/run.json" ] && again=--resume
  mla-zoo finetune "$ckpt" -o "$W/$name" --teacher smollm2-135m --data "$data" --seq-len 1024 --batch-size 32 \
    --lr "$LR" --warmup-ratio 0.05 --save-steps 100 --logging-steps 10 --no-progress $again "$@" 2>&1 \
    | grep -v Warning | tail -40 > "$OUT/$name.log"  # a traceback whole
  cp "$W/$name/training.json" "$OUT/$name.training.json"
  [ -d "$W/$name/synth" ] && for s in "$W/$name"/synth/part-*/synth.json; do cp "$s" "$OUT/$name.synth.json"; done
  return 0
}

probe() {  # the engines' sampling speed (minutes at worst), before anything long: filled rows (the default:
  # fixed batches, packed GQA attention, compiled) on 4M tokens (4 calls: the first compiles), then answers that
  # stop at EOS in fixed batches and with continuous batching
  synth probe-fill 4194304 --engine generate --prompt-pool 256
  synth probe-stop-generate 1048576 --no-fill-rows --engine generate --max-new-tokens 512 --prompt-pool 256
  synth probe-stop-continuous 262144 --no-fill-rows --engine continuous --max-new-tokens 512 --prompt-pool 256
}

data() {  # quick's teacher sample and conversion alone (what `variants` trains on, without quick's own run)
  synth quick-data "${QUICK_DATA_TOKENS:-18874368}"
  convert 32 "$W/quick-data"
}

quick() {  # each part is kept in $W, so a call that runs out of time is continued by the next one
  # one pass over 18.9M fresh tokens in 576 steps, what fits the 10 minutes (bench/RESULTS.md: 13.1M in 400 steps
  # left the worst domain at +54%, 18.9M at +46%; fresh tokens beat re-reading 3.1M four times on every domain);
  # the probe and mixes steps sample their own
  data
  [ "${QUICK_ONESHOT:-1}" = 0 ] || suite "oneshot32$TAG" "$W/mla32$TAG"
  finetune "quick32$TAG" "$W/mla32$TAG" "$W/quick-data" "${QUICK_TRAINING[@]}"
  suite "quick32$TAG" "$W/quick32$TAG"
}

variants() {  # the quick recipe with other fine-tuning flags, on quick's data and conversion: each of VARIANTS
  # (space-separated; a variant's flags joined by commas, e.g. "--lr=2e-3 --layerwise-lr=3e-3,--layerwise-steps=300")
  # is added after the recipe's own flags, so it overrides them; named quick32-<flags without dashes and =>
  local v
  for v in ${VARIANTS:---compile}; do  # default: the lever built but not measured yet
    local name flags
    name="quick32$TAG-$(echo "$v" | sed 's/--//g; s/=//g; s/,/_/g')"
    [ -f "$W/$name.suite.json" ] && continue
    IFS=, read -r -a flags <<< "$v"
    finetune "$name" "$W/mla32$TAG" "$W/quick-data" "${QUICK_TRAINING[@]}" "${flags[@]}"
    suite "$name" "$W/$name"
  done
}

throughput() {  # synth-data engines and the global stage's loss / precision / compile options, side by side
  for way in "fill --engine generate" "stop --no-fill-rows --max-new-tokens 512 --engine continuous"; do
    # shellcheck disable=SC2086  # the way's words are its name and flags
    set -- $way
    local name=$1; shift
    mla-zoo synth-data smollm2-135m -o "$W/tp-$name" --tokens 2000000 --seq-len 1024 --batch-size 1024 \
      --mix "$MIX" --prompt-pool 1024 --overwrite "$@" > "$OUT/synth-$name.log" 2>&1
    cp "$W/tp-$name/synth.json" "$OUT/synth-$name.json"
  done
  convert 32 "$W/tp-fill"
  for variant in "chunked --no-compile" "fused --no-compile" "liger --no-compile" "fused --compile" \
                 "fused --no-compile --bf16-weights" "fused --compile --bf16-weights"; do
    # shellcheck disable=SC2086  # the variant's words are the flags
    set -- $variant
    local name
    name="tp-$(echo "$variant" | tr -d '-' | tr ' ' '_')"
    mla-zoo finetune "$W/mla32$TAG" -o "$W/$name" --teacher smollm2-135m --data "$W/tp-fill" --seq-len 1024 \
      --batch-size 32 --stages global --max-steps 60 --kl-impl "$@" --save-steps 1000 --logging-steps 10 \
      --no-progress --overwrite > "$OUT/$name.log" 2>&1 || { echo "$name failed" | tee -a "$OUT/$name.log"; continue; }
    cp "$W/$name/training.json" "$OUT/$name.training.json"
  done
}

release() {  # one shared teacher sample, then both settings; resumable across 10-minute calls
  # the sample in two halves (other seeds: other prompts), each within one call (a killed sample starts again)
  local half=$(( ${RELEASE_TOKENS:-49152000} / 2 ))
  synth release-data-a "$half" --seed 1
  synth release-data-b "$half" --seed 2
  for d in ${RELEASE_DKV:-32 8}; do  # RELEASE_DKV=32: the -68.75% setting alone (~16 GPU-min with the sample)
    convert "$d" "$W/release-data-a"
    local name="release$d$TAG"
    [ -f "$W/$name.suite.json" ] && continue
    finetune "$name" "$W/mla$d$TAG" "$W/release-data-a,$W/release-data-b" --stages layerwise,global \
      --layerwise-steps 300 --layerwise-lr 1e-3 --max-steps "${RELEASE_STEPS:-1500}"
    suite "$name" "$W/$name"
    [ "${RELEASE_ONESHOT:-1}" = 0 ] || suite "oneshot$d$TAG" "$W/mla$d$TAG"
  done
  echo '{"done": true}' > "$OUT/release-done.json"
}

plots() {  # per-domain increases of every suite report in $OUT
  python3 bench/plot_suite.py "$W"/quick*.suite.json "$W"/release*.suite.json "$W"/mix-*.suite.json \
    -o "$OUT/recovery_suite.png" 2> /dev/null || true
  python3 bench/plot_suite.py "$W"/oneshot*.suite.json -o "$OUT/oneshot_suite.png" --log 2> /dev/null || true
}

mixes() {  # which teacher mix generalizes best, at the quick budget (d_kv=32); one per call if needed
  synth mixes-calib 131072  # only the conversion's 16k calibration tokens: each mix samples its own QUICK_STEPS x 32 x 1024
  convert 32 "$W/mixes-calib"
  for mix in ${MIXES:-chat=0.4+bos=0.2+text=0.4 chat=0.2+bos=0.1+text=0.7 chat=0.4+bos=0.2+text=0.4+onpolicy}; do
    local name="mix-${mix//[=+.]/_}$TAG"
    [ -f "$W/$name.suite.json" ] && continue
    local extra=()
    [[ $mix == *onpolicy ]] && extra=(--on-policy 0.1) && mix=${mix%+onpolicy}
    finetune "$name" "$W/mla32$TAG" "teacher:$mix" "${QUICK_TRAINING[@]}" "${extra[@]}"
    suite "$name" "$W/$name"
  done
}

for step in "$@"; do
  start=$(date +%s)
  "$step"
  echo "{\"step\": \"$step\", \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$OUT/steps.jsonl"
done
