// A CPU emulation of the small part of CUDA that mla_attention_cuda.cu and cuda_harness.cu use, so
// that the SAME kernel source runs on a machine without a GPU (CI): compiled as C++ with
// -DMLA_ZOO_CUDA_EMULATION, a launch runs its blocks one after the other, and the threads of a block
// as cooperative fibers (ucontext) on the calling thread. Faithful where the kernels depend on it:
//   * __syncthreads and warp shuffles are real barriers (a thread waits until every thread of its
//     block / warp has arrived), so a missing barrier or a divergent one shows up as a wrong result
//     or a hang, not as luck;
//   * dynamic shared memory starts as 0xFF bytes (NaN in float and half), so a read of an unwritten
//     element poisons the result;
//   * WMMA (nvcuda::wmma, m16n16k16, half inputs, float accumulators) does the warp-wide operation
//     once, in lane 0 (the fragments are opaque, only these functions touch them), and checks the
//     alignment rules of the real API (32-byte pointers, ldm a multiple of 16 bytes) and that shared
//     memory operands lie inside the block's allocation;
//   * the PTX warp collectives (ldmatrix x4 / x4.trans, mma m16n8k16 f16 -> f32) work per lane on the
//     documented fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", "ldmatrix"): each lane
//     deposits its registers or row address, a warp barrier, each lane computes its own outputs, a warp
//     barrier; all 32 lanes must take part in the same collective (checked), ldmatrix rows must be
//     16-byte aligned and inside the block's shared memory (checked);
//   * cp.async copies land when their thread waits for their group (cp.async.wait_group), not
//     before: a read of a tile before the wait for it sees stale bytes (0xFF at first).
// Not emulated: timing, memory coalescing, bank conflicts, asynchronous streams (a launch is done
// when it returns), several devices. Speed: slow (fibers switch at every barrier); small cases only.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------------------------
// language
// ---------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint4 __ldcs(const uint4* p) { return *p; }
inline uint4 __ldcg(const uint4* p) { return *p; }
inline void __stcs(uint4* p, uint4 v) { *p = v; }

using __half = _Float16;  // IEEE binary16, round-to-nearest-even conversions (GCC >= 12 on x86-64)
inline __half __float2half_rn(float x) { return static_cast<__half>(x); }
inline __half __float2half(float x) { return static_cast<__half>(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }

using std::max;
using std::min;

namespace mla_zoo {
namespace emulation {

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what.c_str());
  std::abort();
}

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};

// One cp.async copy of a thread, in flight until its thread waits for its group.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];  // the source, read at issue
  size_t n;
};

constexpr unsigned kLaneWords = 8;  // per lane deposit of a warp collective (32-bit words)

// One block in flight on this thread.
struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  unsigned threads = 0, current = 0;
  unsigned block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<unsigned> warp_arrived;
  std::vector<uint64_t> warp_generation;
  std::vector<uint32_t> lane_words;        // warp collectives (shuffles, ldmatrix, mma): kLaneWords per thread
  std::vector<const char*> lane_op;        // the collective each thread is in (all 32 lanes must agree)
  std::vector<std::vector<AsyncCopy>> async_open;               // per thread: cp.async since the last commit
  std::vector<std::deque<std::vector<AsyncCopy>>> async_groups;  // per thread: committed groups, oldest first
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;  // 128-byte aligned, inside smem_storage
  size_t smem_bytes = 0;
  std::function<void()> body;
};

inline thread_local Block* block = nullptr;

inline Block& current_block() {
  if (block == nullptr) fail("a device function ran outside a kernel launch");
  return *block;
}

}  // namespace emulation
}  // namespace mla_zoo

// the built-in variables of the running emulated thread (set by the scheduler before each resume)
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace mla_zoo {
namespace emulation {

inline void yield() {
  Block& b = current_block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline void* dynamic_smem() { return current_block().smem; }

inline void warp_barrier() {
  Block& b = current_block();
  const unsigned w = threadIdx.x / 32;
  const uint64_t generation = b.warp_generation[w];
  if (++b.warp_arrived[w] == 32) {
    b.warp_arrived[w] = 0;
    ++b.warp_generation[w];
    return;
  }
  while (b.warp_generation[w] == generation) {
    for (unsigned t = w * 32; t < w * 32 + 32; ++t)
      if (b.fibers[t].done) fail("a warp collective or __syncwarp without all 32 lanes (one has exited)");
    yield();
  }
}

inline void run_fiber(int index) {
  Block& b = current_block();
  b.body();
  b.fibers[index].done = true;
}

// (not inlined: getcontext "returns twice" for the compiler, which then distrusts the caller's registers)
[[gnu::noinline]] inline void start_fiber(Block& b, unsigned t) {
  Fiber& f = b.fibers[t];
  f.done = false;
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.data();
  f.context.uc_stack.ss_size = f.stack.size();
  f.context.uc_link = &b.scheduler;
  makecontext(&f.context, reinterpret_cast<void (*)()>(run_fiber), 1, static_cast<int>(t));
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads, size_t smem_bytes, Args&&... args) {
  if (threads.y != 1 || threads.z != 1 || threads.x == 0 || threads.x % 32 != 0 || threads.x > 1024)
    fail("blocks must be 1-D with a multiple of 32 threads");
  Block b;
  Block* outer = block;
  block = &b;
  b.threads = threads.x;
  b.fibers.resize(threads.x);
  for (auto& f : b.fibers) f.stack.resize(kStackBytes);
  b.warp_arrived.assign(threads.x / 32, 0);
  b.warp_generation.assign(threads.x / 32, 0);
  b.lane_words.assign(threads.x * kLaneWords, 0);
  b.lane_op.assign(threads.x, nullptr);
  b.body = [&] { kernel(args...); };
  gridDim = grid;
  blockDim = threads;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.smem_storage.assign(smem_bytes + 128, 0xFF);  // NaN everywhere until written
        b.smem = b.smem_storage.data() + (128 - reinterpret_cast<uintptr_t>(b.smem_storage.data()) % 128) % 128;
        b.smem_bytes = smem_bytes;
        b.block_arrived = 0;
        b.async_open.assign(threads.x, {});
        b.async_groups.assign(threads.x, {});
        for (unsigned t = 0; t < threads.x; ++t) start_fiber(b, t);
        for (bool running = true; running;) {
          running = false;
          for (unsigned t = 0; t < threads.x; ++t) {
            if (b.fibers[t].done) continue;
            running = true;
            b.current = t;
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(x, y, z);
            swapcontext(&b.scheduler, &b.fibers[t].context);
          }
        }
        if (b.block_arrived != 0) fail("a block ended with threads waiting at __syncthreads");
      }
  block = outer;
}

// WMMA operands in shared memory must lie inside the block's allocation.
inline void check_smem_range(const void* p, size_t bytes, const char* what) {
  if (block == nullptr || block->smem_bytes == 0) return;
  const unsigned char* base = block->smem;
  auto* q = static_cast<const unsigned char*>(p);
  if (q >= base && q < base + block->smem_bytes && q + bytes > base + block->smem_bytes)
    fail(std::string(what) + ": operand runs past the end of shared memory");
}

// Operands of .shared instructions (ldmatrix, cp.async's destination): wholly inside the block's
// shared memory, `align`-byte aligned.
inline void check_in_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const Block& b = current_block();
  auto* q = static_cast<const unsigned char*>(p);
  if (q < b.smem || q + bytes > b.smem + b.smem_bytes) fail(std::string(what) + ": address outside shared memory");
  if (reinterpret_cast<uintptr_t>(p) % align != 0) fail(std::string(what) + ": address not " + std::to_string(align) +
                                                        "-byte aligned");
}

// ---- cp.async: a thread's copies land when it waits for their group

inline void cp_async(void* dst, const void* src, size_t n) {
  check_in_smem(dst, n, n, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(src) % n != 0) fail("cp.async: source not aligned to the copy size");
  AsyncCopy c{dst, {}, n};
  std::memcpy(c.bytes, src, n);
  current_block().async_open[threadIdx.x].push_back(c);
}

inline void cp_async_commit() {
  Block& b = current_block();
  b.async_groups[threadIdx.x].push_back(std::move(b.async_open[threadIdx.x]));
  b.async_open[threadIdx.x].clear();
}

// cp.async.wait_group pending: every committed group of this thread but the newest `pending` has landed.
inline void cp_async_wait(size_t pending) {
  auto& groups = current_block().async_groups[threadIdx.x];
  while (groups.size() > pending) {
    for (const AsyncCopy& c : groups.front()) std::memcpy(c.dst, c.bytes, c.n);
    groups.pop_front();
  }
}

// ---- warp collectives: deposit, barrier, compute from the lanes' deposits, barrier

// This lane's words enter the exchange and the warp meets; then every lane of the warp must be in
// the same collective `op` (a string literal). Returns the warp's 32 deposits, lane-major.
inline const uint32_t* warp_exchange(const char* op, const uint32_t* words, unsigned n) {
  Block& b = current_block();
  const unsigned base = threadIdx.x - threadIdx.x % 32;
  if (n) std::memcpy(&b.lane_words[threadIdx.x * kLaneWords], words, n * 4);
  b.lane_op[threadIdx.x] = op;
  warp_barrier();
  for (unsigned t = base; t < base + 32; ++t)
    if (b.lane_op[t] != op && (b.lane_op[t] == nullptr || std::strcmp(b.lane_op[t], op) != 0))
      fail(std::string(op) + ": lanes of one warp are in different collectives (" +
           (b.lane_op[t] ? b.lane_op[t] : "none") + ")");
  return &b.lane_words[base * kLaneWords];
}

inline uint32_t pack_halves(_Float16 lo, _Float16 hi) {  // .f16x2: the first element in the low 16 bits
  const _Float16 h[2] = {lo, hi};
  uint32_t u;
  std::memcpy(&u, h, 4);
  return u;
}
inline _Float16 half_of(uint32_t u, int i) {
  _Float16 h[2];
  std::memcpy(h, &u, 4);
  return h[i];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses (8 b16
// each) of matrix i; lane l receives in r[i] row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i, or
// with .trans those of its transpose: elements [2(l%4)][l/4] and [2(l%4)+1][l/4].
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  const char* op = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
  check_in_smem(row, 16, 16, op);
  uint32_t words[2];
  std::memcpy(words, &row, sizeof(row));
  const uint32_t* lanes = warp_exchange(op, words, 2);
  auto row_of = [&](unsigned lane) {
    const _Float16* p;
    std::memcpy(&p, &lanes[lane * kLaneWords], sizeof(p));
    return p;
  };
  const unsigned l = threadIdx.x % 32;
  for (unsigned i = 0; i < 4; ++i) {
    if (trans) {
      r[i] = pack_halves(row_of(8 * i + 2 * (l % 4))[l / 4], row_of(8 * i + 2 * (l % 4) + 1)[l / 4]);
    } else {
      const _Float16* p = row_of(8 * i + l / 4);
      r[i] = pack_halves(p[2 * (l % 4)], p[2 * (l % 4) + 1]);
    }
  }
  warp_barrier();
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, d = a . b + d, with g = lane / 4, t = lane % 4:
//   A [16 x 16]: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, +9], a[3] = A[g+8][2t+8, +9]
//   B [16 x 8]:  b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C, D [16 x 8] f32: d[0], d[1] = D[g][2t, 2t+1], d[2], d[3] = D[g+8][2t, 2t+1]
// (products of halves are exact in float; the sum runs in float, k in order).
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint32_t words[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const uint32_t* lanes = warp_exchange("mma.m16n8k16", words, 6);
  auto A = [&](unsigned i, unsigned k) {
    return static_cast<float>(half_of(lanes[((i % 8) * 4 + (k % 8) / 2) * kLaneWords + i / 8 + 2 * (k / 8)], k % 2));
  };
  auto B = [&](unsigned k, unsigned j) {
    return static_cast<float>(half_of(lanes[(j * 4 + (k % 8) / 2) * kLaneWords + 4 + k / 8], k % 2));
  };
  const unsigned g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  float out[4];
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned i = g + 8 * (e / 2), j = 2 * t + e % 2;
    float acc = 0.f;
    for (unsigned k = 0; k < 16; ++k) acc += A(i, k) * B(k, j);
    out[e] = d[e] + acc;
  }
  warp_barrier();
  std::memcpy(d, out, sizeof(out));
}

}  // namespace emulation
}  // namespace mla_zoo

inline void __syncthreads() {
  using namespace mla_zoo::emulation;
  Block& b = current_block();
  const uint64_t generation = b.block_generation;
  if (++b.block_arrived == b.threads) {
    b.block_arrived = 0;
    ++b.block_generation;
    return;
  }
  while (b.block_generation == generation) yield();
}

inline void __syncwarp(unsigned = 0xffffffffu) {
  mla_zoo::emulation::warp_exchange("__syncwarp", nullptr, 0);
  mla_zoo::emulation::warp_barrier();
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  using namespace mla_zoo::emulation;
  uint32_t word;
  std::memcpy(&word, &value, 4);
  const uint32_t* lanes = warp_exchange("shfl.xor", &word, 1);
  T out;
  std::memcpy(&out, &lanes[((threadIdx.x % 32) ^ static_cast<unsigned>(lane_mask)) * kLaneWords], 4);
  warp_barrier();
  return out;
}

// ---------------------------------------------------------------------------------------------
// nvcuda::wmma, m16n16k16 with half inputs and float accumulators
// ---------------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "m16n16k16 only");
  T x[16 * 16];  // row-major [row][col] of the operand (A: m x k, B: k x n, C: m x n); lane 0 only
};

namespace detail {
inline bool lane0() { return threadIdx.x % 32 == 0; }
inline void check(const void* p, unsigned ldm, size_t elem, size_t rows, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) mla_zoo::emulation::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * elem) % 16 != 0) mla_zoo::emulation::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
  mla_zoo::emulation::check_smem_range(p, ((rows - 1) * ldm + 16) * elem, what);
}
}  // namespace detail

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  if (!detail::lane0()) return;
  for (auto& x : f.x) x = v;
}

inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __half, row_major>& f, const __half* p, unsigned ldm) {
  if (!detail::lane0()) return;
  detail::check(p, ldm, 2, 16, "load_matrix_sync(matrix_a)");
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.x[i * 16 + k] = p[i * ldm + k];
}

inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __half, col_major>& f, const __half* p, unsigned ldm) {
  if (!detail::lane0()) return;
  detail::check(p, ldm, 2, 16, "load_matrix_sync(matrix_b, col_major)");
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = p[n * ldm + k];
}

inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __half, row_major>& f, const __half* p, unsigned ldm) {
  if (!detail::lane0()) return;
  detail::check(p, ldm, 2, 16, "load_matrix_sync(matrix_b, row_major)");
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = p[k * ldm + n];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  if (!detail::lane0()) return;
  if (l != mem_row_major) mla_zoo::emulation::fail("only row-major accumulators are emulated");
  detail::check(p, ldm, 4, 16, "load_matrix_sync(accumulator)");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = p[i * ldm + j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  if (!detail::lane0()) return;
  if (l != mem_row_major) mla_zoo::emulation::fail("only row-major accumulators are emulated");
  detail::check(p, ldm, 4, 16, "store_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ldm + j] = f.x[i * 16 + j];
}

template <typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __half, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, __half, LayoutB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!detail::lane0()) return;
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc += static_cast<float>(a.x[i * 16 + k]) * static_cast<float>(b.x[k * 16 + j]);
      out[i * 16 + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------------------------------------------
// runtime API (one device; memory is host memory; a launch has finished when it returns)
// ---------------------------------------------------------------------------------------------

enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct CUevent_st;
using cudaEvent_t = CUevent_st*;

struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
};

inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError"; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 8  // a few "SMs": some split-K even on short caches
      : a == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? 228 * 1024
                                                        : 227 * 1024;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::snprintf(p->name, sizeof(p->name), "CPU emulation");
  p->major = 0, p->minor = 0, p->multiProcessorCount = 8;
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::aligned_alloc(256, (n + 255) / 256 * 256);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k, cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, n, k);
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                                     size_t height, cudaMemcpyKind, cudaStream_t = nullptr) {
  for (size_t i = 0; i < height; ++i)
    std::memcpy(static_cast<char*>(dst) + i * dpitch, static_cast<const char*>(src) + i * spitch, width);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

struct CUevent_st {
  std::chrono::steady_clock::time_point at;
};
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  e->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}
