// Standalone check of the CUDA kernel of mla_zoo.MultiHeadLatentAttention, without onnxruntime:
// random inputs -> the kernels of mla_attention_cuda.cu on the GPU -> compared with a float64 CPU
// reference written from export/op_spec.md (not from either kernel). For when onnxruntime-gpu cannot
// run on the GPU machine, and to test both float16 paths (tensor cores and CUDA cores).
//
//   mla_zoo_cuda_harness                 # the tensor-core fragment check, then every case, float32 and
//                                        # float16 (both paths, both attend kernels, cp.async double, triple
//                                        # and quadruple buffering, several tile sizes), then op version 2's
//                                        # buffers (in place and copied) with both kernels; exit 1 on failure
//   mla_zoo_cuda_harness --case NAME     # one case
//   mla_zoo_cuda_harness --quick         # the small cases only (the CPU emulation in CI)
//   mla_zoo_cuda_harness --fragments     # the fragment check only: ldmatrix / mma against the PTX ISA's
//                                        # layouts and a plain product (a GPU's hardware, or the emulation)
//   mla_zoo_cuda_harness --bench [--shared] [--contexts 2048,8192,32768 --batches 1,16 --iters 50]
//                                        # decode latency at SmolLM2-MLA's dims (float16) + copy bandwidth;
//                                        # --shared: op version 2 in place (the past read, the new row written)
//   mla_zoo_cuda_harness --sweep [--contexts 16384,32768 --batches 1,16 --iters 50]
//                                        # every launch configuration (what MLA_ZOO_CUDA_* set): checked on small
//                                        # cases, then timed per shape (+ 2048 x 1 by default); see sweep()
//   mla_zoo_cuda_harness --sweep-checks  # the sweep's checks only (the CPU emulation in CI)
// Each result is one JSON line on stdout.

#ifdef MLA_ZOO_CUDA_EMULATION
#include "cuda_emulation.h"  // on the CPU, without a GPU: see cuda_emulation.h
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "mla_attention_cuda.h"

using mla_zoo::MlaDims;
using mla_zoo::cuda::Dtype;
using mla_zoo::cuda::Kernel;
using mla_zoo::cuda::Math;

namespace {

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                           \
    cudaError_t e_ = (expr);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)

struct Case {
  std::string name;
  int64_t B, S, P, H, n_kv, hd, R, r;
  std::vector<int64_t> pad;  // left padding per row
  bool quick = true;         // in --quick (the CPU emulation in CI runs these only)
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      // the CPU tests' cases (tests/test_onnx_kernel.py)
      {"prefill", 2, 9, 0, 6, 2, 16, 2, 12, {3, 0}},              // r, KR not multiples of 8: scalar loads
      {"decode-long-past", 3, 1, 700, 9, 3, 64, 4, 96, {0, 17, 300}},  // SmolLM2's dims, split cache
      {"chunked-prefill", 2, 4, 11, 4, 4, 32, 3, 40, {5, 0}},     // MHA (G = 1)
      {"decode-batch1-mqa", 1, 1, 1000, 8, 1, 32, 1, 24, {}},
      // the GPU's own: several row blocks (causal within a block), long contexts, large dims
      {"prefill-row-blocks", 2, 40, 0, 4, 2, 32, 2, 40, {7, 0}},     // 160 rows: 3 blocks of 64, causal inside
      {"decode-wide", 1, 1, 300, 16, 8, 128, 8, 512, {20}},           // Llama-3-8B's r + KR = 640
      {"decode-64-heads", 1, 1, 2000, 64, 8, 128, 4, 256, {}},
      {"decode-past0", 3, 1, 0, 9, 3, 64, 4, 96, {}},               // first step of a one-token prompt
      {"decode-r112", 2, 1, 150, 4, 2, 32, 4, 112, {0, 30}},         // warps kernel: r16 = 112 (8 column pairs)
      {"decode-12-heads-per-group", 2, 1, 90, 12, 1, 32, 2, 40, {0, 7}},  // G = 12 > kPrepHeads: prepare's head chunks
      {"prefill-long", 2, 300, 0, 9, 3, 64, 4, 96, {50, 0}, false},
      {"chunked-prefill-long", 2, 37, 500, 9, 3, 64, 4, 96, {10, 0}, false},
      {"decode-smollm2-16x4k", 16, 1, 4096, 9, 3, 64, 4, 96, {0, 1, 2, 3, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4000},
       false},
      {"decode-llama3-8b-dims", 2, 1, 3000, 32, 8, 128, 8, 512, {0, 100}, false},  // 32-slot tiles in fp32
  };
  return all;
}

struct Tensors {  // float64 copies of the inputs (already rounded to the run's dtype) and the attributes
  MlaDims d;
  std::vector<int64_t> pairs;
  double scale;
  std::vector<double> query, latent, key_rope, past_latent, past_key_rope, cos, sin, w_uk, w_uv;
  std::vector<int64_t> mask;
};

double round_to(double x, Dtype dtype) {
  return dtype == Dtype::kFloat16 ? static_cast<double>(__half2float(__float2half(static_cast<float>(x))))
                                  : static_cast<double>(static_cast<float>(x));
}

Tensors make_inputs(const Case& c, Dtype dtype, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Tensors t;
  MlaDims& d = t.d;
  d.B = c.B, d.S = c.S, d.P = c.P, d.T = c.P + c.S, d.H = c.H, d.n_kv = c.n_kv, d.G = c.H / c.n_kv;
  d.past_rows = d.P, d.present_rows = d.T, d.mask_cols = d.T;  // version 1's layout
  d.R = c.R, d.E = 2 * c.R, d.KR = c.n_kv * 2 * c.R, d.hd = c.hd, d.dn = c.hd - 2 * c.R, d.r = c.r, d.dv = c.hd;
  d.C = c.hd / 2;
  t.scale = 1.0 / std::sqrt(static_cast<double>(c.hd));
  for (int64_t g = 0; g < c.n_kv; ++g) {  // R distinct pairs per KV head, sorted
    std::vector<int64_t> all(c.hd / 2);
    for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
    std::shuffle(all.begin(), all.end(), rng);
    std::sort(all.begin(), all.begin() + c.R);
    t.pairs.insert(t.pairs.end(), all.begin(), all.begin() + c.R);
  }
  auto fill = [&](std::vector<double>& v, int64_t n, double s) {
    v.resize(n);
    for (auto& x : v) x = round_to(s * normal(rng), dtype);
  };
  fill(t.query, d.B * d.S * d.H * d.hd, 1.0);
  fill(t.latent, d.B * d.S * d.r, 1.0);
  fill(t.key_rope, d.B * d.S * d.KR, 1.0);
  fill(t.past_latent, d.B * d.P * d.r, 1.0);
  fill(t.past_key_rope, d.B * d.P * d.KR, 1.0);
  fill(t.w_uk, d.n_kv * d.dn * d.r, 1.0 / std::sqrt(static_cast<double>(d.r)));
  fill(t.w_uv, d.n_kv * d.dv * d.r, 1.0 / std::sqrt(static_cast<double>(d.r)));
  t.mask.assign(d.B * d.T, 1);
  for (size_t b = 0; b < c.pad.size() && static_cast<int64_t>(b) < d.B; ++b)
    for (int64_t j = 0; j < std::min(c.pad[b], d.T); ++j) t.mask[b * d.T + j] = 0;
  t.cos.resize(d.B * d.S * d.C);
  t.sin.resize(d.B * d.S * d.C);
  for (int64_t b = 0; b < d.B; ++b) {
    int64_t real = 0;  // position = real tokens before the slot (0 for padding), as the runner feeds it
    for (int64_t j = 0; j < d.T; ++j) {
      const int64_t pos = std::max<int64_t>(real + t.mask[b * d.T + j] - 1, 0);
      real += t.mask[b * d.T + j];
      if (j < d.P) continue;
      for (int64_t i = 0; i < d.C; ++i) {
        const double angle = pos * std::pow(10000.0, -static_cast<double>(i) / d.C);
        t.cos[(b * d.S + j - d.P) * d.C + i] = round_to(std::cos(angle), dtype);
        t.sin[(b * d.S + j - d.P) * d.C + i] = round_to(std::sin(angle), dtype);
      }
    }
  }
  return t;
}

struct Result {
  std::vector<double> output, present_latent, present_key_rope;
};

// The op's semantics (op_spec.md) in float64.
Result reference(const Tensors& t) {
  const MlaDims& d = t.d;
  Result res;
  res.present_latent.resize(d.B * d.T * d.r);
  res.present_key_rope.resize(d.B * d.T * d.KR);
  res.output.assign(d.B * d.S * d.H * d.dv, 0.0);
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t j = 0; j < d.P; ++j) {
      std::copy_n(&t.past_latent[(b * d.P + j) * d.r], d.r, &res.present_latent[(b * d.T + j) * d.r]);
      std::copy_n(&t.past_key_rope[(b * d.P + j) * d.KR], d.KR, &res.present_key_rope[(b * d.T + j) * d.KR]);
    }
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t tok = b * d.S + s, slot = b * d.T + d.P + s;
      std::copy_n(&t.latent[tok * d.r], d.r, &res.present_latent[slot * d.r]);
      for (int64_t g = 0; g < d.n_kv; ++g)
        for (int64_t j = 0; j < d.R; ++j) {
          const double c = t.cos[tok * d.C + t.pairs[g * d.R + j]], sn = t.sin[tok * d.C + t.pairs[g * d.R + j]];
          const double x1 = t.key_rope[tok * d.KR + g * d.E + j], x2 = t.key_rope[tok * d.KR + g * d.E + d.R + j];
          res.present_key_rope[slot * d.KR + g * d.E + j] = x1 * c - x2 * sn;
          res.present_key_rope[slot * d.KR + g * d.E + d.R + j] = x2 * c + x1 * sn;
        }
    }
  }
  std::vector<double> q_lat(d.r), q_rope(d.E), score(d.T), o(d.r);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t tok = b * d.S + s, self = d.P + s;
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t g = h / d.G;
        const double* q = &t.query[(tok * d.H + h) * d.hd];
        for (int64_t j = 0; j < d.R; ++j) {
          const double c = t.cos[tok * d.C + t.pairs[g * d.R + j]], sn = t.sin[tok * d.C + t.pairs[g * d.R + j]];
          q_rope[j] = q[j] * c - q[d.R + j] * sn;
          q_rope[d.R + j] = q[d.R + j] * c + q[j] * sn;
        }
        std::fill(q_lat.begin(), q_lat.end(), 0.0);
        for (int64_t k = 0; k < d.dn; ++k)
          for (int64_t c = 0; c < d.r; ++c) q_lat[c] += q[d.E + k] * t.w_uk[(g * d.dn + k) * d.r + c];
        double mx = -INFINITY;
        for (int64_t j = 0; j < d.T; ++j) {
          const bool allowed = (j <= self && t.mask[b * d.T + j] != 0) || j == self;
          if (!allowed) {
            score[j] = -INFINITY;
            continue;
          }
          double acc = 0.0;
          for (int64_t c = 0; c < d.r; ++c) acc += q_lat[c] * res.present_latent[(b * d.T + j) * d.r + c];
          for (int64_t e = 0; e < d.E; ++e) acc += q_rope[e] * res.present_key_rope[(b * d.T + j) * d.KR + g * d.E + e];
          score[j] = t.scale * acc;
          mx = std::max(mx, score[j]);
        }
        double total = 0.0;
        std::fill(o.begin(), o.end(), 0.0);
        for (int64_t j = 0; j < d.T; ++j) {
          if (score[j] == -INFINITY) continue;
          const double p = std::exp(score[j] - mx);
          total += p;
          for (int64_t c = 0; c < d.r; ++c) o[c] += p * res.present_latent[(b * d.T + j) * d.r + c];
        }
        for (int64_t e = 0; e < d.dv; ++e) {
          double acc = 0.0;
          for (int64_t c = 0; c < d.r; ++c) acc += o[c] * t.w_uv[(g * d.dv + e) * d.r + c];
          res.output[(tok * d.H + h) * d.dv + e] = acc / total;
        }
      }
    }
  return res;
}

// A device copy of a float64 vector in the run's dtype.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    if (n) CHECK_CUDA(cudaMalloc(&ptr, n));
  }
  DeviceBuffer(const std::vector<double>& v, Dtype dtype) : DeviceBuffer(v.size() * (dtype == Dtype::kFloat16 ? 2 : 4)) {
    if (v.empty()) return;
    if (dtype == Dtype::kFloat16) {
      std::vector<__half> h(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = __float2half(static_cast<float>(v[i]));
      CHECK_CUDA(cudaMemcpy(ptr, h.data(), bytes, cudaMemcpyHostToDevice));
    } else {
      std::vector<float> f(v.begin(), v.end());
      CHECK_CUDA(cudaMemcpy(ptr, f.data(), bytes, cudaMemcpyHostToDevice));
    }
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(bytes, o.bytes);
    return *this;
  }
};

std::vector<double> to_host(const DeviceBuffer& buf, size_t n, Dtype dtype) {
  std::vector<double> out(n);
  if (n == 0) return out;
  if (dtype == Dtype::kFloat16) {
    std::vector<__half> h(n);
    CHECK_CUDA(cudaMemcpy(h.data(), buf.ptr, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = __half2float(h[i]);
  } else {
    std::vector<float> f(n);
    CHECK_CUDA(cudaMemcpy(f.data(), buf.ptr, n * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = f[i];
  }
  return out;
}

struct Run {
  DeviceBuffer query, latent, key_rope, past_latent, past_key_rope, cos, sin, w_uk, w_uv, mask;
  DeviceBuffer output, present_latent, present_key_rope, scratch;
  mla_zoo::cuda::Plan plan;
  mla_zoo::cuda::Inputs in;
  mla_zoo::cuda::Outputs out;
};

void setup(Run& run, const Tensors& t, Dtype dtype, Math math, bool pipeline = true,
           const mla_zoo::cuda::Tuning* tuning = nullptr) {
  const MlaDims& d = t.d;
  const size_t elem = dtype == Dtype::kFloat16 ? 2 : 4;
  run.query = DeviceBuffer(t.query, dtype);
  run.latent = DeviceBuffer(t.latent, dtype);
  run.key_rope = DeviceBuffer(t.key_rope, dtype);
  run.past_latent = DeviceBuffer(t.past_latent, dtype);
  run.past_key_rope = DeviceBuffer(t.past_key_rope, dtype);
  run.cos = DeviceBuffer(t.cos, dtype);
  run.sin = DeviceBuffer(t.sin, dtype);
  run.w_uk = DeviceBuffer(t.w_uk, dtype);
  run.w_uv = DeviceBuffer(t.w_uv, dtype);
  run.mask = DeviceBuffer(t.mask.size() * 8);
  CHECK_CUDA(cudaMemcpy(run.mask.ptr, t.mask.data(), run.mask.bytes, cudaMemcpyHostToDevice));
  run.output = DeviceBuffer(d.B * d.S * d.H * d.dv * elem);
  run.present_latent = DeviceBuffer(d.B * d.T * d.r * elem);
  run.present_key_rope = DeviceBuffer(d.B * d.T * d.KR * elem);
  run.plan = mla_zoo::cuda::make_plan(d, dtype, mla_zoo::cuda::current_device(), math, pipeline, tuning);
  run.scratch = DeviceBuffer(run.plan.scratch_bytes());
  run.in = {run.query.ptr, run.latent.ptr, run.key_rope.ptr, run.past_latent.ptr, run.past_key_rope.ptr,
            static_cast<const int64_t*>(run.mask.ptr), run.cos.ptr, run.sin.ptr, run.w_uk.ptr, run.w_uv.ptr};
  run.out = {run.output.ptr, run.present_latent.ptr, run.present_key_rope.ptr};
}

struct Error {
  double max_abs = 0, max_ref = 0;
  bool finite = true;
  double rel() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
};

Error compare(const std::vector<double>& got, const std::vector<double>& want) {
  Error e;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) e.finite = false;
    e.max_abs = std::max(e.max_abs, std::fabs(got[i] - want[i]));
    e.max_ref = std::max(e.max_ref, std::fabs(want[i]));
  }
  return e;
}

const char* math_name(Math m) { return m == Math::kTensorCores ? "tensor" : m == Math::kCudaCores ? "cuda" : "auto"; }
const char* kernel_name(Kernel k) { return k == Kernel::kWarps ? "warps" : k == Kernel::kBlocks ? "blocks" : "auto"; }

// How the cache is passed: version 1 (past [B, P] rows in, a present of [B, T] rows out) or version 2
// (op_spec.md: buffers of `cap` rows whose first P hold the past, mask [B, cap]), either one buffer bound as
// past and present (in place: only the new rows are written) or a present of its own (launch copies the buffer).
enum class Layout { kV1, kSharedInPlace, kSharedCopy };
constexpr int64_t kSpareRows = 5;  // version 2's buffers: T + kSpareRows rows, the rows past T hold noise

const char* layout_name(Layout l) {
  return l == Layout::kV1 ? "v1" : l == Layout::kSharedInPlace ? "v2-in-place" : "v2-copy";
}

// Version 2's buffers for a case: the past written into buffers of cap = T + kSpareRows rows and the mask into
// [B, cap]; rows from P and mask columns from T hold noise that the op must neither read nor overwrite.
struct SharedBuffers {
  int64_t cap = 0;
  std::vector<double> latent, key_rope;  // [B, cap, r], [B, cap, KR]: what the buffers hold before the call
  std::vector<int64_t> mask;             // [B, cap]
};

SharedBuffers shared_buffers(const Tensors& t, Dtype dtype, unsigned seed) {
  const MlaDims& d = t.d;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  SharedBuffers sb;
  sb.cap = d.T + kSpareRows;
  auto into = [&](std::vector<double>& buf, const std::vector<double>& past, int64_t w) {
    buf.resize(d.B * sb.cap * w);
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t j = 0; j < sb.cap; ++j)
        for (int64_t c = 0; c < w; ++c)
          buf[(b * sb.cap + j) * w + c] = j < d.P ? past[(b * d.P + j) * w + c] : round_to(normal(rng), dtype);
  };
  into(sb.latent, t.past_latent, d.r);
  into(sb.key_rope, t.past_key_rope, d.KR);
  sb.mask.resize(d.B * sb.cap);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t j = 0; j < sb.cap; ++j) sb.mask[b * sb.cap + j] = j < d.T ? t.mask[b * d.T + j] : (rng() & 1);
  return sb;
}

// Rebinds `run` (set up for version 1) to version 2's buffers; returns the dims of the version-2 call.
MlaDims bind_shared(Run& run, const Tensors& t, const SharedBuffers& sb, Dtype dtype, Math math, bool pipeline,
                    const mla_zoo::cuda::Tuning* tuning, bool in_place) {
  MlaDims d = t.d;
  d.past_rows = d.present_rows = d.mask_cols = sb.cap;
  d.shared_buffer = true;
  run.past_latent = DeviceBuffer(sb.latent, dtype);
  run.past_key_rope = DeviceBuffer(sb.key_rope, dtype);
  run.mask = DeviceBuffer(sb.mask.size() * 8);
  CHECK_CUDA(cudaMemcpy(run.mask.ptr, sb.mask.data(), run.mask.bytes, cudaMemcpyHostToDevice));
  if (in_place) {
    run.present_latent = DeviceBuffer();
    run.present_key_rope = DeviceBuffer();
  } else {  // filled with other noise: the launch must copy the whole buffer
    run.present_latent = DeviceBuffer(std::vector<double>(sb.latent.size(), -3.0), dtype);
    run.present_key_rope = DeviceBuffer(std::vector<double>(sb.key_rope.size(), -3.0), dtype);
  }
  run.in.past_latent = run.past_latent.ptr, run.in.past_key_rope = run.past_key_rope.ptr;
  run.in.attention_mask = static_cast<const int64_t*>(run.mask.ptr);
  run.out.present_latent = in_place ? run.past_latent.ptr : run.present_latent.ptr;
  run.out.present_key_rope = in_place ? run.past_key_rope.ptr : run.present_key_rope.ptr;
  run.plan = mla_zoo::cuda::make_plan(d, dtype, mla_zoo::cuda::current_device(), math, pipeline, tuning);
  run.scratch = DeviceBuffer(run.plan.scratch_bytes());
  return d;
}

// A present read back from a version-2 buffer: its first T rows per batch row (the version-1 present), and
// whether the rows past T still hold the noise they held before the call.
std::vector<double> present_rows(const std::vector<double>& buf, const std::vector<double>& before, int64_t B,
                                 int64_t T, int64_t cap, int64_t w, bool& spare_kept) {
  std::vector<double> out(B * T * w);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < cap; ++j)
      for (int64_t c = 0; c < w; ++c) {
        const size_t i = (b * cap + j) * w + c;
        if (j < T)
          out[(b * T + j) * w + c] = buf[i];
        else if (buf[i] != before[i])
          spare_kept = false;
      }
  return out;
}

bool check_case(const Case& c, const Result& want32, const Result& want16, Dtype dtype, Math math, bool pipeline,
                const mla_zoo::cuda::Tuning* tuning = nullptr, bool print = true, Layout layout = Layout::kV1) {
  const Tensors t = make_inputs(c, dtype, 1234);
  const Result& want = dtype == Dtype::kFloat16 ? want16 : want32;
  Run run;
  setup(run, t, dtype, math, pipeline, tuning);
  SharedBuffers sb;
  MlaDims call = t.d;
  if (layout != Layout::kV1) {
    sb = shared_buffers(t, dtype, 99);
    call = bind_shared(run, t, sb, dtype, math, pipeline, tuning, layout == Layout::kSharedInPlace);
  }
  const std::string err = mla_zoo::cuda::launch(call, t.pairs, static_cast<float>(t.scale), dtype, run.plan, run.in,
                                                run.out, run.scratch.ptr, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  const MlaDims& d = t.d;
  std::vector<double> got_lat, got_kr;
  bool spare_kept = true;
  if (layout == Layout::kV1) {
    got_lat = to_host(run.present_latent, d.B * d.T * d.r, dtype);
    got_kr = to_host(run.present_key_rope, d.B * d.T * d.KR, dtype);
  } else {
    const DeviceBuffer& lat_buf = layout == Layout::kSharedInPlace ? run.past_latent : run.present_latent;
    const DeviceBuffer& kr_buf = layout == Layout::kSharedInPlace ? run.past_key_rope : run.present_key_rope;
    got_lat = present_rows(to_host(lat_buf, d.B * sb.cap * d.r, dtype), sb.latent, d.B, d.T, sb.cap, d.r, spare_kept);
    got_kr = present_rows(to_host(kr_buf, d.B * sb.cap * d.KR, dtype), sb.key_rope, d.B, d.T, sb.cap, d.KR,
                          spare_kept);
  }
  const Error out = compare(to_host(run.output, d.B * d.S * d.H * d.dv, dtype), want.output);
  const Error lat = compare(got_lat, want.present_latent);
  const Error kr = compare(got_kr, want.present_key_rope);
  // float32: fp32 accumulation against float64; float16: fp16 inputs are exact, the queries and the
  // probabilities are rounded to fp16 for the tensor cores, the outputs on the way out
  const bool fp16 = dtype == Dtype::kFloat16;
  const double out_tol = fp16 ? 1e-2 : 2e-5, rope_tol = fp16 ? 1e-3 : 1e-6;
  const bool ok = err.empty() && out.finite && lat.finite && kr.finite && out.rel() < out_tol && lat.max_abs == 0 &&
                  kr.rel() < rope_tol && spare_kept;
  if (!print) return ok;
  std::printf(
      "{\"case\": \"%s\", \"dtype\": \"%s\", \"math\": \"%s\", \"tensor_cores\": %s, \"kernel\": \"%s\", "
      "\"pipelined\": %s, \"ring\": %d, \"threads\": %d, \"block_m\": %d, \"block_n\": %d, \"max_registers\": %d, "
      "\"row_blocks\": %lld, \"splits\": %lld, \"layout\": \"%s\", \"output_rel_err\": %.3e, "
      "\"present_latent_max_abs\": %.3e, \"present_key_rope_rel_err\": %.3e, \"spare_rows_kept\": %s, "
      "\"tolerance\": %.0e, \"error\": \"%s\", \"ok\": %s}\n",
      c.name.c_str(), fp16 ? "float16" : "float32", math_name(math), run.plan.tensor_cores ? "true" : "false",
      kernel_name(run.plan.kernel), run.plan.pipelined ? "true" : "false", run.plan.ring, run.plan.threads,
      run.plan.block_m, run.plan.block_n, run.plan.max_registers, static_cast<long long>(run.plan.row_blocks),
      static_cast<long long>(run.plan.splits), layout_name(layout), out.rel(), lat.max_abs, kr.rel(),
      spare_kept ? "true" : "false", out_tol, err.c_str(), ok ? "true" : "false");
  std::fflush(stdout);
  return ok;
}

// Decode latency of the whole op (3 kernels) at SmolLM2-MLA's dims in float16, and the device's copy bandwidth.
// shared: op version 2 in place (one buffer as past and present: the past is read, only the new row written).
void bench(const std::vector<int64_t>& contexts, const std::vector<int64_t>& batches, int iters, bool shared) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  {  // copy bandwidth: 2 GiB device-to-device, read + write counted
    const size_t n = size_t(1) << 31;
    DeviceBuffer a(n), b(n);
    CHECK_CUDA(cudaMemset(a.ptr, 1, n));
    float best = 1e30f;
    for (int i = 0; i < 10; ++i) {
      CHECK_CUDA(cudaEventRecord(start));
      CHECK_CUDA(cudaMemcpyAsync(b.ptr, a.ptr, n, cudaMemcpyDeviceToDevice));
      CHECK_CUDA(cudaEventRecord(stop));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
      best = std::min(best, ms);
    }
    std::printf("{\"copy_gb_per_s\": %.1f}\n", 2.0 * n / (best * 1e-3) / 1e9);
  }
  for (int64_t T : contexts)
    for (int64_t B : batches) {
      const Case c{"bench", B, 1, T - 1, 9, 3, 64, 4, 96, {}};
      const Tensors t = make_inputs(c, Dtype::kFloat16, 7);
      Run run;
      setup(run, t, Dtype::kFloat16, Math::kAuto);
      MlaDims call = t.d;
      if (shared)
        call = bind_shared(run, t, shared_buffers(t, Dtype::kFloat16, 8), Dtype::kFloat16, Math::kAuto, true, nullptr,
                           true);
      auto once = [&] {
        const std::string err = mla_zoo::cuda::launch(call, t.pairs, static_cast<float>(t.scale), Dtype::kFloat16,
                                                      run.plan, run.in, run.out, run.scratch.ptr, nullptr);
        if (!err.empty()) {
          std::fprintf(stderr, "%s\n", err.c_str());
          std::exit(2);
        }
      };
      for (int i = 0; i < 5; ++i) once();
      CHECK_CUDA(cudaDeviceSynchronize());
      std::vector<float> times;
      for (int i = 0; i < iters; ++i) {
        CHECK_CUDA(cudaEventRecord(start));
        once();
        CHECK_CUDA(cudaEventRecord(stop));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float ms = 0;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms);
      }
      std::sort(times.begin(), times.end());
      const double us = 1e3 * times[times.size() / 2];
      const MlaDims& d = t.d;
      // the contract's traffic: read the past once, write the present once (+ the small new rows); in place
      // (version 2), the past read and the new rows written
      const double bytes = 2.0 * (d.B * d.P * (d.r + d.KR)) + 2.0 * (d.B * (shared ? d.S : d.T) * (d.r + d.KR));
      std::printf(
          "{\"bench\": \"decode\", \"layout\": \"%s\", \"dims\": \"smollm2-mla H=9 n_kv=3 r=96 KR=24 fp16\", "
          "\"context\": %lld, "
          "\"batch\": %lld, \"us_median\": %.2f, \"us_min\": %.2f, \"bytes\": %.0f, \"gb_per_s\": %.1f, "
          "\"splits\": %lld, \"kernel\": \"%s\", \"block_m\": %d, \"block_n\": %d, \"warps\": %d, \"ring\": %d, "
          "\"max_registers\": %d}\n",
          layout_name(shared ? Layout::kSharedInPlace : Layout::kV1), static_cast<long long>(T),
          static_cast<long long>(B), us, 1e3 * times.front(), bytes,
          bytes / (us * 1e-6) / 1e9, static_cast<long long>(run.plan.splits), kernel_name(run.plan.kernel),
          run.plan.block_m, run.plan.block_n, run.plan.warps, run.plan.ring, run.plan.max_registers);
      std::fflush(stdout);
    }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

// --sweep: every candidate launch configuration (mla_zoo::cuda::Tuning, what the MLA_ZOO_CUDA_* variables
// set) at SmolLM2-MLA decode shapes, float16 (tensor cores), to pick the plan's defaults on a GPU in one
// run. Per configuration, first a check of its output against the float64 reference on small decode
// cases (a split 700-slot cache at batch 3; batch 16 x 4K with padding), then one JSON line per shape:
//   us_median   one call between two events, median (as --bench: includes the host's launch latency);
//   us_loop     `loop` calls back to back between two events, per call (the GPU time of one call);
//   us_prepare / us_attend / us_merge   each kernel alone, back to back (stale inputs: timing only);
//   gb_per_s    bytes / us_median (as --bench), gb_per_s_loop = bytes / us_loop;
//   occupancy   attend blocks resident per SM; waves = attend blocks / (occupancy * SMs).
// Then per shape a "copy_floor" line (cudaMemcpy2DAsync of the past into the presents: the op's copy
// alone) and a "best" line (the fastest passing configuration by us_loop, as environment variables).
struct Config {
  std::string name;
  mla_zoo::cuda::Tuning tuning;
};

std::vector<Config> sweep_configs() {
  std::vector<Config> out;
  out.push_back({"default", mla_zoo::cuda::env_tuning()});
  for (Kernel k : {Kernel::kBlocks, Kernel::kWarps}) {  // each kernel with its built-in plan
    mla_zoo::cuda::Tuning t;
    t.kernel = k;
    out.push_back({std::string(kernel_name(k)) + "-default", t});
  }
  auto add = [&](int bn, int bps, int threads, int pipeline, int splits, int min_tiles, int ring = 0) {
    mla_zoo::cuda::Tuning t;
    t.kernel = Kernel::kBlocks;
    t.block_n = bn, t.blocks_per_sm = bps, t.threads = threads, t.pipeline = pipeline, t.splits = splits,
    t.min_split_tiles = min_tiles, t.ring = ring;
    std::ostringstream n;
    n << "bn" << bn << "-bps" << bps << "-t" << threads << "-p" << pipeline;
    if (ring) n << "-ring" << ring;
    if (splits) n << "-s" << splits;
    if (min_tiles) n << "-mt" << min_tiles;
    out.push_back({n.str(), t});
  };
  for (int bn : {32, 64, 128, 256})
    for (int bps : {2, 4, 8})
      for (int threads : {128, 256})
        for (int pipeline : {1, 0}) add(bn, bps, threads, pipeline, 0, 0);
  for (int bn : {64, 128})
    for (int splits : {8, 16, 64}) add(bn, 0, 128, 1, splits, 0);
  for (int bn : {32, 64})
    for (int bps : {4, 8}) add(bn, bps, 128, 1, 0, 1);
  for (int bn : {32, 64, 128})  // triple buffering
    for (int bps : {2, 4, 8})
      for (int threads : {128, 256}) add(bn, bps, threads, 1, 0, 0, 3);
  // the warps kernel: warps per block x slots per warp tile x ring depth x split target (0: built-in)
  // [x its register-capped build]
  auto add_warps = [&](int warps, int warp_n, int ring, int bps, int min_tiles = 0, int max_registers = 0) {
    mla_zoo::cuda::Tuning t;
    t.kernel = Kernel::kWarps;
    t.warps = warps, t.warp_n = warp_n, t.ring = ring, t.blocks_per_sm = bps, t.min_split_tiles = min_tiles;
    t.max_registers = max_registers;
    std::ostringstream n;
    n << "warps" << warps << "-wn" << warp_n << "-ring" << ring << "-bps" << bps;
    if (min_tiles) n << "-mt" << min_tiles;
    if (max_registers) n << "-cap" << max_registers;
    out.push_back({n.str(), t});
  };
  for (int warps : {2, 4, 8})
    for (int warp_n : {16, 32, 64})
      for (int ring : {2, 3, 4})
        for (int bps : {0, 2, 8})
          if (warps * warp_n * ring <= 768) add_warps(warps, warp_n, ring, bps);  // rings that fit (<= 215 KB)
  for (int warps : {4, 8}) add_warps(warps, 32, 2, 0, 1);  // shorter splits
  constexpr int kCap = mla_zoo::cuda::kMaxRegistersCapped;
  // the capped build (128 registers: 2 8-warp / 4 4-warp blocks per SM where shared memory allows, e.g.
  // 16-slot tiles in 2-3 deep rings) against the same configurations of the built-in one above
  for (int warps : {4, 8})
    for (int warp_n : {16, 32})
      for (int ring : {2, 3, 4})
        for (int bps : {0, 8})
          if (warps * warp_n * ring <= 768) add_warps(warps, warp_n, ring, bps, 0, kCap);
  return out;
}

std::string env_line(const mla_zoo::cuda::Tuning& t) {
  std::ostringstream s;
  s << "MLA_ZOO_CUDA_BLOCK_N=" << t.block_n << " MLA_ZOO_CUDA_BLOCKS_PER_SM=" << t.blocks_per_sm
    << " MLA_ZOO_CUDA_SPLITS=" << t.splits << " MLA_ZOO_CUDA_MIN_SPLIT_TILES=" << t.min_split_tiles
    << " MLA_ZOO_CUDA_THREADS=" << t.threads << " MLA_ZOO_CUDA_PIPELINE=" << t.pipeline
    << " MLA_ZOO_CUDA_RING=" << t.ring << " MLA_ZOO_CUDA_KERNEL=" << kernel_name(t.kernel)
    << " MLA_ZOO_CUDA_WARPS=" << t.warps << " MLA_ZOO_CUDA_WARP_N=" << t.warp_n
    << " MLA_ZOO_CUDA_MAX_REGISTERS=" << t.max_registers;
  return s.str();
}

void sweep(const std::vector<std::pair<int64_t, int64_t>>& shapes, int iters, size_t limit, bool checks_only) {
  using mla_zoo::cuda::Plan;
  std::vector<Config> configs = sweep_configs();
  if (limit && configs.size() > limit) configs.resize(limit);
  const mla_zoo::cuda::Device device = mla_zoo::cuda::current_device();

  // 1. correctness of every configuration (float16, tensor cores, as decode runs)
#ifdef MLA_ZOO_CUDA_EMULATION
  const std::vector<std::string> check_names{"decode-long-past"};  // the emulation is slow: the small one only
#else
  const std::vector<std::string> check_names{"decode-long-past", "decode-smollm2-16x4k"};
#endif
  std::vector<std::pair<const Case*, Result>> checks;
  for (const Case& c : cases())
    for (const std::string& n : check_names)
      if (c.name == n) checks.push_back({&c, reference(make_inputs(c, Dtype::kFloat16, 1234))});
  std::vector<bool> passed(configs.size(), true);
  for (size_t i = 0; i < configs.size(); ++i) {
    for (const auto& [c, want] : checks) {
      try {
        if (!check_case(*c, want, want, Dtype::kFloat16, Math::kAuto, true, &configs[i].tuning, checks_only))
          passed[i] = false;
      } catch (const mla_zoo::ShapeError& e) {
        std::printf("{\"sweep\": \"check\", \"config\": \"%s\", \"error\": \"%s\"}\n", configs[i].name.c_str(),
                    e.message.c_str());
        passed[i] = false;
      }
    }
    if (checks_only)
      std::printf("{\"sweep\": \"check\", \"config\": \"%s\", \"ok\": %s}\n", configs[i].name.c_str(),
                  passed[i] ? "true" : "false");
  }
  if (checks_only) {
    size_t failed = 0;
    for (bool p : passed) failed += !p;
    std::printf("{\"summary\": \"sweep-checks\", \"configs\": %zu, \"failed_checks\": %zu}\n", configs.size(), failed);
    return;
  }

  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  const int loop = 20;  // calls between the events of a back-to-back timing
  for (const auto& [T, B] : shapes) {
      const Case c{"sweep", B, 1, T - 1, 9, 3, 64, 4, 96, {}};
      const Tensors t = make_inputs(c, Dtype::kFloat16, 7);
      const MlaDims& d = t.d;
      Run run;
      setup(run, t, Dtype::kFloat16, Math::kAuto);
      const double bytes = 2.0 * (d.B * d.P * (d.r + d.KR)) + 2.0 * (d.B * d.T * (d.r + d.KR));
      // median over `reps` of (one timing of `n` calls of f) / n, in µs
      auto timed = [&](int n, int reps, const std::function<void()>& f) {
        std::vector<float> times;
        for (int i = 0; i < reps; ++i) {
          CHECK_CUDA(cudaEventRecord(start));
          for (int k = 0; k < n; ++k) f();
          CHECK_CUDA(cudaEventRecord(stop));
          CHECK_CUDA(cudaEventSynchronize(stop));
          float ms = 0;
          CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
          times.push_back(1e3f * ms / n);
        }
        std::sort(times.begin(), times.end());
        return std::make_pair(static_cast<double>(times[times.size() / 2]), static_cast<double>(times.front()));
      };

      {  // the op's copy alone: past [B, P, w] -> present [B, T, w] (its first P rows), both caches
        auto copy = [&] {
          const size_t e = 2;
          CHECK_CUDA(cudaMemcpy2DAsync(run.present_latent.ptr, d.T * d.r * e, run.past_latent.ptr, d.P * d.r * e,
                                       d.P * d.r * e, d.B, cudaMemcpyDeviceToDevice));
          CHECK_CUDA(cudaMemcpy2DAsync(run.present_key_rope.ptr, d.T * d.KR * e, run.past_key_rope.ptr, d.P * d.KR * e,
                                       d.P * d.KR * e, d.B, cudaMemcpyDeviceToDevice));
        };
        copy();
        const double us = timed(loop, 5, copy).first;
        const double copy_bytes = 4.0 * d.B * d.P * (d.r + d.KR);
        std::printf("{\"sweep\": \"copy_floor\", \"context\": %lld, \"batch\": %lld, \"us_loop\": %.2f, \"bytes\": %.0f, "
                    "\"gb_per_s\": %.1f}\n",
                    static_cast<long long>(T), static_cast<long long>(B), us, copy_bytes, copy_bytes / (us * 1e-6) / 1e9);
        std::fflush(stdout);
      }

      double best_us = 1e30;
      size_t best = configs.size();
      for (size_t i = 0; i < configs.size(); ++i) {
        Plan plan;
        try {
          plan = mla_zoo::cuda::make_plan(d, Dtype::kFloat16, device, Math::kAuto, true, &configs[i].tuning);
        } catch (const mla_zoo::ShapeError& e) {
          std::printf("{\"sweep\": \"decode\", \"config\": \"%s\", \"error\": \"%s\"}\n", configs[i].name.c_str(),
                      e.message.c_str());
          continue;
        }
        DeviceBuffer scratch(plan.scratch_bytes());
        auto call = [&](const Plan& p) {
          const std::string err = mla_zoo::cuda::launch(t.d, t.pairs, static_cast<float>(t.scale), Dtype::kFloat16, p,
                                                        run.in, run.out, scratch.ptr, nullptr);
          if (!err.empty()) {
            std::fprintf(stderr, "%s: %s\n", configs[i].name.c_str(), err.c_str());
            std::exit(2);
          }
        };
        for (int k = 0; k < 3; ++k) call(plan);
        CHECK_CUDA(cudaDeviceSynchronize());
        const auto single = timed(1, iters, [&] { call(plan); });
        const double us_loop = timed(loop, 5, [&] { call(plan); }).first;
        double stage_us[3] = {0, 0, 0};
        for (int k = 0; k < 3; ++k) {
          Plan p = plan;
          p.launch_mask = 1 << k;
          stage_us[k] = timed(loop, 5, [&] { call(p); }).first;
        }
        const int occupancy = mla_zoo::cuda::attend_occupancy(plan, Dtype::kFloat16);
        const double attend_blocks = static_cast<double>(plan.splits * plan.row_blocks * d.B);
        const double waves = occupancy > 0 ? attend_blocks / (occupancy * device.sm_count) : -1;
        std::printf(
            "{\"sweep\": \"decode\", \"config\": \"%s\", \"check\": \"%s\", \"context\": %lld, \"batch\": %lld, "
            "\"kernel\": \"%s\", \"block_n\": %d, \"threads\": %d, \"ring\": %d, \"max_registers\": %d, "
            "\"splits\": %lld, "
            "\"split_len\": %lld, "
            "\"smem_bytes\": %zu, \"occupancy\": %d, \"waves\": %.2f, \"us_median\": %.2f, \"us_min\": %.2f, "
            "\"us_loop\": %.2f, \"us_prepare\": %.2f, \"us_attend\": %.2f, \"us_merge\": %.2f, \"bytes\": %.0f, "
            "\"gb_per_s\": %.1f, \"gb_per_s_loop\": %.1f}\n",
            configs[i].name.c_str(), passed[i] ? "pass" : "fail", static_cast<long long>(T), static_cast<long long>(B),
            kernel_name(plan.kernel), plan.block_n, plan.threads, plan.ring, plan.max_registers,
            static_cast<long long>(plan.splits),
            static_cast<long long>(plan.split_len), plan.smem_bytes, occupancy, waves, single.first, single.second,
            us_loop, stage_us[0], stage_us[1], stage_us[2], bytes, bytes / (single.first * 1e-6) / 1e9,
            bytes / (us_loop * 1e-6) / 1e9);
        std::fflush(stdout);
        if (passed[i] && us_loop < best_us) best_us = us_loop, best = i;
      }
      if (best < configs.size())
        std::printf("{\"sweep\": \"best\", \"context\": %lld, \"batch\": %lld, \"config\": \"%s\", \"us_loop\": %.2f, "
                    "\"gb_per_s_loop\": %.1f, \"env\": \"%s\"}\n",
                    static_cast<long long>(T), static_cast<long long>(B), configs[best].name.c_str(), best_us,
                    bytes / (best_us * 1e-6) / 1e9, env_line(configs[best].tuning).c_str());
      std::fflush(stdout);
    }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  size_t failed = 0;
  for (bool p : passed) failed += !p;
  std::printf("{\"summary\": \"sweep\", \"configs\": %zu, \"failed_checks\": %zu}\n", configs.size(), failed);
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string only;
  bool do_bench = false, do_sweep = false, sweep_checks = false, quick = false, fragments_only = false, shared = false;
  size_t sweep_limit = 0;
  bool contexts_given = false, batches_given = false;
  std::vector<int64_t> contexts{2048, 8192, 32768}, batches{1, 16};
  int iters = 50;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--case" && i + 1 < argc) {
      only = argv[++i];
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--fragments") {
      fragments_only = true;
    } else if (a == "--bench") {
      do_bench = true;
    } else if (a == "--shared") {  // --bench: op version 2 in place
      shared = true;
    } else if (a == "--sweep") {
      do_sweep = true;
    } else if (a == "--sweep-checks") {  // the sweep's correctness checks only (the CPU emulation in CI)
      do_sweep = sweep_checks = true;
    } else if (a == "--sweep-limit" && i + 1 < argc) {  // the first N configurations only (tests)
      sweep_limit = static_cast<size_t>(std::atoll(argv[++i]));
    } else if (a == "--contexts" && i + 1 < argc) {
      contexts_given = true;
      contexts = parse_list(argv[++i]);
    } else if (a == "--batches" && i + 1 < argc) {
      batches_given = true;
      batches = parse_list(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::printf("usage: %s [--case NAME] [--quick] | --fragments\n"
                  "       | --bench [--shared] [--contexts 2048,8192,32768] [--batches 1,16] [--iters 50]\n"
                  "       | --sweep [--contexts 16384,32768 --batches 1,16 (+ 2048 x 1)] [--iters 50] [--sweep-limit N]\n"
                  "       | --sweep-checks [--sweep-limit N]\n",
                  argv[0]);
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 3;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"device\": \"%s\", \"sm\": \"%d.%d\", \"sms\": %d}\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);
  if (do_bench) {
    bench(contexts, batches, iters, shared);
    return 0;
  }
  if (do_sweep) {
    std::vector<std::pair<int64_t, int64_t>> shapes;
    for (int64_t T : contexts_given ? contexts : std::vector<int64_t>{16384, 32768})
      for (int64_t B : batches_given ? batches : std::vector<int64_t>{1, 16}) shapes.push_back({T, B});
    if (!contexts_given && !batches_given) shapes.push_back({2048, 1});  // the fixed-cost shape
    sweep(shapes, iters, sweep_limit, sweep_checks);
    return 0;
  }
  int failed = 0, run = 0;
  if (only.empty()) {  // the warps kernel's tensor-core primitives against the PTX ISA's fragment layouts
    const std::string diff = mla_zoo::cuda::check_tensor_core_fragments();
    std::printf("{\"check\": \"fragments\", \"error\": \"%s\", \"ok\": %s}\n", diff.c_str(),
                diff.empty() ? "true" : "false");
    ++run;
    failed += !diff.empty();
    if (fragments_only) return diff.empty() ? 0 : 1;
  }
  for (const Case& c : cases()) {
    if ((!only.empty() && c.name != only) || (quick && !c.quick)) continue;
    struct Mode {
      Dtype dtype;
      Math math;
      bool pipeline;
      const mla_zoo::cuda::Tuning* tuning;  // nullptr: the environment's (MLA_ZOO_CUDA_*), else fixed
    };
    auto tuning = [](Kernel kernel, int ring, int block_n, int threads, int warps = 0, int warp_n = 0, int splits = 0,
                     int max_registers = 0) {
      mla_zoo::cuda::Tuning t;
      t.kernel = kernel, t.ring = ring, t.block_n = block_n, t.threads = threads;
      t.warps = warps, t.warp_n = warp_n, t.splits = splits, t.max_registers = max_registers;
      return t;
    };
    static const mla_zoo::cuda::Tuning ring3 = tuning(Kernel::kAuto, 3, 0, 0);
    static const mla_zoo::cuda::Tuning blocks = tuning(Kernel::kBlocks, 0, 0, 0);
    static const mla_zoo::cuda::Tuning wide = tuning(Kernel::kBlocks, 0, 128, 256);  // 128-slot tiles, 256 threads
    // the warps kernel wherever it runs (prefill's row blocks too; its built-in plan runs in the modes
    // above): 2 warps with 4-deep rings; 4 warps of 64-slot tiles, triple buffering; 8 warps over 5 splits
    // (160 slots: 5 tiles for 8 warps, some warps without a tile; a short last split)
    static const mla_zoo::cuda::Tuning warps2 = tuning(Kernel::kWarps, 4, 0, 0, 2, 32);
    static const mla_zoo::cuda::Tuning warps64 = tuning(Kernel::kWarps, 3, 0, 0, 4, 64);
    static const mla_zoo::cuda::Tuning warps8 = tuning(Kernel::kWarps, 2, 0, 0, 8, 32, 5);
    // its register-capped build (queries from shared memory; the built-in build where r16 > 96): 4 warps of
    // 16-slot tiles (split caches); 8 warps of 32-slot tiles, triple buffering
    constexpr int kCap = mla_zoo::cuda::kMaxRegistersCapped;
    static const mla_zoo::cuda::Tuning capped4 = tuning(Kernel::kWarps, 2, 0, 0, 4, 16, 0, kCap);
    static const mla_zoo::cuda::Tuning capped8 = tuning(Kernel::kWarps, 3, 0, 0, 8, 32, 0, kCap);
    const Mode modes[] = {{Dtype::kFloat32, Math::kAuto, true, nullptr},
                          {Dtype::kFloat32, Math::kAuto, false, nullptr},
                          {Dtype::kFloat16, Math::kTensorCores, true, nullptr},
                          {Dtype::kFloat16, Math::kTensorCores, false, nullptr},
                          {Dtype::kFloat16, Math::kCudaCores, true, nullptr},
                          {Dtype::kFloat16, Math::kTensorCores, true, &ring3},
                          {Dtype::kFloat16, Math::kTensorCores, true, &blocks},
                          {Dtype::kFloat16, Math::kTensorCores, true, &wide},
                          {Dtype::kFloat16, Math::kTensorCores, true, &warps2},
                          {Dtype::kFloat16, Math::kTensorCores, true, &warps64},
                          {Dtype::kFloat16, Math::kTensorCores, true, &warps8},
                          {Dtype::kFloat16, Math::kTensorCores, true, &capped4},
                          {Dtype::kFloat16, Math::kTensorCores, true, &capped8}};
    const Result want32 = reference(make_inputs(c, Dtype::kFloat32, 1234));
    const Result want16 = reference(make_inputs(c, Dtype::kFloat16, 1234));
    for (const Mode& m : modes) {
      ++run;
      if (!check_case(c, want32, want16, m.dtype, m.math, m.pipeline, m.tuning)) ++failed;
    }
    // op version 2, both ways of passing the buffer: float32, float16 with each attend kernel (blocks, warps)
    for (Layout layout : {Layout::kSharedInPlace, Layout::kSharedCopy})
      for (const Mode& m : {modes[0], modes[6], modes[10]}) {
        ++run;
        if (!check_case(c, want32, want16, m.dtype, m.math, m.pipeline, m.tuning, true, layout)) ++failed;
      }
  }
  std::printf("{\"summary\": true, \"checks\": %d, \"failed\": %d}\n", run, failed);
  return failed || run == 0 ? 1 : 0;
}
