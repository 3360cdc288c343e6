// The shape contract of mla_zoo.MultiHeadLatentAttention (export/op_spec.md), checked the same way by
// every implementation: the CPU kernel (mla_attention.cc), the CUDA kernel's onnxruntime glue
// (mla_attention_cuda.cc) and the standalone CUDA harness (cuda_harness.cu). No onnxruntime or CUDA
// headers here, so nvcc and g++ both compile it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace mla_zoo {

constexpr const char* kDomain = "mla_zoo";
constexpr const char* kOpName = "MultiHeadLatentAttention";
constexpr int kOpVersion = 1;
// Version 2 (op_spec.md "Version 2") adds the optional input `past_length`: past and present are then one
// buffer. The CPU and CUDA kernels and the function body implement it; `export --shared-cache` writes it.

// Every dimension of one call, derived from the attributes and the input shapes.
struct MlaDims {
  int64_t B = 0, S = 0, P = 0, T = 0;  // batch, new tokens per row, past length, T = P + S
  int64_t H = 0, n_kv = 0, G = 0;      // query heads, KV heads, query heads per KV head
  int64_t R = 0, E = 0, KR = 0;        // RoPE pairs per KV head, E = 2R, KR = n_kv * E (key_rope width)
  int64_t hd = 0, dn = 0, r = 0, dv = 0;  // head dim, NoPE dims hd - E, latent width r, value dim
  int64_t C = 0;                       // width of cos / sin
  // rows per batch row of the cache tensors and columns of the mask: version 1: P (past), T (present),
  // T (mask); version 2: the buffer's capacity for all three
  int64_t past_rows = 0, present_rows = 0, mask_cols = 0;
  bool shared_buffer = false;  // version 2: past and present are (copies of) one buffer
};

struct ShapeError {
  std::string message;
};

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

inline void expect(bool ok, const std::string& what) {
  if (!ok) throw ShapeError{what};
}

inline void expect_shape(const char* name, const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); ++i) ok = want[i] < 0 || got[i] == want[i];
  if (!ok) {
    std::ostringstream s;
    s << "input '" << name << "' has shape " << shape_str(got) << ", expected " << shape_str(want)
      << " (-1 = any; see mla_zoo export/op_spec.md)";
    throw ShapeError{s.str()};
  }
}

// The input shapes in the op's input order (op_spec.md).
struct MlaShapes {
  std::vector<int64_t> query, latent, key_rope, past_latent, past_key_rope, attention_mask, cos, sin, w_uk, w_uv;
};

// Checks every shape against the attributes and the others; throws ShapeError with a clear message.
// shared_past_length >= 0: version 2, the past is that many rows of a buffer of capacity rows (the
// past's third dim), and the mask covers the capacity; version 1 (-1): the past is its whole tensor.
inline MlaDims check_shapes(int64_t num_heads, int64_t num_kv_heads, const std::vector<int64_t>& rope_pairs,
                            const MlaShapes& in, int64_t shared_past_length = -1) {
  MlaDims d;
  d.H = num_heads;
  d.n_kv = num_kv_heads;
  expect(d.H > 0 && d.n_kv > 0 && d.H % d.n_kv == 0, "num_heads must be a positive multiple of num_kv_heads");
  expect(!rope_pairs.empty() && rope_pairs.size() % d.n_kv == 0, "rope_pairs must hold n_kv * R >= 1 indices");
  expect(*std::min_element(rope_pairs.begin(), rope_pairs.end()) >= 0, "rope_pairs must be >= 0");
  d.R = static_cast<int64_t>(rope_pairs.size()) / d.n_kv;
  d.E = 2 * d.R;
  d.G = d.H / d.n_kv;
  d.KR = d.n_kv * d.E;
  const auto& qs = in.query;
  expect(qs.size() == 3 && qs[2] % d.H == 0,
         "input 'query' must be [B, S, num_heads * head_dim], got " + shape_str(qs));
  d.B = qs[0];
  d.S = qs[1];
  d.hd = qs[2] / d.H;
  d.dn = d.hd - d.E;
  expect(d.dn >= 0, "head_dim is smaller than the RoPE dims 2R");
  expect(in.latent.size() == 3, "input 'latent' must be [B, S, r], got " + shape_str(in.latent));
  d.r = in.latent[2];
  expect_shape("latent", in.latent, {d.B, d.S, d.r});
  expect_shape("key_rope", in.key_rope, {d.B, d.S, d.KR});
  expect(in.past_latent.size() == 4, "input 'past_latent' must be [B, 1, P, r], got " + shape_str(in.past_latent));
  const int64_t rows = in.past_latent[2];
  d.P = shared_past_length >= 0 ? shared_past_length : rows;
  d.T = d.P + d.S;
  if (shared_past_length >= 0) {
    std::ostringstream s;
    s << "input 'past_length' is " << d.P << ": " << d.P << " past + " << d.S << " new rows do not fit the "
      << rows << " rows of 'past_latent'";
    expect(d.T <= rows, s.str());
  }
  d.shared_buffer = shared_past_length >= 0;
  d.past_rows = rows;
  d.present_rows = shared_past_length >= 0 ? rows : d.T;
  d.mask_cols = d.present_rows;
  expect_shape("past_latent", in.past_latent, {d.B, 1, rows, d.r});
  expect_shape("past_key_rope", in.past_key_rope, {d.B, 1, rows, d.KR});
  expect_shape("attention_mask", in.attention_mask, {d.B, d.mask_cols});
  const int64_t half = *std::max_element(rope_pairs.begin(), rope_pairs.end()) + 1;
  const auto& cs = in.cos;
  expect(cs.size() == 3 && cs[0] == d.B && cs[1] == d.S && cs[2] >= half,
         "input 'cos' must be [B, S, >= max(rope_pairs) + 1], got " + shape_str(cs));
  expect_shape("sin", in.sin, cs);
  d.C = cs[2];
  expect_shape("w_uk", in.w_uk, {d.n_kv, d.dn, d.r});
  expect(in.w_uv.size() == 3, "input 'w_uv' must be [n_kv, d_v, r], got " + shape_str(in.w_uv));
  d.dv = in.w_uv[1];
  expect_shape("w_uv", in.w_uv, {d.n_kv, d.dv, d.r});
  return d;
}

// Version 2: both presents bound to their pasts' buffers (only the new rows are written), or neither.
inline void expect_both_shared_or_neither(bool latent_shared, bool key_rope_shared) {
  expect(latent_shared == key_rope_shared,
         "present_latent and present_key_rope must both share their past's buffer, or neither");
}

}  // namespace mla_zoo
