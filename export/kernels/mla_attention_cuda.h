// The CUDA kernel of mla_zoo.MultiHeadLatentAttention (export/op_spec.md): the interface between the
// kernels (mla_attention_cuda.cu, nvcc) and their callers: the onnxruntime glue
// (mla_attention_cuda.cc, g++: nvcc cannot compile onnxruntime's lite custom-op header) and the
// standalone harness (cuda_harness.cu). Plain C++: no onnxruntime and no CUDA headers.
//
// One call enqueues three kernels on the caller's stream, with no host synchronisation:
//   1. prepare (per new token): the new latent row and the rotated RoPE key into the presents; each
//      head's query as ONE row [q_lat | q_rope zero-padded into all KV heads' RoPE slots] (W_uk
//      absorbed, softmax scale folded in), so one dot over a cached [latent | all RoPE keys] row is
//      the exact score of every head (the Triton decode kernel's per-KV-head RoPE trick);
//   2. attend (per sequence, block of query rows, split of the cache): split-K flash attention over
//      the latent cache; each cache tile is loaded once into shared memory and serves both the scores
//      and the weighted sum of every row of the block (tensor cores for float16); the block of the
//      first rows also copies the past rows of its split into the present (the past is read once).
//      Two kernels: "blocks" (the whole block works on one tile at a time, barriers between the
//      steps: any dims, float32, CUDA cores, prefill's 64-row blocks) and "warps" (float16 tensor
//      cores, 16-row blocks, r + KR <= 128: every warp streams its own tiles with its own softmax
//      state and accumulators in registers, no block barrier until the split's end); make_plan picks;
//   3. merge (only when the cache was split): the log-sum-exp merge of the splits.
//   W_uv is applied in the epilogue of 2 (one split) or in 3.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "mla_attention_common.h"

namespace mla_zoo {
namespace cuda {

enum class Dtype { kFloat32, kFloat16 };
// How the attention tiles are multiplied: kAuto = tensor cores (WMMA, fp32 accumulation) for
// float16, CUDA cores for float32 (exact fp32 math for tests); the harness forces either.
enum class Math { kAuto, kTensorCores, kCudaCores };
// Which attend kernel (see above): kAuto = the plan's choice (Tuning), else forced where it can run.
enum class Kernel { kAuto, kBlocks, kWarps };

constexpr int kMaxRopeIndices = 1024;  // n_kv * R: passed by value to the prepare kernel

// Device pointers in the op's input / output order; element type `dtype`, attention_mask int64.
struct Inputs {
  const void* query = nullptr;
  const void* latent = nullptr;
  const void* key_rope = nullptr;
  const void* past_latent = nullptr;
  const void* past_key_rope = nullptr;
  const int64_t* attention_mask = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  const void* w_uk = nullptr;
  const void* w_uv = nullptr;
};

struct Outputs {
  void* output = nullptr;
  void* present_latent = nullptr;
  void* present_key_rope = nullptr;
};

// Plan::max_registers of the warps kernel's register-capped build (65536 / (2 blocks x 256 threads)).
constexpr int kMaxRegistersCapped = 128;

// The launch configuration of one call and the scratch memory it needs.
struct Plan {
  Kernel kernel = Kernel::kBlocks;  // the attend kernel: kBlocks or kWarps (never kAuto)
  bool tensor_cores = false;
  bool pipelined = false;   // cp.async buffering of the cache tiles (sm_80+): ring > 1
  int ring = 1;             // cache tiles in shared memory (per warp for kWarps): 1 = synchronous loads, 2 = double,
                            // 3 = triple buffering (kWarps: up to 4)
  int block_m = 16;         // query rows (token, head) per attend block
  int block_n = 64;         // cache slots per tile (kWarps: per warp tile)
  int warps = 0;            // kWarps: warps per attend block, each with its own tiles (threads = 32 * warps)
  int max_registers = 0;    // kWarps: kMaxRegistersCapped = the register-capped build of the kernel (queries
                            // from shared memory; r16 <= 96 only), 0 = the built-in one (168 per thread at r16 <= 96)
  int threads = 128;        // per attend block
  int64_t row_blocks = 1;   // per sequence
  int64_t splits = 1;       // of the cache, per (sequence, row block)
  int64_t split_len = 0;    // slots per split (a multiple of block_n)
  int ldq = 0;              // row stride of the prepared queries in scratch: r + KR rounded up to 16
  int ld = 0;               // shared-memory row stride of query / cache tiles (ldq + 8: fewer bank conflicts)
  int r16 = 0;              // r rounded up to 16: the columns of the output accumulators
  int ldo = 0;              // shared-memory row stride of the fp32 output accumulators (r16 + 4)
  size_t smem_bytes = 0;    // dynamic shared memory of an attend block
  size_t q_bytes = 0;       // scratch: prepared queries [B*S*H, ldq]
  size_t part_bytes = 0;    // scratch: split partials (output [rows*splits, r] + lse [rows*splits]), 0 if one split
  int launch_mask = 7;      // kernels launch() enqueues: 1 prepare | 2 attend | 4 merge (the harness's timing breakdown)
  size_t scratch_bytes() const { return q_bytes + part_bytes; }
};

// Knobs of the launch plan, to tune it on a GPU without rebuilding; 0 (-1 for pipeline) = the built-in
// choice. make_plan reads them from the environment once per process (env_tuning) unless given some:
//   MLA_ZOO_CUDA_BLOCK_N          cache slots per tile: 32, 64, 128 or 256 (falls back to smaller if it does not fit)
//   MLA_ZOO_CUDA_BLOCKS_PER_SM    split-K target: attend blocks per SM over the whole grid (built-in: 4)
//   MLA_ZOO_CUDA_SPLITS           a fixed number of splits of the cache (overrides BLOCKS_PER_SM)
//   MLA_ZOO_CUDA_MIN_SPLIT_TILES  no split shorter than this many tiles (built-in: 2)
//   MLA_ZOO_CUDA_THREADS          threads per attend block: 128 or 256 (built-in: 256)
//   MLA_ZOO_CUDA_PIPELINE         0: no cp.async double buffering (the plain synchronous loads)
//   MLA_ZOO_CUDA_RING             tiles in flight with cp.async: 2 (double buffering, built-in) or 3 (triple);
//                                 per warp in the warps kernel: 2, 3 or 4
//   MLA_ZOO_CUDA_KERNEL           blocks | warps: the attend kernel (built-in: kWarpsByDefault in
//                                 mla_attention_cuda.cu); warps runs where it can (float16 tensor cores,
//                                 r + KR <= 128), any number of rows (16-row blocks)
//   MLA_ZOO_CUDA_WARPS            warps kernel: warps per block, 2, 4 or 8 (built-in: 4)
//   MLA_ZOO_CUDA_WARP_N           warps kernel: cache slots per warp tile, 16, 32 or 64 (built-in: 32)
//   MLA_ZOO_CUDA_MAX_REGISTERS    warps kernel: 128 = its build capped at 128 registers per thread, so that two
//                                 8-warp or four 4-warp blocks fit an SM's registers (the built-in build's 166:
//                                 one or three); shared memory must allow them too (16-slot warp tiles in 2-3
//                                 deep rings, see export/kernels/README.md). r16 <= 96 only (elsewhere, and
//                                 for any other value, the built-in build).
// The split-K knobs apply to both kernels; for the warps kernel MIN_SPLIT_TILES counts tiles per warp.
struct Tuning {
  int block_n = 0;
  int blocks_per_sm = 0;
  int splits = 0;
  int min_split_tiles = 0;
  int threads = 0;
  int pipeline = -1;
  int ring = 0;
  Kernel kernel = Kernel::kAuto;
  int warps = 0;
  int warp_n = 0;
  int max_registers = 0;
};

const Tuning& env_tuning();

// Device facts the plan depends on (queried once per device; the harness may pass its own).
struct Device {
  int sm_count = 132;
  int max_smem_per_block = 227 * 1024;
  int smem_per_sm = 228 * 1024;  // bounds the attend blocks resident per SM (the split-K default)
};

Device current_device();  // of the calling thread's current CUDA device (cached per device)

// The launch configuration for these dims. Throws ShapeError for dims the kernel cannot run.
// pipeline=false (or pipeline 0 in the tuning) turns the cp.async double
// buffering of the cache tiles off: the plain synchronous loads (the harness tests both).
// tuning: nullptr = env_tuning().
Plan make_plan(const MlaDims& d, Dtype dtype, const Device& device, Math math = Math::kAuto, bool pipeline = true,
               const Tuning* tuning = nullptr);

// Attend blocks of this plan resident per SM (cudaOccupancyMaxActiveBlocksPerMultiprocessor on the
// current device; -1 when unknown, e.g. in the CPU emulation). For the harness's sweep.
int attend_occupancy(const Plan& plan, Dtype dtype);

// Checks the warps kernel's tensor-core primitives (ldmatrix x4 and x4.trans, mma m16n8k16) on the current
// device against the fragment layouts of the PTX ISA and a plain matrix product: "" or what differs.
// On a GPU it checks the hardware, in the CPU emulation the emulation (the harness runs it).
std::string check_tensor_core_fragments();

// Enqueues the op on `stream` (a cudaStream_t; nullptr = the legacy default stream). `scratch` holds
// plan.scratch_bytes() bytes of device memory, 256-byte aligned, that stay untouched until the
// kernels are done (stream order). Returns "" or an error message (cudaGetLastError after each
// launch: a bad configuration, or an earlier asynchronous error of the device). No host synchronisation.
std::string launch(const MlaDims& d, const std::vector<int64_t>& rope_pairs, float scale, Dtype dtype,
                   const Plan& plan, const Inputs& in, const Outputs& out, void* scratch, void* stream);

}  // namespace cuda
}  // namespace mla_zoo
