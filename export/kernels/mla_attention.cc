// onnxruntime CPU kernel of mla_zoo.MultiHeadLatentAttention (contract: export/op_spec.md).
//
// Absorbed multi-head latent attention over the latent KV cache. Per call:
//   A. per query token (b, s): rotate the new RoPE key and write it and the new latent into the
//      presents; rotate the query's RoPE dims and absorb W_uk into its NoPE dims (q_lat), pre-scaled;
//   B. copy the past cache rows into the presents (prefill only: at decode, C copies each chunk
//      and attends to it while it is in cache, so the past is read once). Version 2 (an input
//      `past_length`): past and present are one buffer, nothing to copy when the caller bound them so;
//   C. per (b, s, KV chunk): scores of all H heads against the chunk (each latent row loaded once
//      for a block of 8 heads, accumulators in registers), masked softmax partials (max, sum, weighted
//      latent): split-K, so one decode token at batch 1 still spreads over every thread;
//   D. per (b, s): merge the chunk partials (log-sum-exp) and apply W_uv.
// Math in float32; inputs and outputs float32 or float16. Threads: onnxruntime's intra-op pool.
// The CPU and CUDA (mla_attention_cuda.cc / .cu, built with `mla-zoo build-kernels --cuda`) kernels are
// registered from this one library: RegisterCustomOps at the bottom is the single entry point.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define MLA_ZOO_AVX2 1
#endif
#if defined(MLA_ZOO_AVX2) && defined(__AVX512F__)
#define MLA_ZOO_AVX512 1
#if defined(__GNUC__) && !defined(__clang__)  // GCC 12's _mm512_extract* use _mm256_undefined_*: false alarms
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

#include "mla_attention_common.h"
#include "mla_attention_ort.h"
#include "onnxruntime_lite_custom_op.h"

#ifdef MLA_ZOO_CUDA
namespace mla_zoo {
void add_cuda_kernels(Ort::CustomOpDomain& domain);  // mla_attention_cuda.cc
}
#endif

namespace {

using mla_zoo::kDomain;
using mla_zoo::kOpName;
using mla_zoo::kOpVersion;
using mla_zoo::ShapeError;

// ---------------------------------------------------------------------------------------------
// float / float16 element access
// ---------------------------------------------------------------------------------------------

inline float to_float(float x) { return x; }
inline float to_float(Ort::Float16_t x) { return x.ToFloat(); }
template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline Ort::Float16_t from_float<Ort::Float16_t>(float x) { return Ort::Float16_t(x); }

// A float view of n contiguous elements: the data itself for float, a converted copy for float16.
inline const float* as_float(const float* src, size_t, std::vector<float>&) { return src; }
inline const float* as_float(const Ort::Float16_t* src, size_t n, std::vector<float>& buf) {
  buf.resize(n);
  size_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(buf.data() + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) buf[i] = src[i].ToFloat();
  return buf.data();
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// exp(x) for x <= 0 (softmax after max subtraction), vectorizable: 2^n * p(r), r in [-ln2/2, ln2/2],
// degree-6 polynomial; relative error ~2e-7 (float32 rounding level). exp(-inf) and x < -87 give 0.
inline void exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::max(x[i], -87.f);
    const float k = std::nearbyint(v * 1.44269504088896341f);
    const float r = v - k * 0.693145751953125f - k * 1.42860682030941723212e-6f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    x[i] = x[i] < -87.f ? 0.f : p * scale;
  }
}

// ---------------------------------------------------------------------------------------------
// The two inner loops of the attention, per chunk of L cached tokens:
//   scores:  sc[h, t] = q[h, :r] . c[t] + q[h, r:] . k[t, group(h)]   (q = [q_lat | q_rope], pre-scaled)
//   weights: o[h] += p[h, t] * c[t]
// AVX2 versions keep NH heads' accumulators in registers so each cached row is loaded once per block.
// ---------------------------------------------------------------------------------------------

#ifdef MLA_ZOO_AVX2
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// NH heads' accumulators in registers: the token's latent row is loaded once per block of heads.
template <int NH>
inline void scores_block(const float* q, int64_t qw, const float* c, const float* k, int64_t r, int64_t e,
                         const int64_t* k_offset, float* out) {
  __m256 acc[NH];
  for (int j = 0; j < NH; ++j) acc[j] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= r; d += 8) {
    const __m256 cv = _mm256_loadu_ps(c + d);
    for (int j = 0; j < NH; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * qw + d), cv, acc[j]);
  }
  int64_t x = 0;
  for (; x + 8 <= e; x += 8)
    for (int j = 0; j < NH; ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * qw + r + x), _mm256_loadu_ps(k + k_offset[j] + x), acc[j]);
  for (int j = 0; j < NH; ++j) {
    float s = hsum(acc[j]);
    for (int64_t dd = d; dd < r; ++dd) s += q[j * qw + dd] * c[dd];
    for (int64_t xx = x; xx < e; ++xx) s += q[j * qw + r + xx] * k[k_offset[j] + xx];
    out[j] = s;
  }
}
#endif

#ifdef MLA_ZOO_AVX512
// The same with 16 lanes and masked tails (any r, any 2R).
template <int NH>
inline void scores_block512(const float* q, int64_t qw, const float* c, const float* k, int64_t r, int64_t e,
                            const int64_t* k_offset, float* out) {
  __m512 acc[NH];
  for (int j = 0; j < NH; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < r; d += 16) {
    const __mmask16 mk = r - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (r - d)) - 1);
    const __m512 cv = _mm512_maskz_loadu_ps(mk, c + d);
    for (int j = 0; j < NH; ++j) acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + j * qw + d), cv, acc[j]);
  }
  for (int64_t x = 0; x < e; x += 16) {
    const __mmask16 mk = e - x >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (e - x)) - 1);
    for (int j = 0; j < NH; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + j * qw + r + x),
                               _mm512_maskz_loadu_ps(mk, k + k_offset[j] + x), acc[j]);
  }
  for (int j = 0; j < NH; ++j) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1));
    out[j] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[j]), hi));
  }
}
#endif

// sc[h * ld] for heads [0, H) of one token; q rows qw apart; k_offset[h] = group(h) * E.
inline void token_scores(const float* q, int64_t H, int64_t qw, const float* c, const float* k, int64_t r,
                         int64_t e, const int64_t* k_offset, float* sc, int64_t ld) {
  float tmp[8];
  const int64_t blocks = (H + 7) / 8, per_block = (H + blocks - 1) / blocks;  // balanced: 9 heads -> 5 + 4
  for (int64_t h0 = 0; h0 < H; h0 += per_block) {
    const int64_t nh = std::min<int64_t>(per_block, H - h0);
    const float* qh = q + h0 * qw;
    const int64_t* ko = k_offset + h0;
#if defined(MLA_ZOO_AVX512)
    switch (nh) {
      case 8: scores_block512<8>(qh, qw, c, k, r, e, ko, tmp); break;
      case 7: scores_block512<7>(qh, qw, c, k, r, e, ko, tmp); break;
      case 6: scores_block512<6>(qh, qw, c, k, r, e, ko, tmp); break;
      case 5: scores_block512<5>(qh, qw, c, k, r, e, ko, tmp); break;
      case 4: scores_block512<4>(qh, qw, c, k, r, e, ko, tmp); break;
      case 3: scores_block512<3>(qh, qw, c, k, r, e, ko, tmp); break;
      case 2: scores_block512<2>(qh, qw, c, k, r, e, ko, tmp); break;
      default: scores_block512<1>(qh, qw, c, k, r, e, ko, tmp); break;
    }
#elif defined(MLA_ZOO_AVX2)
    switch (nh) {
      case 8: scores_block<8>(qh, qw, c, k, r, e, ko, tmp); break;
      case 7: scores_block<7>(qh, qw, c, k, r, e, ko, tmp); break;
      case 6: scores_block<6>(qh, qw, c, k, r, e, ko, tmp); break;
      case 5: scores_block<5>(qh, qw, c, k, r, e, ko, tmp); break;
      case 4: scores_block<4>(qh, qw, c, k, r, e, ko, tmp); break;
      case 3: scores_block<3>(qh, qw, c, k, r, e, ko, tmp); break;
      case 2: scores_block<2>(qh, qw, c, k, r, e, ko, tmp); break;
      default: scores_block<1>(qh, qw, c, k, r, e, ko, tmp); break;
    }
#else
    for (int64_t j = 0; j < nh; ++j) tmp[j] = dot(qh + j * qw, c, r) + dot(qh + j * qw + r, k + ko[j], e);
#endif
    for (int64_t j = 0; j < nh; ++j) sc[(h0 + j) * ld] = tmp[j];
  }
}

// o[:r] += sum_t p[t] * c[t, :r] (rows of c are r apart)
inline void weighted_rows(const float* p, const float* c, int64_t L, int64_t r, float* o) {
  int64_t d = 0;
#if defined(MLA_ZOO_AVX512)
  for (; d + 64 <= r; d += 64) {
    __m512 a0 = _mm512_loadu_ps(o + d), a1 = _mm512_loadu_ps(o + d + 16);
    __m512 a2 = _mm512_loadu_ps(o + d + 32), a3 = _mm512_loadu_ps(o + d + 48);
    for (int64_t t = 0; t < L; ++t) {
      const __m512 pv = _mm512_set1_ps(p[t]);
      const float* ct = c + t * r + d;
      a0 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(ct), a0);
      a1 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(ct + 16), a1);
      a2 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(ct + 32), a2);
      a3 = _mm512_fmadd_ps(pv, _mm512_loadu_ps(ct + 48), a3);
    }
    _mm512_storeu_ps(o + d, a0);
    _mm512_storeu_ps(o + d + 16, a1);
    _mm512_storeu_ps(o + d + 32, a2);
    _mm512_storeu_ps(o + d + 48, a3);
  }
  for (; d < r; d += 16) {
    const __mmask16 mk = r - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (r - d)) - 1);
    __m512 a0 = _mm512_maskz_loadu_ps(mk, o + d);
    for (int64_t t = 0; t < L; ++t)
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), _mm512_maskz_loadu_ps(mk, c + t * r + d), a0);
    _mm512_mask_storeu_ps(o + d, mk, a0);
  }
#elif defined(MLA_ZOO_AVX2)
  for (; d + 32 <= r; d += 32) {
    __m256 a0 = _mm256_loadu_ps(o + d), a1 = _mm256_loadu_ps(o + d + 8);
    __m256 a2 = _mm256_loadu_ps(o + d + 16), a3 = _mm256_loadu_ps(o + d + 24);
    for (int64_t t = 0; t < L; ++t) {
      const __m256 pv = _mm256_set1_ps(p[t]);
      const float* ct = c + t * r + d;
      a0 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(ct), a0);
      a1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(ct + 8), a1);
      a2 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(ct + 16), a2);
      a3 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(ct + 24), a3);
    }
    _mm256_storeu_ps(o + d, a0);
    _mm256_storeu_ps(o + d + 8, a1);
    _mm256_storeu_ps(o + d + 16, a2);
    _mm256_storeu_ps(o + d + 24, a3);
  }
  for (; d + 8 <= r; d += 8) {
    __m256 a0 = _mm256_loadu_ps(o + d);
    for (int64_t t = 0; t < L; ++t) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(c + t * r + d), a0);
    _mm256_storeu_ps(o + d, a0);
  }
#endif
  if (d < r)
    for (int64_t t = 0; t < L; ++t) axpy(o + d, p[t], c + t * r + d, r - d);
}

// Runs f(i) for i in [0, n) on onnxruntime's intra-op thread pool.
template <typename F>
void parallel_for(Ort::KernelContext& ctx, size_t n, F& f) {
  if (n == 0) return;
  if (n == 1) {
    f(0);
    return;
  }
  ctx.ParallelFor([](void* data, size_t i) { (*static_cast<F*>(data))(i); }, n, 0, &f);
}

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

template <typename T>
struct MultiHeadLatentAttention : MlaAttributes {
  MultiHeadLatentAttention(const OrtApi*, const OrtKernelInfo* info) : MlaAttributes(info) {}

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<T>& query,
                      const Ort::Custom::Tensor<T>& latent, const Ort::Custom::Tensor<T>& key_rope,
                      const Ort::Custom::Tensor<T>& past_latent, const Ort::Custom::Tensor<T>& past_key_rope,
                      const Ort::Custom::Tensor<int64_t>& attention_mask, const Ort::Custom::Tensor<T>& cos,
                      const Ort::Custom::Tensor<T>& sin, const Ort::Custom::Tensor<T>& w_uk,
                      const Ort::Custom::Tensor<T>& w_uv,
                      std::optional<const Ort::Custom::Tensor<int64_t>*> past_length,  // version 2 (op_spec.md)
                      Ort::Custom::Tensor<T>& output, Ort::Custom::Tensor<T>& present_latent,
                      Ort::Custom::Tensor<T>& present_key_rope) {
    try {
      Run(context, query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv,
          output, present_latent, present_key_rope, read_past_length(past_length));
    } catch (const ShapeError& e) {
      return Ort::Status((std::string(kOpName) + ": " + e.message).c_str(), ORT_INVALID_ARGUMENT);
    } catch (const std::exception& e) {
      return Ort::Status((std::string(kOpName) + ": " + e.what()).c_str(), ORT_FAIL);
    }
    return Ort::Status{nullptr};
  }

  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<T>& query, const Ort::Custom::Tensor<T>& latent,
           const Ort::Custom::Tensor<T>& key_rope, const Ort::Custom::Tensor<T>& past_latent,
           const Ort::Custom::Tensor<T>& past_key_rope, const Ort::Custom::Tensor<int64_t>& attention_mask,
           const Ort::Custom::Tensor<T>& cos, const Ort::Custom::Tensor<T>& sin, const Ort::Custom::Tensor<T>& w_uk,
           const Ort::Custom::Tensor<T>& w_uv, Ort::Custom::Tensor<T>& output,
           Ort::Custom::Tensor<T>& present_latent, Ort::Custom::Tensor<T>& present_key_rope,
           int64_t shared_length) {  // version 2: the past's length in the shared buffer; version 1: -1
    // ---- shapes (every mismatch is a clear error, never a crash) ----
    const mla_zoo::MlaDims dims = mla_zoo::check_shapes(
        num_heads, num_kv_heads, rope_pairs,
        {query.Shape(), latent.Shape(), key_rope.Shape(), past_latent.Shape(), past_key_rope.Shape(),
         attention_mask.Shape(), cos.Shape(), sin.Shape(), w_uk.Shape(), w_uv.Shape()},
        shared_length);
    const int64_t H = dims.H, n_kv = dims.n_kv, R = dims.R, E = dims.E, G = dims.G;
    const int64_t B = dims.B, S = dims.S, hd = dims.hd, dn = dims.dn, r = dims.r, P = dims.P, Tt = dims.T;
    const int64_t dv = dims.dv, C = dims.C, KR = dims.KR;
    const int64_t PR = dims.past_rows, TR = dims.present_rows, MC = dims.mask_cols;  // rows per batch row
    const bool v2 = dims.shared_buffer;

    const T* q_in = query.Data();
    const T* lat_in = latent.Data();
    const T* kr_in = key_rope.Data();
    const T* plat = past_latent.Data();
    const T* pkr = past_key_rope.Data();
    const int64_t* mask = attention_mask.Data();
    const T* cos_in = cos.Data();
    const T* sin_in = sin.Data();
    T* out = output.Allocate({B, S, H * dv});
    T* lat_out = present_latent.Allocate({B, 1, TR, r});
    T* kr_out = present_key_rope.Allocate({B, 1, TR, KR});
    // version 2: present bound to the past's buffer (the caller's doing: IOBinding, a preallocated output)
    // means only the new rows move; otherwise the present starts as a copy of the whole buffer
    const bool shared = lat_out == plat;
    if (v2) mla_zoo::expect_both_shared_or_neither(shared, kr_out == pkr);
    if (v2 && !shared && B > 0) {
      std::memcpy(lat_out, plat, sizeof(T) * B * PR * r);
      std::memcpy(kr_out, pkr, sizeof(T) * B * PR * KR);
    }
    if (B == 0 || S == 0) return;

    std::vector<float> wuk_buf, wuv_buf;
    const float* wuk = as_float(w_uk.Data(), static_cast<size_t>(n_kv * dn * r), wuk_buf);  // [n_kv, dn, r]
    const float* wuv = as_float(w_uv.Data(), static_cast<size_t>(n_kv * dv * r), wuv_buf);  // [n_kv, dv, r]
    Ort::KernelContext ctx(context);

    // ---- A. new rows of the presents; rotated, absorbed, pre-scaled queries ----
    const int64_t QW = r + E;  // per head: [q_lat (r) | q_rope (2R)]
    std::vector<float> qbuf(static_cast<size_t>(B * S * H * QW));
    auto phase_a = [&](size_t i) {
      const int64_t b = static_cast<int64_t>(i) / S, s = static_cast<int64_t>(i) % S;
      const T* q = q_in + (b * S + s) * H * hd;
      const T* k = kr_in + (b * S + s) * KR;
      const T* cs_row = cos_in + (b * S + s) * C;
      const T* sn_row = sin_in + (b * S + s) * C;
      const int64_t row = b * TR + P + s;
      std::copy(lat_in + (b * S + s) * r, lat_in + (b * S + s + 1) * r, lat_out + row * r);
      std::vector<float> c(R), sn(R), qn(dn);
      for (int64_t g = 0; g < n_kv; ++g) {
        for (int64_t j = 0; j < R; ++j) {
          c[j] = to_float(cs_row[rope_pairs[g * R + j]]);
          sn[j] = to_float(sn_row[rope_pairs[g * R + j]]);
        }
        for (int64_t j = 0; j < R; ++j) {  // y = x * [c, c] + rotate_half(x) * [s, s]
          const float x1 = to_float(k[g * E + j]), x2 = to_float(k[g * E + R + j]);
          kr_out[row * KR + g * E + j] = from_float<T>(x1 * c[j] - x2 * sn[j]);
          kr_out[row * KR + g * E + R + j] = from_float<T>(x2 * c[j] + x1 * sn[j]);
        }
        for (int64_t h = g * G; h < (g + 1) * G; ++h) {
          const T* qh = q + h * hd;  // [rope 2R | nope dn]
          float* dst = qbuf.data() + (i * H + h) * QW;
          float* q_lat = dst;
          float* q_rope = dst + r;
          for (int64_t j = 0; j < R; ++j) {
            const float x1 = to_float(qh[j]), x2 = to_float(qh[R + j]);
            q_rope[j] = scale * (x1 * c[j] - x2 * sn[j]);
            q_rope[R + j] = scale * (x2 * c[j] + x1 * sn[j]);
          }
          for (int64_t d = 0; d < dn; ++d) qn[d] = scale * to_float(qh[E + d]);
          std::fill(q_lat, q_lat + r, 0.f);
          for (int64_t d = 0; d < dn; ++d) axpy(q_lat, qn[d], wuk + (g * dn + d) * r, r);  // W_uk^T q_nope
        }
      }
    };
    parallel_for(ctx, static_cast<size_t>(B * S), phase_a);

    // ---- B (version 1, prefill and chunked prefill only). past rows of the presents ----
    // For one query per row (decode), phase C copies each chunk of the past itself and attends to it
    // while it is in cache: the past is read once. Version 2 copied (or shares) them above.
    const bool fused_copy = !v2 && S == 1;
    if (!v2 && !fused_copy) {
      const int64_t copy_rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, r + KR));
      const int64_t copy_chunks = (P + copy_rows - 1) / copy_rows;
      auto phase_b = [&](size_t i) {
        const int64_t b = static_cast<int64_t>(i) / copy_chunks;
        const int64_t t0 = (static_cast<int64_t>(i) % copy_chunks) * copy_rows, t1 = std::min(P, t0 + copy_rows);
        std::memcpy(lat_out + (b * TR + t0) * r, plat + (b * PR + t0) * r, sizeof(T) * (t1 - t0) * r);
        std::memcpy(kr_out + (b * TR + t0) * KR, pkr + (b * PR + t0) * KR, sizeof(T) * (t1 - t0) * KR);
      };
      parallel_for(ctx, static_cast<size_t>(B * copy_chunks), phase_b);
    }

    // ---- C. split-K partial attention: per (b, s, chunk) and head: max, sum, weighted latent ----
    const int64_t queries = B * S;
    const int64_t want_tasks = 64;
    const int64_t n_chunks = std::max<int64_t>(
        1, std::min<int64_t>((Tt + 255) / 256, (want_tasks + queries - 1) / queries));
    const int64_t chunk = (Tt + n_chunks - 1) / n_chunks;
    const int64_t PW = r + 2;  // per head partial: [o_lat (r) | max | sum]
    std::vector<int64_t> k_offset(static_cast<size_t>(H));  // head h reads its group's RoPE key
    for (int64_t h = 0; h < H; ++h) k_offset[h] = (h / G) * E;
    std::vector<float> part(static_cast<size_t>(queries * n_chunks * H * PW));
    const float neg_inf = -std::numeric_limits<float>::infinity();
    auto phase_c = [&](size_t i) {
      const int64_t qi = static_cast<int64_t>(i) / n_chunks, ci = static_cast<int64_t>(i) % n_chunks;
      const int64_t b = qi / S, s = qi % S, self = P + s;
      const int64_t t0 = ci * chunk;
      if (fused_copy && t0 < P) {  // this chunk's past rows -> present (decode: phase B did not run)
        const int64_t c1 = std::min(P, t0 + chunk);
        std::memcpy(lat_out + (b * TR + t0) * r, plat + (b * PR + t0) * r, sizeof(T) * (c1 - t0) * r);
        std::memcpy(kr_out + (b * TR + t0) * KR, pkr + (b * PR + t0) * KR, sizeof(T) * (c1 - t0) * KR);
      }
      const int64_t t1 = std::min(self + 1, std::min(Tt, t0 + chunk));  // causal: t <= self
      float* pt = part.data() + i * H * PW;
      for (int64_t h = 0; h < H; ++h) {
        std::fill(pt + h * PW, pt + h * PW + r, 0.f);
        pt[h * PW + r] = neg_inf;
        pt[h * PW + r + 1] = 0.f;
      }
      if (t1 <= t0) return;
      const int64_t L = t1 - t0;
      std::vector<float> cbuf, kbuf, sc(static_cast<size_t>(H * L));
      const float* c = as_float(lat_out + (b * TR + t0) * r, static_cast<size_t>(L * r), cbuf);
      const float* k = as_float(kr_out + (b * TR + t0) * KR, static_cast<size_t>(L * KR), kbuf);
      const float* qv = qbuf.data() + qi * H * QW;
      const int64_t* m = mask + b * MC;
      for (int64_t t = 0; t < L; ++t) {
        if (m[t0 + t] == 0 && t0 + t != self) {
          for (int64_t h = 0; h < H; ++h) sc[h * L + t] = neg_inf;
        } else {
          token_scores(qv, H, QW, c + t * r, k + t * KR, r, E, k_offset.data(), sc.data() + t, L);
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* row = sc.data() + h * L;
        float mx = neg_inf;
        for (int64_t t = 0; t < L; ++t) mx = std::max(mx, row[t]);
        if (mx == neg_inf) continue;
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) row[t] -= mx;
        exp_inplace(row, L);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; ++t) sum += row[t];
        pt[h * PW + r] = mx;
        pt[h * PW + r + 1] = sum;
      }
      // weighted latent sums, 32 tokens at a time so each tile is read from L1 by every head
      constexpr int64_t TT = 32;
      for (int64_t tt = 0; tt < L; tt += TT) {
        const int64_t n = std::min(TT, L - tt);
        for (int64_t h = 0; h < H; ++h)
          if (pt[h * PW + r] != neg_inf) weighted_rows(sc.data() + h * L + tt, c + tt * r, n, r, pt + h * PW);
      }
    };
    parallel_for(ctx, static_cast<size_t>(queries * n_chunks), phase_c);

    // ---- D. merge the chunks, then W_uv ----
    auto phase_d = [&](size_t qi) {
      std::vector<float> o(r);
      for (int64_t h = 0; h < H; ++h) {
        float mx = neg_inf;
        for (int64_t ci = 0; ci < n_chunks; ++ci) mx = std::max(mx, part[((qi * n_chunks + ci) * H + h) * PW + r]);
        std::fill(o.begin(), o.end(), 0.f);
        float total = 0.f;
        for (int64_t ci = 0; ci < n_chunks; ++ci) {
          const float* pt = part.data() + ((qi * n_chunks + ci) * H + h) * PW;
          if (pt[r] == neg_inf) continue;
          const float w = std::exp(pt[r] - mx);
          total += w * pt[r + 1];
          axpy(o.data(), w, pt, r);
        }
        const float inv = 1.f / total;
        const int64_t g = h / G;
        T* dst = out + (static_cast<int64_t>(qi) * H + h) * dv;
        for (int64_t d = 0; d < dv; ++d) dst[d] = from_float<T>(inv * dot(wuv + (g * dv + d) * r, o.data(), r));
      }
    };
    parallel_for(ctx, static_cast<size_t>(queries), phase_d);
  }
};

// ---------------------------------------------------------------------------------------------
// Registration (one domain, one library: the CPU kernels here, the CUDA kernels when built with them)
// ---------------------------------------------------------------------------------------------

[[maybe_unused]] void add_cpu_kernels(Ort::CustomOpDomain& domain) {
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> f32{
      Ort::Custom::CreateLiteCustomOp<MultiHeadLatentAttention<float>>(kOpName, "CPUExecutionProvider", kOpVersion)};
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> f16{
      Ort::Custom::CreateLiteCustomOp<MultiHeadLatentAttention<Ort::Float16_t>>(kOpName, "CPUExecutionProvider",
                                                                                kOpVersion)};
  domain.Add(f32.get());
  domain.Add(f16.get());
}

std::mutex registration_mutex;
std::vector<Ort::CustomOpDomain> domains;  // must outlive every session that uses them

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an onnxruntime older than the headers: nothing we can report through
  Ort::InitApi(api);
  try {
    std::lock_guard<std::mutex> lock(registration_mutex);
    Ort::CustomOpDomain domain{kDomain};
#if defined(MLA_ZOO_CUDA_EMULATION)
    mla_zoo::add_cuda_kernels(domain);  // tests only: the CUDA kernels, emulated on the CPU provider
#else
    add_cpu_kernels(domain);
#ifdef MLA_ZOO_CUDA
    mla_zoo::add_cuda_kernels(domain);
#endif
#endif
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// The version of the op contract this library implements (checked by mla_zoo.export.kernels.build).
__attribute__((visibility("default"))) int MlaZooOpVersion() { return kOpVersion; }

// 1 when this library also registers the CUDA kernels (built with `mla-zoo build-kernels --cuda`);
// 2 for the test build that runs them emulated on the CPU provider (cuda_emulation.h); 0 otherwise.
__attribute__((visibility("default"))) int MlaZooHasCuda() {
#if defined(MLA_ZOO_CUDA_EMULATION)
  return 2;
#elif defined(MLA_ZOO_CUDA)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
