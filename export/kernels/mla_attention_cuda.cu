// CUDA kernels of mla_zoo.MultiHeadLatentAttention: prepare -> attend (split-K) -> merge.
// Design and interface: mla_attention_cuda.h. Semantics: export/op_spec.md (the CPU kernel,
// mla_attention.cc, and the torch reference, export/op.py, are the references it is tested against).
//
// Layouts (row-major, element type T = float or __half unless noted):
//   query [B, S, H*hd] (per head [rope 2R | nope hd-2R]), latent [B, S, r], key_rope [B, S, KR],
//   past_latent [B, 1, P, r], past_key_rope [B, 1, P, KR], attention_mask [B, T] int64,
//   cos / sin [B, S, C], w_uk [n_kv, dn, r], w_uv [n_kv, dv, r];
//   output [B, S, H*dv], present_latent [B, 1, T, r], present_key_rope [B, 1, T, KR].
// Scratch: q [B*S*H, ldq] T (row (b, s, h) = [q_lat (r) | q_rope in its group's slot of KR | 0]),
//   then, when the cache is split, part_o [B*S*H, splits, r] fp32 and part_lse [B*S*H, splits] fp32.
// A query row within a sequence is m = s*H + h: prefill and decode are the same kernel (decode has H rows).
//
// Decode at long context is bound by the cache's bytes (past read + present written) once the fixed
// cost is small, so: the cache tiles stream in with 16-byte cp.async (a ring of 2 to 4 tiles) and
// every address is a per-thread column pointer plus row * stride; the attention_mask slots come with
// the tile (no synchronous global load per tile); the copying block writes the past rows to the
// present with 16-byte streaming stores from the tile it already has; the small latency-bound parts
// (W_uk in prepare, the merge, W_uv) keep several coalesced loads in flight per thread. The launch
// plan (make_plan) is tunable at run time (Tuning, MLA_ZOO_CUDA_* in mla_attention_cuda.h) and
// `mla_zoo_cuda_harness --sweep` times every candidate on a GPU.
//
// Two attend kernels. "blocks" (attend_kernel: any dims, float32, CUDA cores, prefill's 64-row blocks):
// the whole block shares each tile, 4 block barriers per tile (scores, softmax, weighted sum, with the
// fp32 accumulators in shared memory). "warps" (attend_warps_kernel: float16 decode, r + KR <= 128):
// a block still owns (split, 16 rows, sequence), but each warp streams its own tiles (every warps-th
// tile of the split, 16, 32 or 64 slots) through its own cp.async ring and keeps its own online softmax
// and output accumulator in registers: mma.sync m16n8k16 with ldmatrix operands, the queries loaded
// once as A fragments (its register-capped build, Plan::max_registers: from shared memory per tile), the
// probabilities reused from the score fragments in registers (FlashAttention-2); a warp only waits for
// its own copies (+ __syncwarp), and the block meets once, at the split's end, to combine its warps.
// (The blocks kernel's decode reached ~45% of the copy bandwidth at 32K x 16, the same time on an H100
// and an H200: bound by per-tile latency, not bandwidth; independent warps keep more tiles in flight
// per SM than a block that advances in lockstep.)

#ifdef MLA_ZOO_CUDA_EMULATION
#include "cuda_emulation.h"  // the same source as plain C++ on the CPU (tests without a GPU)
#define MLA_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::mla_zoo::emulation::dynamic_smem())
#define MLA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::mla_zoo::emulation::launch(kernel, grid, block, smem, __VA_ARGS__))
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define MLA_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#define MLA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <type_traits>
#include <utility>
#include <vector>

#include "mla_attention_cuda.h"

namespace mla_zoo {
namespace cuda {
namespace {

constexpr float kNegInf = -INFINITY;
constexpr int kWarp = 32;

// ---------------------------------------------------------------------------------------------
// element access
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__host__ __device__ inline int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct RopeIndex {
  uint16_t v[kMaxRopeIndices];  // rope_pairs, row-major [n_kv, R]
};

// Every dimension as int64 (offsets into [B, T, r] caches overflow 32 bits at long contexts). PR, TR, MC:
// rows per batch row of the past, the present and the mask (version 1: P, T, T; version 2: the buffer's C);
// copy: whether the past's rows go to the present (version 1; version 2 attends in the shared buffer).
struct Dims {
  int64_t B, S, P, T, H, n_kv, G, R, E, KR, hd, dn, r, dv, C, PR, TR, MC;
  bool copy;
};

Dims to_dims(const MlaDims& d) {
  return Dims{d.B,  d.S,  d.P,  d.T,  d.H,  d.n_kv,       d.G,          d.R,         d.E,
              d.KR, d.hd, d.dn, d.r,  d.dv, d.C,  d.past_rows, d.present_rows, d.mask_cols, !d.shared_buffer};
}

// ---------------------------------------------------------------------------------------------
// 1. prepare: one block per new token (x) and slice of its H*r absorbed query outputs (y)
// ---------------------------------------------------------------------------------------------

template <typename T>
struct PrepareArgs {
  const T *query, *latent, *key_rope, *cos, *sin, *w_uk;
  T *present_latent, *present_key_rope, *q;
  float scale;
  int ldq;
};

constexpr int kPrepHeads = 8;  // heads of a KV group whose W_uk sums a prepare thread runs at once

template <typename T>
__global__ void prepare_kernel(Dims d, PrepareArgs<T> a, RopeIndex pairs) {
  // [H*dn] scaled q_nope | [n_kv*R] cos | [n_kv*R] sin | [warps, kPrepHeads, 32] partial W_uk sums
  MLA_DYNAMIC_SMEM(float, prep_smem);
  float* qn = prep_smem;
  float* cs = qn + d.H * d.dn;
  float* sn = cs + d.n_kv * d.R;
  const int64_t tok = blockIdx.x;  // b*S + s
  const int64_t b = tok / d.S, s = tok % d.S;
  const int64_t slot = b * d.TR + d.P + s;  // the token's row in the presents
  const T* q = a.query + tok * d.H * d.hd;
  for (int64_t i = threadIdx.x; i < d.H * d.dn; i += blockDim.x)
    qn[i] = a.scale * to_f(q[(i / d.dn) * d.hd + d.E + i % d.dn]);
  for (int64_t i = threadIdx.x; blockIdx.y == 0 && i < d.n_kv * d.R; i += blockDim.x) {  // RoPE: block y = 0 only
    cs[i] = to_f(a.cos[tok * d.C + pairs.v[i]]);
    sn[i] = to_f(a.sin[tok * d.C + pairs.v[i]]);
  }
  __syncthreads();
  T* qrow = a.q + tok * d.H * a.ldq;  // this token's H prepared rows

  // q_lat[h, :] = W_uk[g]^T (scale * q_nope[h]). Latency-bound (W_uk is a few KB per group, in L2), so
  // the dn-long sums are split over the warps: a work item is (group g, 32 columns c0..c0+31); lane = a
  // column (each load instruction reads a contiguous piece of a W_uk row), warp w = rows j = w, w + warps, ...
  // (a handful of independent loads per thread, all in flight at once), and every W_uk element is used for
  // the group's heads (up to kPrepHeads at a time); the warps' partial sums meet in shared memory.
  float* part = sn + d.n_kv * d.R;  // [warps, kPrepHeads, 32]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const int chunks = static_cast<int>(ceil_div_dev(d.r, kWarp));
  const int G = static_cast<int>(d.G), dn = static_cast<int>(d.dn), r = static_cast<int>(d.r);
  for (int item = blockIdx.y; item < d.n_kv * chunks; item += gridDim.y) {
    const int g = item / chunks, c = (item % chunks) * kWarp + lane;
    const T* w = a.w_uk + static_cast<int64_t>(g) * dn * r + min(c, r - 1);  // past r: a real column, unused
    for (int h0 = 0; h0 < G; h0 += kPrepHeads) {
      float acc[kPrepHeads] = {};
      const float* x = qn + static_cast<int64_t>(g * G + h0) * dn;
#pragma unroll 4
      for (int j = warp; j < dn; j += warps) {
        const float wv = to_f(w[static_cast<int64_t>(j) * r]);
#pragma unroll
        for (int hh = 0; hh < kPrepHeads; ++hh)
          if (h0 + hh < G) acc[hh] = fmaf(x[hh * dn + j], wv, acc[hh]);
      }
#pragma unroll
      for (int hh = 0; hh < kPrepHeads; ++hh) part[(warp * kPrepHeads + hh) * kWarp + lane] = acc[hh];
      __syncthreads();
      for (int i = threadIdx.x; i < kPrepHeads * kWarp; i += blockDim.x) {  // (head hh, column lane l)
        const int hh = i / kWarp, col = (item % chunks) * kWarp + i % kWarp;
        float sum = 0.f;
        for (int v = 0; v < warps; ++v) sum += part[(v * kPrepHeads + hh) * kWarp + i % kWarp];
        if (h0 + hh < G && col < r) qrow[static_cast<int64_t>(g * G + h0 + hh) * a.ldq + col] = from_f<T>(sum);
      }
      __syncthreads();  // part is refilled next
    }
  }
  if (blockIdx.y != 0) return;

  for (int64_t c = threadIdx.x; c < d.r; c += blockDim.x) a.present_latent[slot * d.r + c] = a.latent[tok * d.r + c];
  // y = x * [c, c] + rotate_half(x) * [s, s] over each KV head's 2R dims
  const T* k = a.key_rope + tok * d.KR;
  for (int64_t i = threadIdx.x; i < d.n_kv * d.R; i += blockDim.x) {
    const int64_t g = i / d.R, j = i % d.R;
    const float x1 = to_f(k[g * d.E + j]), x2 = to_f(k[g * d.E + d.R + j]);
    a.present_key_rope[slot * d.KR + g * d.E + j] = from_f<T>(x1 * cs[i] - x2 * sn[i]);
    a.present_key_rope[slot * d.KR + g * d.E + d.R + j] = from_f<T>(x2 * cs[i] + x1 * sn[i]);
  }
  // the RoPE part of each head's row: its rotated query in its own group's slot, zeros elsewhere
  const int64_t tail = a.ldq - d.r;
  for (int64_t i = threadIdx.x; i < d.H * tail; i += blockDim.x) {
    const int64_t h = i / tail, c = i % tail;
    float v = 0.f;
    if (c < d.KR && c / d.E == h / d.G) {
      const int64_t j = c % d.E, jj = j % d.R, ci = (h / d.G) * d.R + jj;
      const float x1 = to_f(q[h * d.hd + jj]), x2 = to_f(q[h * d.hd + d.R + jj]);
      v = a.scale * (j < d.R ? x1 * cs[ci] - x2 * sn[ci] : x2 * cs[ci] + x1 * sn[ci]);
    }
    qrow[h * a.ldq + d.r + c] = from_f<T>(v);
  }
}

// out[e] = (sum_c o[c] * w[e, c]) / l for e < dv (0 where l <= 0): the W_uv projection of one
// query row, o in shared memory [r] fp32, w [dv, r] in global memory. It is latency-bound (a few KB
// per row), so one warp per 4 outputs with the lanes along r: each load instruction reads contiguous
// bytes of a row of w, and 4 rows' loads are in flight per lane (one thread per output, walking its
// row of w serially, left one uncoalesced load in flight).
constexpr int kProjectOutputs = 4;

template <typename T>
__device__ __forceinline__ void project_group(const float* o, const T* w, int64_t e0, int64_t dv, int64_t r, float l,
                                              T* out, int lane) {
  float acc[kProjectOutputs] = {};
  const T* rows[kProjectOutputs];  // past the last output: the last row again (loads without branches)
#pragma unroll
  for (int u = 0; u < kProjectOutputs; ++u) rows[u] = w + min(e0 + u, dv - 1) * r;
  for (int64_t c = lane; c < r; c += kWarp) {
    const float x = o[c];
    float v[kProjectOutputs];
#pragma unroll
    for (int u = 0; u < kProjectOutputs; ++u) v[u] = to_f(rows[u][c]);
#pragma unroll
    for (int u = 0; u < kProjectOutputs; ++u) acc[u] = fmaf(x, v[u], acc[u]);
  }
#pragma unroll
  for (int u = 0; u < kProjectOutputs; ++u) {
    const float v = warp_sum(acc[u]);
    if (lane == 0 && e0 + u < dv) out[e0 + u] = from_f<T>(l > 0.f ? v / l : 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// 2. attend: one block per (split, row block, sequence): its rows' flash attention over the split's
//    slots [split * split_len, +split_len), one tile of block_n slots at a time
// ---------------------------------------------------------------------------------------------

// Byte offsets of the attend block's shared memory regions (the same on host and device).
struct SmemLayout {
  size_t kv, kv_stride, q, o, s, p, m, l, mask, mask_stride, total;
};

__host__ __device__ inline size_t align128(size_t x) { return (x + 127) / 128 * 128; }

__host__ __device__ inline SmemLayout smem_layout(int bm, int bn, int ld, int ldo, int elem, int ring) {
  SmemLayout L{};
  size_t at = 0;
  L.kv_stride = align128(static_cast<size_t>(bn) * ld * elem);
  L.kv = at, at += ring * L.kv_stride;                                  // ring of cache tiles [bn, ld] T
  L.q = at, at = align128(at + static_cast<size_t>(bm) * ld * elem);    // query rows [bm, ld] T
  L.o = at, at = align128(at + static_cast<size_t>(bm) * ldo * 4);      // output accumulators [bm, ldo] f32
  L.s = at, at = align128(at + static_cast<size_t>(bm) * bn * 4);       // scores (then probs for CUDA cores) f32
  L.p = at, at = align128(at + static_cast<size_t>(bm) * bn * elem);    // probs as T for tensor cores
  L.m = at, at = align128(at + static_cast<size_t>(bm) * 4);            // running max
  L.l = at, at = align128(at + static_cast<size_t>(bm) * 4);            // running sum
  L.mask_stride = align128(static_cast<size_t>(bn) * 8);
  L.mask = at, at += ring * L.mask_stride;                              // their attention_mask slots, int64 [bn]
  L.total = at;
  return L;
}

template <typename T>
struct AttendArgs {
  const T *past_latent, *past_key_rope, *q, *w_uv;
  const int64_t* mask;
  T *present_latent, *present_key_rope, *out;
  float *part_o, *part_lse;
  int bm, bn, ld, ldq, ldo, r16;
  int64_t splits, split_len;
  bool vec;        // 16-byte loads: r and KR are multiples of 16 / sizeof(T), 16-byte aligned rows
  int ring;        // tiles in shared memory; > 1 (vec only): cp.async, the next ring - 1 tiles stream in
                   // during this one's math
};

// Asynchronous global -> shared copies (sm_80+), to overlap a tile's loads with the math on the
// previous one. (Emulation: the copies land when their thread waits for their group.)
__device__ __forceinline__ void cp_async16(void* dst_smem, const void* src) {
#ifdef MLA_ZOO_CUDA_EMULATION
  emulation::cp_async(dst_smem, src, 16);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async8(void* dst_smem, const void* src) {
#ifdef MLA_ZOO_CUDA_EMULATION
  emulation::cp_async(dst_smem, src, 8);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef MLA_ZOO_CUDA_EMULATION
  emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MLA_ZOO_CUDA_EMULATION
  emulation::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}
// cp_async_wait<pending> for a run-time pending count (0..3)
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    default: cp_async_wait<3>(); break;
  }
}

// The threads that load a cache tile together: the whole block (blocks kernel) or one warp (warps
// kernel): this thread's index among them, how many they are, and the tile's slots.
struct Team {
  int tid, size, bn;
};
__device__ __forceinline__ Team block_team(int bn) {
  return Team{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), bn};
}

// How a thread walks a cache tile [bn, ldq] in 16-byte chunks (vec mode): it keeps ONE chunk column
// and steps down the rows, so the source address is a pointer plus row * stride (no divisions, no
// 64-bit index arithmetic per chunk). Threads tid = n0 * lanes + j of the team take chunk column c0 + j
// and rows n0, n0 + step, ...; one pass over the columns unless a row has more chunks than the team has
// threads. The same mapping issues the loads and later stores the past rows, so a thread only ever
// stores chunks it loaded itself (no barrier needed between its cp.async wait and its stores).
template <typename T>
struct ChunkWalk {
  static constexpr int V = 16 / sizeof(T);  // elements per chunk
  int c;          // this thread's column (elements) in the tile row; -1: idle in this pass
  int n0, step;   // first row and row step
  bool real;      // c < r + KR (else zero padding up to ldq)
  const T *past, *pres;        // the column's element in slot 0 of the sequence's past / present
  T* pres_out;                 // same as pres, writable (the copy of past rows)
  int64_t past_ld, pres_ld;    // row strides: r or KR
  __device__ __forceinline__ ChunkWalk(const Dims& d, const AttendArgs<T>& a, int64_t b, const Team& team, int c0) {
    const int chunks = a.ldq / V;
    const int lanes = min(chunks - c0, team.size);
    step = team.size / lanes;
    n0 = team.tid / lanes;
    c = n0 < step ? (c0 + team.tid % lanes) * V : -1;
    real = c >= 0 && c < d.r + d.KR;
    const bool lat = c < d.r;
    past_ld = lat ? d.r : d.KR;
    pres_ld = past_ld;
    const int64_t off = c < 0 ? 0 : lat ? c : c - d.r;
    past = (lat ? a.past_latent + b * d.PR * d.r : a.past_key_rope + b * d.PR * d.KR) + off;
    pres_out = (lat ? a.present_latent + b * d.TR * d.r : a.present_key_rope + b * d.TR * d.KR) + off;
    pres = pres_out;
  }
  __device__ __forceinline__ const T* src(const Dims& d, int64_t t) const {
    return t < d.P ? past + t * past_ld : pres + t * pres_ld;
  }
};

// Starts the copies of the cache tile [t0, t0 + n_valid) into kv and of its attention_mask into mk
// (pipelined mode): as load_tile, but asynchronous; the copy of past rows to the present happens
// after the wait, from shared memory (store_past_rows).
template <typename T>
__device__ __forceinline__ void issue_tile(const Dims& d, const AttendArgs<T>& a, int64_t b, const Team& team,
                                           int64_t t0, int n_valid, T* kv, int64_t* mk) {
  const int chunks = a.ldq / ChunkWalk<T>::V;
  for (int c0 = 0; c0 < chunks; c0 += team.size) {
    const ChunkWalk<T> w(d, a, b, team, c0);
    if (w.c < 0) continue;
    for (int n = w.n0; n < team.bn; n += w.step) {
      T* dst = kv + n * a.ld + w.c;
      if (n < n_valid && w.real) {
        cp_async16(dst, w.src(d, t0 + n));
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
  }
  for (int n = team.tid; n < team.bn; n += team.size) {
    if (n < n_valid) {
      cp_async8(mk + n, a.mask + b * d.MC + t0 + n);
    } else {
      mk[n] = 0;
    }
  }
}

// The past rows of an arrived tile -> the present (pipelined mode; the block that copies the past).
// Called by every thread after ITS cp.async groups landed and before the block's barrier: each thread
// stores the chunks it loaded itself (the same ChunkWalk), 16 bytes at a time, streaming (__stcs).
template <typename T>
__device__ __forceinline__ void store_past_rows(const Dims& d, const AttendArgs<T>& a, int64_t b, const Team& team,
                                                int64_t t0, int n_valid, const T* kv) {
  const int chunks = a.ldq / ChunkWalk<T>::V;
  const int rows = static_cast<int>(min(static_cast<int64_t>(n_valid), d.P - t0));  // past slots of the tile
  for (int c0 = 0; c0 < chunks; c0 += team.size) {
    const ChunkWalk<T> w(d, a, b, team, c0);
    if (!w.real) continue;
    for (int n = w.n0; n < rows; n += w.step)
      __stcs(reinterpret_cast<uint4*>(w.pres_out + (t0 + n) * w.pres_ld),
             *reinterpret_cast<const uint4*>(kv + n * a.ld + w.c));
  }
}

// The cache tile [t0, t0 + n_valid) -> smem kv [bn, ld] as [latent (r) | RoPE keys (KR) | 0 ...] and
// its attention_mask -> mk, synchronously; past slots come from the past inputs (and, for the copying
// block, go on to the presents), new slots from the presents (written by prepare earlier on the stream).
template <typename T>
__device__ __forceinline__ void load_tile(const Dims& d, const AttendArgs<T>& a, int64_t b, const Team& team,
                                          int64_t t0, int n_valid, bool copy_past, T* kv, int64_t* mk) {
  for (int n = team.tid; n < team.bn; n += team.size) mk[n] = n < n_valid ? a.mask[b * d.MC + t0 + n] : 0;
  if (a.vec) {
    const int chunks = a.ldq / ChunkWalk<T>::V;
    constexpr int kBatch = 4;  // loads in flight per thread before their stores
    for (int c0 = 0; c0 < chunks; c0 += team.size) {
      const ChunkWalk<T> w(d, a, b, team, c0);
      if (w.c < 0) continue;
      for (int base = w.n0; base < team.bn; base += kBatch * w.step) {
        uint4 v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int n = base + u * w.step;
          const int64_t t = t0 + n;
          v[u] = make_uint4(0, 0, 0, 0);
          if (n < n_valid && w.real)
            v[u] = t < d.P ? __ldcs(reinterpret_cast<const uint4*>(w.past + t * w.past_ld))
                           : __ldcg(reinterpret_cast<const uint4*>(w.pres + t * w.pres_ld));
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int n = base + u * w.step;
          if (n >= team.bn) break;
          *reinterpret_cast<uint4*>(kv + n * a.ld + w.c) = v[u];
          const int64_t t = t0 + n;
          if (copy_past && n < n_valid && t < d.P && w.real)
            __stcs(reinterpret_cast<uint4*>(w.pres_out + t * w.pres_ld), v[u]);
        }
      }
    }
  } else {
    const int ld16 = a.ldq;
    for (int idx = team.tid; idx < team.bn * ld16; idx += team.size) {
      const int n = idx / ld16, c = idx % ld16;
      const int64_t t = t0 + n;
      T v = from_f<T>(0.f);
      if (n < n_valid && c < d.r + d.KR) {
        const bool past = t < d.P;
        if (c < d.r) {
          v = past ? a.past_latent[(b * d.PR + t) * d.r + c] : a.present_latent[(b * d.TR + t) * d.r + c];
          if (past && copy_past) a.present_latent[(b * d.TR + t) * d.r + c] = v;
        } else {
          const int64_t e = c - d.r;
          v = past ? a.past_key_rope[(b * d.PR + t) * d.KR + e] : a.present_key_rope[(b * d.TR + t) * d.KR + e];
          if (past && copy_past) a.present_key_rope[(b * d.TR + t) * d.KR + e] = v;
        }
      }
      kv[n * a.ld + c] = v;
    }
  }
}

// scores s[m, n] = q[m] . kv[n] over the ldq columns (zeros past r + KR)
template <typename T, bool kTensorCores>
__device__ __forceinline__ void tile_scores(const AttendArgs<T>& a, const T* q, const T* kv, float* s) {
  const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  if constexpr (kTensorCores) {
    using namespace nvcuda;
    const int nf = a.bn / 16, frags = (a.bm / 16) * nf;
    for (int f = warp; f < frags; f += warps) {
      const int mi = f / nf, ni = f % nf;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int k = 0; k < a.ldq; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, q + mi * 16 * a.ld + k, a.ld);
        wmma::load_matrix_sync(fb, kv + ni * 16 * a.ld + k, a.ld);  // kv^T as a column-major k x n
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(s + mi * 16 * a.bn + ni * 16, acc, a.bn, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < a.bm * a.bn; idx += blockDim.x) {
      const int m = idx / a.bn, n = idx % a.bn;
      const T* x = q + m * a.ld;
      const T* y = kv + n * a.ld;
      float acc = 0.f;
      for (int k = 0; k < a.ldq; ++k) acc = fmaf(to_f(x[k]), to_f(y[k]), acc);
      s[idx] = acc;
    }
  }
}

// o[m, :r16] += p[m, :] @ kv[:, :r16]
template <typename T, bool kTensorCores>
__device__ __forceinline__ void tile_weighted_sum(const AttendArgs<T>& a, const float* s, const T* p, const T* kv,
                                                  float* o) {
  const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  if constexpr (kTensorCores) {
    using namespace nvcuda;
    const int df = a.r16 / 16, frags = (a.bm / 16) * df;
    for (int f = warp; f < frags; f += warps) {
      const int mi = f / df, di = f % df;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* dst = o + mi * 16 * a.ldo + di * 16;
      wmma::load_matrix_sync(acc, dst, a.ldo, wmma::mem_row_major);
      for (int k = 0; k < a.bn; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, p + mi * 16 * a.bn + k, a.bn);
        wmma::load_matrix_sync(fb, kv + k * a.ld + di * 16, a.ld);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(dst, acc, a.ldo, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < a.bm * a.r16; idx += blockDim.x) {
      const int m = idx / a.r16, c = idx % a.r16;
      const float* pm = s + m * a.bn;
      float acc = 0.f;
      for (int n = 0; n < a.bn; ++n) acc = fmaf(pm[n], to_f(kv[n * a.ld + c]), acc);
      o[m * a.ldo + c] += acc;
    }
  }
}

// The end of an attend block, after a barrier: its rows' unnormalised outputs o [nrows, ldo] fp32, max
// and sum of the exponentials in shared memory. One split -> output = (o / l) @ W_uv[g]^T; several ->
// the normalised partial and its log-sum-exp for the merge.
template <typename T>
__device__ __forceinline__ void attend_epilogue(const Dims& d, const AttendArgs<T>& a, int64_t b, int64_t split,
                                                int64_t row0, int nrows, const float* o, const float* row_max,
                                                const float* row_sum) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const int64_t rows = d.S * d.H;
  if (a.splits == 1) {
    const int groups = static_cast<int>(ceil_div_dev(d.dv, kProjectOutputs));  // per row
    for (int item = warp; item < nrows * groups; item += warps) {  // (row m, group of kProjectOutputs outputs)
      const int m = item / groups;
      const int64_t row = row0 + m, g = (row % d.H) / d.G;
      project_group(o + m * a.ldo, a.w_uv + g * d.dv * d.r, static_cast<int64_t>(item % groups) * kProjectOutputs, d.dv,
                    d.r, row_sum[m], a.out + (b * rows + row) * d.dv, lane);
    }
  } else {
    const int r = static_cast<int>(d.r);
    for (int idx = threadIdx.x; idx < nrows * r; idx += blockDim.x) {
      const int m = idx / r, c = idx % r;
      const float l = row_sum[m];
      const int64_t prow = (b * rows + row0 + m) * a.splits + split;  // partial row [B*S*H, splits]
      a.part_o[prow * d.r + c] = l > 0.f ? o[m * a.ldo + c] / l : 0.f;
      if (c == 0) a.part_lse[prow] = l > 0.f ? row_max[m] + logf(l) : kNegInf;
    }
  }
}

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(256) attend_kernel(Dims d, AttendArgs<T> a) {
  MLA_DYNAMIC_SMEM(unsigned char, smem);
  const SmemLayout L = smem_layout(a.bm, a.bn, a.ld, a.ldo, sizeof(T), a.ring);
  auto kv_buf = [&](int i) { return reinterpret_cast<T*>(smem + L.kv + i * L.kv_stride); };
  auto mk_buf = [&](int i) { return reinterpret_cast<int64_t*>(smem + L.mask + i * L.mask_stride); };
  const bool pipelined = a.ring > 1;
  T* qs = reinterpret_cast<T*>(smem + L.q);
  float* o = reinterpret_cast<float*>(smem + L.o);
  float* sc = reinterpret_cast<float*>(smem + L.s);
  T* pr = reinterpret_cast<T*>(smem + L.p);
  float* row_max = reinterpret_cast<float*>(smem + L.m);
  float* row_sum = reinterpret_cast<float*>(smem + L.l);

  const int64_t split = blockIdx.x, rb = blockIdx.y, b = blockIdx.z;
  const int64_t rows = d.S * d.H, row0 = rb * a.bm;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(a.bm), rows - row0));
  const int64_t limit = d.P + (row0 + nrows - 1) / d.H + 1;  // causal: no row of the block sees a slot >= limit
  const int64_t t_begin = split * a.split_len;
  const int64_t t_end = min(min(d.T, t_begin + a.split_len), limit);
  const bool copy_past = d.copy && rb == 0;  // this block's rows include query 0, which sees every past slot

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const Team team = block_team(a.bn);
  // the first ring - 1 tiles start streaming before the prologue (one commit group per tile, empty
  // ones included, so that "tile i landed" is always "at most ring - 1 groups pending")
  if (pipelined) {
    for (int k = 0; k + 1 < a.ring; ++k) {
      const int64_t t = t_begin + static_cast<int64_t>(k) * a.bn;
      if (t < t_end)
        issue_tile(d, a, b, team, t, static_cast<int>(min(static_cast<int64_t>(a.bn), t_end - t)), kv_buf(k),
                   mk_buf(k));
      cp_async_commit();
    }
  }

  // the block's query rows (zeros past nrows), accumulators; the tensor cores' probabilities of the
  // padding rows stay 0 (the softmax only visits the real rows)
  const T* qsrc = a.q + (b * rows + row0) * a.ldq;
  for (int idx = threadIdx.x; idx < a.bm * a.ldq; idx += blockDim.x) {
    const int m = idx / a.ldq, c = idx % a.ldq;
    qs[m * a.ld + c] = m < nrows ? qsrc[static_cast<int64_t>(m) * a.ldq + c] : from_f<T>(0.f);
  }
  for (int idx = threadIdx.x; idx < a.bm * a.ldo; idx += blockDim.x) o[idx] = 0.f;
  for (int m = threadIdx.x; m < a.bm; m += blockDim.x) {
    row_max[m] = kNegInf;
    row_sum[m] = 0.f;
  }
  if constexpr (kTensorCores)
    for (int idx = nrows * a.bn + threadIdx.x; idx < a.bm * a.bn; idx += blockDim.x) pr[idx] = from_f<T>(0.f);
  __syncthreads();

  // Per tile (4 barriers): [wait for it; copy its past rows to the present] | scores | softmax and
  // rescale of o | o += p @ latent. Pipelined, tile i + ring - 1 is issued before the wait for tile i,
  // into the buffer of tile i - 1 (free since the last iteration's final barrier).
  int slot = 0;  // buffer of this tile: i % ring
  for (int64_t t0 = t_begin; t0 < t_end; t0 += a.bn, slot = slot + 1 == a.ring ? 0 : slot + 1) {
    const int n_valid = static_cast<int>(min(static_cast<int64_t>(a.bn), t_end - t0));
    T* kv = kv_buf(slot);
    const int64_t* mk = mk_buf(slot);
    if (pipelined) {
      const int64_t ahead = t0 + static_cast<int64_t>(a.ring - 1) * a.bn;
      const int into = (slot + a.ring - 1) % a.ring;
      if (ahead < t_end)
        issue_tile(d, a, b, team, ahead, static_cast<int>(min(static_cast<int64_t>(a.bn), t_end - ahead)),
                   kv_buf(into), mk_buf(into));
      cp_async_commit();
      if (a.ring == 3) {  // this thread's copies of this tile have landed (the later ones may be in flight)
        cp_async_wait<2>();
      } else {
        cp_async_wait<1>();
      }
      if (copy_past && t0 < d.P) store_past_rows(d, a, b, team, t0, n_valid, kv);  // own chunks: no barrier needed
    } else {
      load_tile(d, a, b, team, t0, n_valid, copy_past, kv, mk_buf(0));
    }
    __syncthreads();
    tile_scores<T, kTensorCores>(a, qs, kv, sc);
    __syncthreads();

    // online softmax, one warp per real row: allowed = (t <= self and mask) or t == self (op_spec.md);
    // the same warp rescales its row of o by exp(old max - new max)
    constexpr int kPerLane = 8;  // bn <= 256 (make_plan)
    for (int m = warp; m < nrows; m += warps) {
      float* srow = sc + m * a.bn;
      const int64_t self = d.P + (row0 + m) / d.H;
      float v[kPerLane];
      float mx = kNegInf;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int n = lane + i * kWarp;
        v[i] = kNegInf;
        if (n < a.bn) {
          const int64_t t = t0 + n;
          const bool ok = n < n_valid && (t == self || (t < self && mk[n] != 0));
          v[i] = ok ? srow[n] : kNegInf;
          mx = fmaxf(mx, v[i]);
        }
      }
      mx = warp_max(mx);
      const float old = row_max[m];
      const float now = fmaxf(old, mx);
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int n = lane + i * kWarp;
        if (n < a.bn) {
          const float p = now == kNegInf ? 0.f : expf(v[i] - now);  // exp(-inf) = 0 for masked slots
          if constexpr (kTensorCores) {
            pr[m * a.bn + n] = from_f<T>(p);
          } else {
            srow[n] = p;
          }
          sum += p;
        }
      }
      sum = warp_sum(sum);
      const float f = now == kNegInf ? 1.f : expf(old - now);  // old = -inf: 0 (o is 0 then anyway)
      for (int c = lane; c < a.r16; c += kWarp) o[m * a.ldo + c] *= f;
      if (lane == 0) {
        row_sum[m] = row_sum[m] * f + sum;
        row_max[m] = now;
      }
    }
    __syncthreads();
    tile_weighted_sum<T, kTensorCores>(a, sc, pr, kv, o);
    __syncthreads();
  }

  attend_epilogue(d, a, b, split, row0, nrows, o, row_max, row_sum);
}

#include "mla_attention_cuda_warps.cuh"  // 2b. attend, warp tiles; the fragments self-check

// ---------------------------------------------------------------------------------------------
// 3. merge: one block per query row (b, s, h): log-sum-exp over the splits, then W_uv
// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void merge_kernel(Dims d, const float* part_o, const float* part_lse, int64_t splits, const T* w_uv, T* out) {
  MLA_DYNAMIC_SMEM(float, merge_smem);  // [1] total weight | [splits] weights | [r] o_lat
  float& total = merge_smem[0];
  float* weight = merge_smem + 1;
  float* o = weight + splits;
  const int64_t row = blockIdx.x;  // (b*S + s)*H + h
  const float* lse = part_lse + row * splits;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  if (warp == 0) {
    float mx = kNegInf;
    for (int64_t i = lane; i < splits; i += kWarp) mx = fmaxf(mx, lse[i]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int64_t i = lane; i < splits; i += kWarp) {
      const float w = lse[i] == kNegInf ? 0.f : expf(lse[i] - mx);
      weight[i] = w;
      sum += w;
    }
    sum = warp_sum(sum);
    if (lane == 0) total = sum;
  }
  __syncthreads();
  // o[c] = sum_i weight[i] * part_o[i, c] / total: a thread per column, the splits unrolled so that
  // several loads are in flight (an empty split's partial is 0 with weight 0: no branch needed)
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float* po = part_o + row * splits * d.r;  // [splits, r]
  for (int64_t c = threadIdx.x; c < d.r; c += blockDim.x) {
    float acc = 0.f;
#pragma unroll 8
    for (int64_t i = 0; i < splits; ++i) acc = fmaf(weight[i], po[i * d.r + c], acc);
    o[c] = acc * inv;
  }
  __syncthreads();
  const T* w = w_uv + ((row % d.H) / d.G) * d.dv * d.r;
  for (int64_t e0 = static_cast<int64_t>(warp) * kProjectOutputs; e0 < d.dv; e0 += warps * kProjectOutputs)
    project_group(o, w, e0, d.dv, d.r, 1.f, out + row * d.dv, lane);
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align256(size_t x) { return (x + 255) / 256 * 256; }

std::string cuda_error(const char* what, cudaError_t e) {
  std::ostringstream s;
  s << what << ": " << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ")";
  return s.str();
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per (kernel, device) and size: a host call
// per launch otherwise (it showed up in the fixed cost of small launches).
cudaError_t allow_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  static std::mutex mutex;
  static std::vector<std::pair<std::pair<const void*, int>, size_t>> done;  // (kernel, device) -> bytes allowed
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : done)
    if (entry.first.first == kernel && entry.first.second == device && entry.second >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess) done.push_back({{kernel, device}, bytes});
  return e;
}

template <typename T>
std::string launch_typed(const Dims& d, const std::vector<int64_t>& rope_pairs, float scale, const Plan& plan,
                         const Inputs& in, const Outputs& out, void* scratch, cudaStream_t stream) {
  auto* q = static_cast<T*>(scratch);
  float* part_o = nullptr;
  float* part_lse = nullptr;
  if (plan.splits > 1) {
    part_o = reinterpret_cast<float*>(static_cast<char*>(scratch) + plan.q_bytes);
    part_lse = part_o + d.B * d.S * d.H * plan.splits * d.r;
  }

  // 1. prepare
  RopeIndex pairs{};
  for (size_t i = 0; i < rope_pairs.size(); ++i) pairs.v[i] = static_cast<uint16_t>(rope_pairs[i]);
  PrepareArgs<T> pa{static_cast<const T*>(in.query), static_cast<const T*>(in.latent),
                    static_cast<const T*>(in.key_rope), static_cast<const T*>(in.cos), static_cast<const T*>(in.sin),
                    static_cast<const T*>(in.w_uk), static_cast<T*>(out.present_latent),
                    static_cast<T*>(out.present_key_rope), q, scale, plan.ldq};
  const int prep_threads = 256;
  const dim3 prep_grid(static_cast<unsigned>(d.B * d.S),  // y: the (group, 32 columns) items, at most 64 blocks
                       static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(64, d.n_kv * ceil_div(d.r, kWarp)))));
  const size_t prep_smem =
      sizeof(float) * (d.H * d.dn + 2 * d.n_kv * d.R + (prep_threads / kWarp) * kPrepHeads * kWarp);
  void (*prepare)(Dims, PrepareArgs<T>, RopeIndex) = prepare_kernel<T>;
  cudaError_t e = allow_smem(reinterpret_cast<const void*>(prepare), prep_smem);
  if (e != cudaSuccess) return cuda_error("MultiHeadLatentAttention prepare (shared memory)", e);
  if (plan.launch_mask & 1) {
    MLA_LAUNCH(prepare, prep_grid, prep_threads, prep_smem, stream, d, pa, pairs);
    e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_error("MultiHeadLatentAttention prepare launch", e);
  }

  // 2. attend
  AttendArgs<T> aa{static_cast<const T*>(in.past_latent), static_cast<const T*>(in.past_key_rope), q,
                   static_cast<const T*>(in.w_uv), in.attention_mask, static_cast<T*>(out.present_latent),
                   static_cast<T*>(out.present_key_rope), static_cast<T*>(out.output), part_o, part_lse,
                   plan.block_m, plan.block_n, plan.ld, plan.ldq, plan.ldo, plan.r16,
                   plan.splits, plan.split_len, false, false};
  constexpr int V = 16 / sizeof(T);
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  aa.vec = d.r % V == 0 && d.KR % V == 0 && aligned(in.past_latent) && aligned(in.past_key_rope) &&
           aligned(out.present_latent) && aligned(out.present_key_rope);
  aa.ring = aa.vec ? plan.ring : 1;
  const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(plan.row_blocks),
                  static_cast<unsigned>(d.B));
  void (*attend)(Dims, AttendArgs<T>) = attend_kernel<T, false>;
  if constexpr (std::is_same<T, __half>::value) {
    if (plan.kernel == Kernel::kWarps) {
      attend = warps_kernel(plan);
      if (attend == nullptr) return "MultiHeadLatentAttention: no warps kernel for this plan";
    } else if (plan.tensor_cores) {
      attend = attend_kernel<T, true>;
    }
  } else if (plan.kernel == Kernel::kWarps) {
    return "MultiHeadLatentAttention: the warps kernel is float16 only";
  }
  e = allow_smem(reinterpret_cast<const void*>(attend), plan.smem_bytes);
  if (e != cudaSuccess) return cuda_error("MultiHeadLatentAttention attend (shared memory)", e);
  if (plan.launch_mask & 2) {
    MLA_LAUNCH(attend, grid, plan.threads, plan.smem_bytes, stream, d, aa);
    e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_error("MultiHeadLatentAttention attend launch", e);
  }

  // 3. merge
  if (plan.splits > 1 && (plan.launch_mask & 4)) {
    const size_t merge_smem = sizeof(float) * (1 + plan.splits + d.r);
    void (*merge)(Dims, const float*, const float*, int64_t, const T*, T*) = merge_kernel<T>;
    MLA_LAUNCH(merge, static_cast<unsigned>(d.B * d.S * d.H), 128, merge_smem, stream, d, part_o, part_lse,
               plan.splits, static_cast<const T*>(in.w_uv), static_cast<T*>(out.output));
    e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_error("MultiHeadLatentAttention merge launch", e);
  }
  return "";
}

}  // namespace

Device current_device() {
  static std::mutex mutex;
  static std::vector<Device> cache;  // per device index; sm_count 0 = not queried yet
  int index = 0;
  if (cudaGetDevice(&index) != cudaSuccess) return Device{};
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() <= static_cast<size_t>(index)) cache.resize(index + 1, Device{0, 0, 0});
  Device& dev = cache[index];
  if (dev.sm_count == 0) {
    int sms = 0, smem = 0, smem_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, index) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, index) != cudaSuccess) {
      cudaGetLastError();  // not sticky: leave no error behind for onnxruntime to trip over
      return Device{};
    }
    dev = Device{sms, smem, smem_sm};
  }
  return dev;
}

const Tuning& env_tuning() {
  static const Tuning tuning = [] {
    auto get = [](const char* name, int fallback) {
      const char* v = std::getenv(name);
      return v && *v ? std::atoi(v) : fallback;
    };
    Tuning t;
    t.block_n = get("MLA_ZOO_CUDA_BLOCK_N", 0);
    t.blocks_per_sm = get("MLA_ZOO_CUDA_BLOCKS_PER_SM", 0);
    t.splits = get("MLA_ZOO_CUDA_SPLITS", 0);
    t.min_split_tiles = get("MLA_ZOO_CUDA_MIN_SPLIT_TILES", 0);
    t.threads = get("MLA_ZOO_CUDA_THREADS", 0);
    t.pipeline = get("MLA_ZOO_CUDA_PIPELINE", -1);
    t.ring = get("MLA_ZOO_CUDA_RING", 0);
    const char* kernel = std::getenv("MLA_ZOO_CUDA_KERNEL");
    const std::string k = kernel ? kernel : "";
    t.kernel = k == "warps" ? Kernel::kWarps : k == "blocks" ? Kernel::kBlocks : Kernel::kAuto;
    t.warps = get("MLA_ZOO_CUDA_WARPS", 0);
    t.warp_n = get("MLA_ZOO_CUDA_WARP_N", 0);
    t.max_registers = get("MLA_ZOO_CUDA_MAX_REGISTERS", 0);
    return t;
  }();
  return tuning;
}

// The attend kernel for float16 decode (rows per sequence <= 16) when the tuning leaves it open: true =
// the warps kernel where it can run. On since its H100 run (bench/RESULTS.md, 2026-12-07 #2): the
// hardware's fragments match the documented layouts, every check and sweep configuration passes, and
// it is 1.17-1.20x faster than the blocks kernel at 16K-32K x 16 (equal at batch 1).
// MLA_ZOO_CUDA_KERNEL=blocks selects the other one.
constexpr bool kWarpsByDefault = true;

namespace {

// Attend blocks of this plan that fit in an SM's shared memory (1 KB of it reserved per block).
int64_t smem_resident(const Plan& plan, const Device& device) {
  return std::max<int64_t>(1, static_cast<int64_t>(device.smem_per_sm) / static_cast<int64_t>(plan.smem_bytes + 1024));
}

// Split-K (both kernels): enough blocks to fill the GPU (blocks_per_sm per SM over the grid), no split
// shorter than min_len slots; or a fixed count. Built-in blocks_per_sm: 4, or fewer where fewer blocks
// are resident per SM (`resident`), so that the grid is about one full wave.
// Sets plan.splits and plan.split_len (a multiple of `granule` slots).
void plan_splits(Plan& plan, const Dims& d, const Device& device, const Tuning& tune, int64_t resident,
                 int64_t min_len, int64_t granule) {
  const int64_t blocks = d.B * plan.row_blocks;
  const int64_t per_sm = tune.blocks_per_sm > 0 ? tune.blocks_per_sm : std::min<int64_t>(4, resident);
  const int64_t want = tune.splits > 0 ? tune.splits  // rounded down: at most one wave of per_sm blocks per SM
                                       : std::max<int64_t>(1, per_sm * std::max(1, device.sm_count) / blocks);
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(1024, d.T / min_len));
  const int64_t splits = std::min(want, most);
  plan.split_len = ceil_div(ceil_div(std::max<int64_t>(d.T, 1), splits), granule) * granule;
  plan.splits = std::max<int64_t>(1, ceil_div(d.T, plan.split_len));
}

// The warps kernel's plan (float16 tensor cores, ldq <= 128): 16-row blocks, warps x warp tiles, a
// cp.async ring per warp (2 tiles built-in; 2..4), the tuned sizes where the kernel takes them.
// false (plan unusable) if not even synchronous loads fit in shared memory.
bool plan_warps(Plan& plan, const Dims& d, const Device& device, const Tuning& tune, bool pipelined) {
  plan.kernel = Kernel::kWarps;
  plan.block_m = 16;
  plan.warps = tune.warps == 2 || tune.warps == 4 || tune.warps == 8 ? tune.warps : 4;
  plan.threads = plan.warps * 32;
  plan.block_n = tune.warp_n == 16 || tune.warp_n == 64 ? tune.warp_n : 32;
  // the register-capped build where asked for and built (r16 <= 96)
  plan.max_registers = tune.max_registers == kCappedRegisters && plan.r16 <= 96 ? kCappedRegisters : 0;
  plan.ring = pipelined ? (tune.ring >= 2 && tune.ring <= 4 ? tune.ring : 2) : 1;
  const int smem_cap = std::max(48 * 1024, device.max_smem_per_block);
  const bool q_shared = plan.max_registers == kCappedRegisters;  // the capped build's query rows, after the rings
  for (;; plan.ring = plan.ring > 2 ? plan.ring - 1 : 1) {  // the deepest ring up to the tuned one that fits
    plan.smem_bytes = warp_smem_layout(plan.warps, plan.block_n, plan.ld, plan.ldo, plan.ring, q_shared).total;
    if (plan.smem_bytes <= static_cast<size_t>(smem_cap)) break;
    if (plan.ring == 1) return false;
  }
  plan.pipelined = plan.ring > 1;
  plan.row_blocks = ceil_div(d.S * d.H, 16);
  // its registers (168 per thread at SmolLM2-MLA's dims, 128 in the capped build) may bound the resident
  // blocks before its shared memory does: the occupancy calculator, for the build the plan runs
  // (warps_kernel(plan)), where there is a GPU
  const int occupancy = attend_occupancy(plan, Dtype::kFloat16);
  const int64_t resident = occupancy > 0 ? occupancy : smem_resident(plan, device);
  const int64_t min_tiles = tune.min_split_tiles > 0 ? tune.min_split_tiles : 2;  // per warp
  plan_splits(plan, d, device, tune, resident, min_tiles * plan.warps * plan.block_n, plan.block_n);
  plan.part_bytes = plan.splits > 1 ? align256(static_cast<size_t>(d.B * d.S * d.H * plan.splits) * (d.r + 1) * 4) : 0;
  return true;
}

}  // namespace

Plan make_plan(const MlaDims& md, Dtype dtype, const Device& device, Math math, bool pipeline, const Tuning* tuning) {
  const Dims d = to_dims(md);
  const Tuning& tune = tuning ? *tuning : env_tuning();
  Plan plan;
  if (d.n_kv * d.R > kMaxRopeIndices) {
    std::ostringstream s;
    s << "the CUDA kernel supports n_kv * R <= " << kMaxRopeIndices << " RoPE pair indices, got " << d.n_kv * d.R;
    throw ShapeError{s.str()};
  }
  const int elem = dtype == Dtype::kFloat32 ? 4 : 2;
  plan.tensor_cores = dtype == Dtype::kFloat16 && math != Math::kCudaCores;
  if (dtype == Dtype::kFloat32 && math == Math::kTensorCores)
    throw ShapeError{"the CUDA kernel's tensor-core path is float16 only"};
  plan.ldq = static_cast<int>(ceil_div(d.r + d.KR, 16) * 16);
  plan.ld = plan.ldq + 8;
  plan.r16 = static_cast<int>(ceil_div(d.r, 16) * 16);
  plan.ldo = plan.r16 + 4;
  const int64_t rows = d.S * d.H;
  const bool pipelined = pipeline && tune.pipeline != 0 && d.r % (16 / elem) == 0 && d.KR % (16 / elem) == 0;
  // the warps kernel: float16 tensor cores, r + KR <= 128 (its fragments in registers), asked for or
  // the default for decode (kWarpsByDefault); else, or where its tiles do not fit, the blocks kernel
  const bool warps_can_run = plan.tensor_cores && plan.ldq <= 128;
  const bool want_warps =
      tune.kernel == Kernel::kWarps || (tune.kernel == Kernel::kAuto && kWarpsByDefault && rows <= 16);
  plan.q_bytes = align256(static_cast<size_t>(rows * d.B) * plan.ldq * elem);
  if (want_warps && warps_can_run) {
    Plan w = plan;
    if (plan_warps(w, d, device, tune, pipelined)) return w;
  }
  const int ring = pipelined ? (tune.ring == 3 ? 3 : 2) : 1;

  // the largest tiles that fit: rows per block by the rows of a sequence, then slots per tile (the
  // tuned block_n first where it is one of the sizes the kernel takes: 32..256, a multiple of 32).
  // Built-in 128 slots and 256 threads: the H200 sweep (bench/results/ort_cuda_sweep_h200.jsonl) put them
  // within 13% of the best configuration on every shape, the old 64 slots x 128 threads within 20%.
  std::vector<int> bns{128, 64, 32};
  if (tune.block_n >= 32 && tune.block_n <= 256 && tune.block_n % 32 == 0) bns.insert(bns.begin(), tune.block_n);
  const int smem_cap = std::max(48 * 1024, device.max_smem_per_block);
  bool fits = false;
  for (int try_ring = ring; try_ring >= 1; --try_ring) {  // the deepest ring up to `ring` that fits
    for (int bm : {64, 32, 16}) {
      if (bm > 16 && rows <= bm / 2) continue;  // decode: as few padded rows as possible
      for (int bn : bns) {
        const SmemLayout L = smem_layout(bm, bn, plan.ld, plan.ldo, elem, try_ring);
        if (!fits && L.total <= static_cast<size_t>(smem_cap)) {
          plan.block_m = bm, plan.block_n = bn, plan.smem_bytes = L.total, plan.ring = try_ring;
          plan.pipelined = try_ring > 1;
          fits = true;
        }
      }
    }
    if (fits) break;
  }
  if (!fits) {
    std::ostringstream s;
    s << "the CUDA kernel's tiles do not fit in shared memory at r + KR = " << d.r + d.KR;
    throw ShapeError{s.str()};
  }
  plan.threads = 256;
  if (tune.threads == 128 || tune.threads == 256) plan.threads = tune.threads;
  plan.row_blocks = ceil_div(rows, plan.block_m);
  const int64_t min_tiles = tune.min_split_tiles > 0 ? tune.min_split_tiles : 2;
  plan_splits(plan, d, device, tune, smem_resident(plan, device), min_tiles * plan.block_n, plan.block_n);
  plan.part_bytes = plan.splits > 1 ? align256(static_cast<size_t>(d.B * rows * plan.splits) * (d.r + 1) * 4) : 0;
  return plan;
}

int attend_occupancy(const Plan& plan, Dtype dtype) {
#ifdef MLA_ZOO_CUDA_EMULATION
  (void)plan, (void)dtype;
  return -1;
#else
  const void* kernel = dtype == Dtype::kFloat32      ? reinterpret_cast<const void*>(attend_kernel<float, false>)
                       : plan.kernel == Kernel::kWarps ? reinterpret_cast<const void*>(warps_kernel(plan))
                       : plan.tensor_cores            ? reinterpret_cast<const void*>(attend_kernel<__half, true>)
                                                      : reinterpret_cast<const void*>(attend_kernel<__half, false>);
  int device = 0;
  if (kernel == nullptr || cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  // cached per (kernel, device, threads, shared memory): make_plan asks on every call of the op
  struct Known {
    const void* kernel;
    int device, threads;
    size_t smem;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Known> known;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Known& k : known)
    if (k.kernel == kernel && k.device == device && k.threads == plan.threads && k.smem == plan.smem_bytes)
      return k.blocks;
  int blocks = -1;
  if (allow_smem(kernel, plan.smem_bytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, plan.threads, plan.smem_bytes) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  known.push_back({kernel, device, plan.threads, plan.smem_bytes, blocks});
  return blocks;
#endif
}

std::string check_tensor_core_fragments() {
  // inputs: m16 = 0, 1, ..., 255 (distinct, exact in half); a, b, c small multiples of 1/8 (exact sums)
  std::vector<__half> m16(256), a(256), b(128);
  std::vector<float> c(128), ha(256), hb(128);
  for (int i = 0; i < 256; ++i) m16[i] = __float2half(static_cast<float>(i));
  for (int i = 0; i < 256; ++i) ha[i] = static_cast<float>((i * 37) % 17 - 8) / 8.f, a[i] = __float2half(ha[i]);
  for (int i = 0; i < 128; ++i) hb[i] = static_cast<float>((i * 11) % 13 - 6) / 8.f, b[i] = __float2half(hb[i]);
  for (int i = 0; i < 128; ++i) c[i] = static_cast<float>(i % 7 - 3) / 4.f;
  const size_t bytes[] = {512, 512, 256, 512, 384 * 4};
  void* dev[5] = {};
  std::string error;
  for (int i = 0; i < 5 && error.empty(); ++i)
    if (cudaMalloc(&dev[i], bytes[i]) != cudaSuccess) error = "cudaMalloc failed";
  std::vector<uint32_t> out(384);
  if (error.empty()) {
    cudaMemcpy(dev[0], m16.data(), 512, cudaMemcpyHostToDevice);
    cudaMemcpy(dev[1], a.data(), 512, cudaMemcpyHostToDevice);
    cudaMemcpy(dev[2], b.data(), 256, cudaMemcpyHostToDevice);
    cudaMemcpy(dev[3], c.data(), 512, cudaMemcpyHostToDevice);
    void (*kernel)(const __half*, const __half*, const __half*, const float*, uint32_t*) = fragments_kernel;
    MLA_LAUNCH(kernel, 1, kWarp, 16 * 24 * sizeof(__half), static_cast<cudaStream_t>(nullptr),
               static_cast<const __half*>(dev[0]), static_cast<const __half*>(dev[1]),
               static_cast<const __half*>(dev[2]), static_cast<const float*>(dev[3]), static_cast<uint32_t*>(dev[4]));
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaMemcpy(out.data(), dev[4], 384 * 4, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) error = cuda_error("fragments kernel", e);
  }
  for (void* p : dev)
    if (p) cudaFree(p);
  if (!error.empty()) return error;
  std::ostringstream diff;
  auto halves = [](uint32_t u, int i) {  // the i-th half of a .f16x2 register (0: the low 16 bits), rounded
    const uint16_t bits = static_cast<uint16_t>(i ? u >> 16 : u & 0xffff);
    __half h;
    std::memcpy(static_cast<void*>(&h), &bits, 2);
    return static_cast<int>(std::lround(__half2float(h)));
  };
  // the PTX ISA's ldmatrix: lane l's register i = row l/4, elements 2(l%4), +1 of matrix i (.trans: of its
  // transpose); matrix i's rows were given by lanes 8i..8i+7: plain (rows +8 (i/2), columns +8 (i%2)),
  // .trans (rows +8 (i%2), columns +8 (i/2)) of m16, whose element [row][col] is 16 row + col
  for (int trans = 0; trans < 2 && diff.str().empty(); ++trans)
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        const int r0 = 8 * (trans ? i % 2 : i / 2), c0 = 8 * (trans ? i / 2 : i % 2);
        int want[2];
        for (int h = 0; h < 2; ++h)
          want[h] = trans ? 16 * (r0 + 2 * (l % 4) + h) + c0 + l / 4 : 16 * (r0 + l / 4) + c0 + 2 * (l % 4) + h;
        const uint32_t got = out[trans * 128 + l * 4 + i];
        if (halves(got, 0) != want[0] || halves(got, 1) != want[1]) {
          diff << (trans ? "ldmatrix.x4.trans" : "ldmatrix.x4") << " lane " << l << " register " << i << ": got ("
               << halves(got, 0) << ", " << halves(got, 1) << "), want (" << want[0] << ", " << want[1] << ")";
          break;
        }
      }
  // mma: d[e] of lane l = D[g + 8 (e / 2)][2t + e % 2], D = a . b + c (exact here)
  for (int l = 0; l < 32 && diff.str().empty(); ++l)
    for (int e = 0; e < 4; ++e) {
      const int i = l / 4 + 8 * (e / 2), j = 2 * (l % 4) + e % 2;
      double want = c[i * 8 + j];
      for (int k = 0; k < 16; ++k) want += static_cast<double>(ha[i * 16 + k]) * hb[k * 8 + j];
      float got;
      std::memcpy(&got, &out[256 + l * 4 + e], 4);
      if (std::fabs(got - want) > 1e-6) {
        diff << "mma.m16n8k16 lane " << l << " d[" << e << "] = D[" << i << "][" << j << "]: got " << got << ", want "
             << want;
        break;
      }
    }
  return diff.str();
}

std::string launch(const MlaDims& md, const std::vector<int64_t>& rope_pairs, float scale, Dtype dtype,
                   const Plan& plan, const Inputs& in, const Outputs& out, void* scratch, void* stream) {
  const Dims d = to_dims(md);
  if (d.B == 0 || d.S == 0) return "";
  if (static_cast<int64_t>(rope_pairs.size()) != d.n_kv * d.R || d.n_kv * d.R > kMaxRopeIndices)
    return "MultiHeadLatentAttention: rope_pairs does not match the dims";
  if (d.B * d.S > 0x7fffffffLL || plan.splits > 0x7fffffffLL || plan.row_blocks > 65535 || d.B > 65535)
    return "MultiHeadLatentAttention: the CUDA grid is too large for these dims";
  auto s = static_cast<cudaStream_t>(stream);
  Inputs inputs = in;
  if (!d.copy && in.past_latent != out.present_latent) {  // version 2 with a present of its own: the whole buffer
    // first (on the stream, no host wait), then the kernels attend in the present as in a shared buffer
    const size_t elem = dtype == Dtype::kFloat32 ? 4 : 2;
    cudaError_t e = cudaMemcpyAsync(out.present_latent, in.past_latent, elem * d.B * d.PR * d.r,
                                    cudaMemcpyDeviceToDevice, s);
    if (e == cudaSuccess)
      e = cudaMemcpyAsync(out.present_key_rope, in.past_key_rope, elem * d.B * d.PR * d.KR, cudaMemcpyDeviceToDevice,
                          s);
    if (e != cudaSuccess) return cuda_error("MultiHeadLatentAttention cache copy", e);
    inputs.past_latent = out.present_latent;
    inputs.past_key_rope = out.present_key_rope;
  }
  if (dtype == Dtype::kFloat32) return launch_typed<float>(d, rope_pairs, scale, plan, inputs, out, scratch, s);
  return launch_typed<__half>(d, rope_pairs, scale, plan, inputs, out, scratch, s);
}

}  // namespace cuda
}  // namespace mla_zoo
