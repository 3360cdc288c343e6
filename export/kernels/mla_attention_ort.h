// The op's attributes (export/op_spec.md) as both kernels' onnxruntime glue reads them: the CPU kernel
// (mla_attention.cc) and the CUDA kernel's (mla_attention_cuda.cc). onnxruntime's lite custom-op header
// only: nvcc never compiles this file.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "mla_attention_common.h"

#include "onnxruntime_lite_custom_op.h"

struct MlaAttributes {
  int64_t num_heads = 0, num_kv_heads = 0;
  std::vector<int64_t> rope_pairs;  // [n_kv, R] row-major
  float scale = 1.f;

  explicit MlaAttributes(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    num_heads = ki.GetAttribute<int64_t>("num_heads");
    num_kv_heads = ki.GetAttribute<int64_t>("num_kv_heads");
    rope_pairs = ki.GetAttributes<int64_t>("rope_pairs");
    scale = ki.GetAttribute<float>("scale");
  }
};

// Version 2's optional input 10 (op_spec.md): the past's length in the shared buffer, or -1 when absent
// (version 1: the past is its whole tensor). In CPU memory for both kernels.
inline int64_t read_past_length(const std::optional<const Ort::Custom::Tensor<int64_t>*>& past_length) {
  if (!past_length.has_value() || *past_length == nullptr) return -1;
  const auto& n = **past_length;
  mla_zoo::expect(n.NumberOfElement() == 1 && n.Data()[0] >= 0,
                  "input 'past_length' must hold one value >= 0, got shape " + mla_zoo::shape_str(n.Shape()));
  return n.Data()[0];
}
