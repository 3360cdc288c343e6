// Standalone check of the CUDA kernel of mla_zoo.MultiHeadLatentAttention, without onnxruntime:
// random inputs -> the kernels of mla_attention_cuda.cu on the GPU -> compared with a float64 CPU
// reference written from export/op_spec.md (not from either kernel). For when onnxruntime-gpu cannot
// run on the GPU machine, and to test both float16 paths (tensor cores and CUDA cores).
//
//   mla_zoo_cuda_harness                 # every case, float32 and float16 (both paths); exit 1 on failure
//   mla_zoo_cuda_harness --case NAME     # one case
//   mla_zoo_cuda_harness --quick         # the small cases only (the CPU emulation in CI)
//   mla_zoo_cuda_harness --bench [--contexts 2048,8192,32768 --batches 1,16 --iters 50]
//                                        # decode latency at SmolLM2-MLA's dims (float16) + copy bandwidth
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
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "mla_attention_cuda.h"

using mla_zoo::MlaDims;
using mla_zoo::cuda::Dtype;
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

void setup(Run& run, const Tensors& t, Dtype dtype, Math math, bool pipeline = true) {
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
  run.plan = mla_zoo::cuda::make_plan(d, dtype, mla_zoo::cuda::current_device(), math, pipeline);
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

bool check_case(const Case& c, const Result& want32, const Result& want16, Dtype dtype, Math math, bool pipeline) {
  const Tensors t = make_inputs(c, dtype, 1234);
  const Result& want = dtype == Dtype::kFloat16 ? want16 : want32;
  Run run;
  setup(run, t, dtype, math, pipeline);
  const std::string err = mla_zoo::cuda::launch(t.d, t.pairs, static_cast<float>(t.scale), dtype, run.plan, run.in,
                                                run.out, run.scratch.ptr, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  const MlaDims& d = t.d;
  const Error out = compare(to_host(run.output, d.B * d.S * d.H * d.dv, dtype), want.output);
  const Error lat = compare(to_host(run.present_latent, d.B * d.T * d.r, dtype), want.present_latent);
  const Error kr = compare(to_host(run.present_key_rope, d.B * d.T * d.KR, dtype), want.present_key_rope);
  // float32: fp32 accumulation against float64; float16: fp16 inputs are exact, the queries and the
  // probabilities are rounded to fp16 for the tensor cores, the outputs on the way out
  const bool fp16 = dtype == Dtype::kFloat16;
  const double out_tol = fp16 ? 1e-2 : 2e-5, rope_tol = fp16 ? 1e-3 : 1e-6;
  const bool ok = err.empty() && out.finite && lat.finite && kr.finite && out.rel() < out_tol && lat.max_abs == 0 &&
                  kr.rel() < rope_tol;
  std::printf(
      "{\"case\": \"%s\", \"dtype\": \"%s\", \"math\": \"%s\", \"tensor_cores\": %s, \"pipelined\": %s, "
      "\"block_m\": %d, \"block_n\": %d, "
      "\"row_blocks\": %lld, \"splits\": %lld, \"output_rel_err\": %.3e, \"present_latent_max_abs\": %.3e, "
      "\"present_key_rope_rel_err\": %.3e, \"tolerance\": %.0e, \"error\": \"%s\", \"ok\": %s}\n",
      c.name.c_str(), fp16 ? "float16" : "float32", math_name(math), run.plan.tensor_cores ? "true" : "false",
      run.plan.pipelined ? "true" : "false", run.plan.block_m, run.plan.block_n, static_cast<long long>(run.plan.row_blocks),
      static_cast<long long>(run.plan.splits), out.rel(), lat.max_abs, kr.rel(), out_tol, err.c_str(),
      ok ? "true" : "false");
  std::fflush(stdout);
  return ok;
}

// Decode latency of the whole op (3 kernels) at SmolLM2-MLA's dims in float16, and the device's copy bandwidth.
void bench(const std::vector<int64_t>& contexts, const std::vector<int64_t>& batches, int iters) {
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
      auto once = [&] {
        const std::string err = mla_zoo::cuda::launch(t.d, t.pairs, static_cast<float>(t.scale), Dtype::kFloat16,
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
      // the contract's traffic: read the past once, write the present once (+ the small new rows)
      const double bytes = 2.0 * (d.B * d.P * (d.r + d.KR)) + 2.0 * (d.B * d.T * (d.r + d.KR));
      std::printf(
          "{\"bench\": \"decode\", \"dims\": \"smollm2-mla H=9 n_kv=3 r=96 KR=24 fp16\", \"context\": %lld, "
          "\"batch\": %lld, \"us_median\": %.2f, \"us_min\": %.2f, \"bytes\": %.0f, \"gb_per_s\": %.1f, "
          "\"splits\": %lld, \"block_m\": %d, \"block_n\": %d}\n",
          static_cast<long long>(T), static_cast<long long>(B), us, 1e3 * times.front(), bytes,
          bytes / (us * 1e-6) / 1e9, static_cast<long long>(run.plan.splits), run.plan.block_m, run.plan.block_n);
      std::fflush(stdout);
    }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
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
  bool do_bench = false, quick = false;
  std::vector<int64_t> contexts{2048, 8192, 32768}, batches{1, 16};
  int iters = 50;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--case" && i + 1 < argc) {
      only = argv[++i];
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--bench") {
      do_bench = true;
    } else if (a == "--contexts" && i + 1 < argc) {
      contexts = parse_list(argv[++i]);
    } else if (a == "--batches" && i + 1 < argc) {
      batches = parse_list(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::printf("usage: %s [--case NAME] [--quick] | --bench [--contexts 2048,8192,32768] [--batches 1,16] [--iters 50]\n",
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
    bench(contexts, batches, iters);
    return 0;
  }
  int failed = 0, run = 0;
  for (const Case& c : cases()) {
    if ((!only.empty() && c.name != only) || (quick && !c.quick)) continue;
    struct Mode {
      Dtype dtype;
      Math math;
      bool pipeline;
    };
    const Mode modes[] = {{Dtype::kFloat32, Math::kAuto, true},
                          {Dtype::kFloat32, Math::kAuto, false},
                          {Dtype::kFloat16, Math::kTensorCores, true},
                          {Dtype::kFloat16, Math::kTensorCores, false},
                          {Dtype::kFloat16, Math::kCudaCores, true}};
    const Result want32 = reference(make_inputs(c, Dtype::kFloat32, 1234));
    const Result want16 = reference(make_inputs(c, Dtype::kFloat16, 1234));
    for (const Mode& m : modes) {
      ++run;
      if (!check_case(c, want32, want16, m.dtype, m.math, m.pipeline)) ++failed;
    }
  }
  std::printf("{\"summary\": true, \"checks\": %d, \"failed\": %d}\n", run, failed);
  return failed || run == 0 ? 1 : 0;
}
