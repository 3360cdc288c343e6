// The op's attributes (export/op_spec.md) as both kernels' onnxruntime glue reads them: the CPU kernel
// (mla_attention.cc) and the CUDA kernel's (mla_attention_cuda.cc). onnxruntime's lite custom-op header
// only: nvcc never compiles this file.
#pragma once

#include <cstdint>
#include <vector>

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
