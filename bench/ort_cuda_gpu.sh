#!/usr/bin/env bash
# The CUDA kernel of MultiHeadLatentAttention on the GPU machine (issue 17): onnxruntime-gpu, the
# kernel library, the standalone harness, the GPU tests and the decode benchmark.
#
# The GPU machine has no network, no ORT headers (the library is built HERE and carried) and a CPU-only
# onnxruntime; one call carries at most 64 MiB. So:
#
# 1. HERE (nvcc, pip and network), once:   bash bench/ort_cuda_gpu.sh prepare
#      .ortcuda/    libmla_zoo_ort_ops.so with the CUDA kernels (isa avx2: any x86-64-v3 host) + mla_zoo_cuda_harness
#      .ortgpu0..3  onnxruntime-gpu (1.31.1, cp312, CUDA 13): the wheel's files as ONE tar.xz (xz -9 of the
#                   unpacked files: 193.5 MiB against the wheel's 243.7 MiB, 4-10 min on 2 cores), cut in 52 MiB
#                   pieces: three of 52 MiB and a last one of 37.5 MiB (`prepare` prints the sizes). A call
#                   carries the ~6.7 MB work tree too: 58 MiB pieces were over the 64 MiB limit once it grew.
#      .gg0 .gg1 .whl  the bundled SmolLM2 GGUF halves (50 + 43.8 MiB) and the gguf wheel, as for bench/gpu_decode.sh
#    (all git-ignored through .git/info/exclude)
# 2. THERE (device tool, repo root), back-to-back calls on one warm machine (it keeps /tmp while warm);
#    each call's carry and the work tree stay under 64 MiB together:
#      call 1..3: carry [".ortgpu0"], [".ortgpu1"], [".ortgpu2"]    command: bash bench/ort_cuda_gpu.sh stage
#      call 4:    carry [".gg0", ".whl"]                           command: bash bench/ort_cuda_gpu.sh stage
#      call 5:    carry [".gg1"]                                  command: bash bench/ort_cuda_gpu.sh stage
#      call 6:    carry [".ortgpu3", ".ortcuda"]                    command: bash bench/ort_cuda_gpu.sh stage setup harness test bench
#    Logs and JSON go to $OUT: harness.jsonl, harness_bench.jsonl, pytest_ort_cuda.log, onnx_cuda.json/.log.
#
# Steps: kernels or prepare (here) | stage | setup | harness | compare | shared | profile | test | errors | bench  (run in
# the order given).
# The harness, compare, shared and profile steps need only .ortcuda (no onnxruntime, no setup): one call carrying
# [".ortcuda"] with the command `bash bench/ort_cuda_gpu.sh compare profile` measures the kernels alone
# (`bash bench/ort_cuda_gpu.sh kernels` here first: .ortcuda without the onnxruntime pieces).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=gpu_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_setup.sh"  # the environment, $OUT, setup's pieces
export PYTHONPATH=/tmp/ortsite:$PYTHONPATH  # onnxruntime-gpu first
ORTGPU_VERSION=${ORTGPU_VERSION:-1.31.1}

kernels() {  # HERE: .ortcuda/, the library with the CUDA kernels + the harness (all that harness, compare and
  # profile need; about a minute)
  local top p
  top=$(git rev-parse --show-toplevel)
  cd "$top"
  for p in '/.ortgpu*/' '/.ortcuda/'; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
  MLA_ZOO_CACHE=${HOME}/.cache/mla-zoo python3 - <<'EOF'
import shutil
from pathlib import Path
from mla_zoo.export.kernels.build import BuildSettings, build_kernels
r = build_kernels(BuildSettings(cuda=True, isa="avx2"))
out = Path(".ortcuda")
shutil.rmtree(out, ignore_errors=True)
out.mkdir()
for f in (r.library, r.harness):
    shutil.copy2(f, out)
(out / "SOURCE_HASH").write_text(r.source_hash + "\n")
print("library:", r.library)
EOF
}

prepare() {  # HERE: kernels, and the onnxruntime-gpu pieces
  local tmp
  kernels
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$tmp" "onnxruntime-gpu==$ORTGPU_VERSION"
  if [ -n "${ORTGPU_TARXZ:-}" ] && [ -f "$ORTGPU_TARXZ" ]; then  # a tar.xz made earlier by this step (xz takes ~10 min)
    cp "$ORTGPU_TARXZ" "$tmp/ortgpu.tar.xz"
  else
    mkdir "$tmp/files"
    python3 -m zipfile -e "$tmp"/onnxruntime_gpu-*.whl "$tmp/files"
    tar -C "$tmp/files" -cf - . | xz -T0 -9 > "$tmp/ortgpu.tar.xz"
    cp "$tmp/ortgpu.tar.xz" /tmp/ortgpu-"$ORTGPU_VERSION".tar.xz  # reuse: ORTGPU_TARXZ=/tmp/ortgpu-<version>.tar.xz
  fi
  split -b 52M -d -a 1 "$tmp/ortgpu.tar.xz" "$tmp/ortgpu.tar.xz."  # + the ~6.7 MB work tree < 64 MiB
  rm -rf .ortgpu?
  local i=0
  for piece in "$tmp"/ortgpu.tar.xz.?; do mkdir ".ortgpu$i" && mv "$piece" ".ortgpu$i/"; i=$((i + 1)); done
  echo "wheel $(du -m "$tmp"/onnxruntime_gpu-*.whl | cut -f1) MiB -> tar.xz $(du -m "$tmp/ortgpu.tar.xz" | cut -f1) MiB" \
       "in $i pieces:"
  du -m .ortgpu? .ortcuda .gg0 .gg1 .whl 2>/dev/null || true
  echo "check that each call's carry of step 2 stays under 64 MiB together with the work tree"
  rm -rf "$tmp"
  for d in .gg0 .gg1 .whl; do [ -d "$d" ] || echo "missing $d: stage the GGUF as bench/gpu_decode.sh says"; done
}

stage() {  # THERE: whatever pieces this call carried -> /tmp/stage
  mkdir -p "$STAGE"
  for d in .ortgpu? .gg0 .gg1 .whl .ortcuda; do
    if [ -d "$d" ]; then cp -r "$d"/. "$STAGE"/; echo "staged $d"; fi
  done
}

setup() {  # THERE: onnxruntime-gpu, the bundled model, mla-zoo, the prebuilt library in the cache
  if [ ! -d /tmp/ortsite/onnxruntime ]; then
    mkdir -p /tmp/ortsite
    cat "$STAGE"/ortgpu.tar.xz.? | xz -d | tar -C /tmp/ortsite -xf -
  fi
  bundled_model llm_init.py
  site_wheel gguf
  editable_install
  python3 - <<'EOF'
import shutil, sys
from pathlib import Path
from mla_zoo.export.kernels.build import BuildSettings, build_kernels, find_nvcc, library_dir, source_hash
stage = Path("/tmp/stage")
try:  # nvcc here: build for this machine
    find_nvcc()
    r = build_kernels(BuildSettings(cuda=True))
except Exception as e:
    want = source_hash("avx2", "cuda")
    got = (stage / "SOURCE_HASH").read_text().strip()
    if got != want:
        sys.exit(f"the carried library was built from other sources ({got}, these are {want}): run prepare again")
    target = library_dir("avx2", "cuda")
    target.mkdir(parents=True, exist_ok=True)
    for name in ("libmla_zoo_ort_ops.so", "mla_zoo_cuda_harness"):
        shutil.copy2(stage / name, target / name)
    r = build_kernels(BuildSettings(cuda=True, isa="avx2"))  # up to date: checks nothing is missing
    print("prebuilt library (no nvcc here:", e, ")")
print("library:", r.library)
EOF
  versions "$OUT/versions_ort_cuda.txt" "onnxruntime.get_available_providers(), torch.cuda.get_device_name()" onnxruntime
}

harness_path() {  # the harness: the carried .ortcuda/ one (no setup needed), else the one setup installed
  local isa
  if [ -x .ortcuda/mla_zoo_cuda_harness ]; then echo .ortcuda/mla_zoo_cuda_harness; return; fi
  for isa in avx2 native; do
    local d
    d=$(python3 -c "from mla_zoo.export.kernels.build import library_dir; print(library_dir('$isa', 'cuda'))")
    if [ -x "$d/mla_zoo_cuda_harness" ]; then echo "$d/mla_zoo_cuda_harness"; return; fi
  done
}

harness() {  # THERE: the kernels alone against the float64 reference (no onnxruntime)
  local h
  h=$(harness_path)
  "$h" > "$OUT/harness.jsonl" 2>&1 || true
  tail -3 "$OUT/harness.jsonl"
  "$h" --bench --contexts 2048,8192,16384,32768 --batches 1,16 > "$OUT/harness_bench.jsonl" 2>&1 || true
  cat "$OUT/harness_bench.jsonl"
  # every launch configuration (MLA_ZOO_CUDA_*): checked, then timed; the best per shape
  "$h" --sweep > "$OUT/harness_sweep.jsonl" 2>&1 || true
  grep -E '"(best|copy_floor)"|"config": "default"|summary' "$OUT/harness_sweep.jsonl" || true
}

compare() {  # THERE: the warps attend kernel (the default, kWarpsByDefault in mla_attention_cuda.cu) against the
  # blocks one (MLA_ZOO_CUDA_KERNEL), after the hardware's mma / ldmatrix fragments are checked against the
  # layouts the CPU emulation implements; then the 32K x 16 sweep, every configuration the harness has (16-slot
  # warp tiles and the register-capped build, "-cap128", included), the fastest per family against the default.
  # Needs only .ortcuda (about 110 s on an H100 before the 16-slot and capped configurations: expect ~2 min).
  local h k
  h=$(harness_path)
  "$h" --fragments | tee "$OUT/fragments.jsonl"
  "$h" > "$OUT/harness.jsonl" 2>&1 || true
  tail -1 "$OUT/harness.jsonl"
  for k in blocks warps; do
    MLA_ZOO_CUDA_KERNEL=$k "$h" --bench --contexts 2048,16384,32768 --batches 1,16 > "$OUT/bench_$k.jsonl" 2>&1 || true
    echo "== $k"; grep decode "$OUT/bench_$k.jsonl" | cut -c60-220 || true
  done
  "$h" --sweep --contexts 32768 --batches 16 > "$OUT/sweep_32k.jsonl" 2>&1 || true
  grep -E '"(best|copy_floor)"|-default|summary' "$OUT/sweep_32k.jsonl" || true
  python3 - "$OUT/sweep_32k.jsonl" <<'PY' || true
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith('{"sweep": "decode"')]
rows = [r for r in rows if "us_loop" in r]
base = next((r["us_loop"] for r in rows if r["config"] == "warps-default"), None)
def family(r):  # blocks | built-in / capped warps kernel per warp tile
    if r["kernel"] != "warps":
        return "blocks"
    return ("capped" if r.get("max_registers") else "built-in") + f" wn{r['block_n']}"
for fam in sorted({family(r) for r in rows}):  # the 3 fastest of each; x = warps-default's us_loop / this one's
    for r in sorted((r for r in rows if family(r) == fam), key=lambda r: r["us_loop"])[:3]:
        print(f"{fam:14s} {r['config']:32s} {r['check']:4s} us_loop {r['us_loop']:8.2f} "
              f"x{base / r['us_loop'] if base else 0:.3f} occupancy {r['occupancy']} waves {r['waves']:.2f} "
              f"splits {r['splits']} smem {r['smem_bytes']}")
PY
}

shared() {  # THERE: op version 2 (export --shared-cache) in the harness alone, no onnxruntime (one call carrying only
  # .ortcuda): every check, version 2's buffers in place and copied among them, then the op's time in place against
  # version 1's, back to back on the same shapes (128K: the long context of issue 17's bandwidth goal; ~1 min on an H100)
  local h layout
  h=$(harness_path)
  "$h" > "$OUT/harness.jsonl" 2>&1 || true
  echo "version 2 checks passed: $(grep '"layout": "v2' "$OUT/harness.jsonl" | grep -c '"ok": true') of" \
    "$(grep -c '"layout": "v2' "$OUT/harness.jsonl")"
  tail -1 "$OUT/harness.jsonl"
  for layout in v1 shared; do
    # shellcheck disable=SC2046  # the flag, or none
    "$h" --bench $([ $layout = shared ] && echo --shared) --contexts 2048,16384,32768,131072 --batches 1,16 \
      > "$OUT/bench_$layout.jsonl" 2>&1 || true
    echo "== $layout"; grep decode "$OUT/bench_$layout.jsonl" | cut -c1-200 || true
  done
}

profile() {  # THERE: Nsight Compute's counters of the three kernels at 32K x 16 (Firecracker machines only:
  # gVisor's ncu reads no counters), as text in $OUT/ncu_attend.txt; one call carrying only .ortcuda is enough
  local h
  h=$(harness_path)
  ncu --clock-control none --kernel-name "regex:prepare_kernel|attend_.*kernel|merge_kernel" --launch-skip 3 \
    --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters \
    "$h" --bench --contexts 32768 --batches 16 --iters 3 > "$OUT/ncu_attend.txt" 2>&1 || true
  grep -E "^  [a-z_]+_kernel|Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Stall|Issued Warp" \
    "$OUT/ncu_attend.txt" | head -60 || true
}

test() {  # THERE: onnxruntime CUDA EP with our kernel: node cases + placement, harness, SmolLM2 fp16 vs PyTorch
  python3 -m pytest -q -rs --tb=short -p no:logging tests/test_onnx_cuda_gpu.py > "$OUT/pytest_ort_cuda.log" 2>&1 || true
  tail -15 "$OUT/pytest_ort_cuda.log"
}

errors() {  # THERE: where the fp16 export's logits error comes from, on the CUDA EP, each against PyTorch float64 /
  # fp32 / fp16 (bench/onnx_fp16_errors.py; ~1 min each): the default export (fp32 residual stream) with our
  # kernel and with the op's portable body, then all-fp16 exports with each attention kernel (warps, blocks)
  local k log=$OUT/fp16_errors.log
  python3 bench/onnx_fp16_errors.py --ort cuda --out "$OUT/fp16_errors.jsonl" 2>> "$log" || true
  python3 bench/onnx_fp16_errors.py --ort cuda-body --out "$OUT/fp16_errors.jsonl" 2>> "$log" || true
  for k in warps blocks; do
    MLA_ZOO_CUDA_KERNEL=$k python3 bench/onnx_fp16_errors.py --ort cuda --fp16-residual --out "$OUT/fp16_errors.jsonl" \
      2>> "$log" || true
  done
  cat "$OUT/fp16_errors.jsonl" 2> /dev/null || tail -20 "$OUT/fp16_errors.log"
}

bench() {  # THERE: decode latency, our op vs the original on the CUDA EP, and the kernel's bandwidth
  # shellcheck disable=SC2086  # BENCH_ARGS: extra flags, e.g. --contexts 2048,16384,32768 --fp16-residual
  python3 bench/onnx_cuda.py --out "$OUT/onnx_cuda.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/onnx_cuda.log" | tail -14 || true
}

for step in "$@"; do "$step"; done
