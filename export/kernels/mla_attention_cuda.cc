// onnxruntime glue of the CUDA kernel of mla_zoo.MultiHeadLatentAttention (compiled by the host C++
// compiler: nvcc cannot compile onnxruntime's lite custom-op header). It checks the shapes exactly as
// the CPU kernel does (mla_attention_common.h), allocates the outputs and the scratch memory through
// onnxruntime, takes the CUDA EP's compute stream and enqueues the kernels of mla_attention_cuda.cu.
// Nothing here waits for the device.
//
// Headers: only the C/C++ and lite custom-op API of Debian trixie's libonnxruntime-dev (1.21), the same
// as the CPU kernel; the CUDA EP's own headers (core/providers/cuda/cuda_context.h) are not needed:
// the stream comes from Ort::KernelContext::GetGPUComputeStream and scratch memory from
// Ort::KernelContext::GetAllocator with the memory info of an input (the CUDA EP's allocator).

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mla_attention_common.h"
#include "mla_attention_cuda.h"
#include "mla_attention_ort.h"
#include "onnxruntime_lite_custom_op.h"

namespace mla_zoo {
namespace {

template <typename T>
constexpr cuda::Dtype dtype_of();
template <>
constexpr cuda::Dtype dtype_of<float>() { return cuda::Dtype::kFloat32; }
template <>
constexpr cuda::Dtype dtype_of<Ort::Float16_t>() { return cuda::Dtype::kFloat16; }

// Device memory from the allocator that made the op's inputs (the CUDA EP's arena), returned when
// the call ends. That is safe with the kernels still running: onnxruntime hands the block out again
// only to work enqueued later on the same stream, as its own CUDA kernels' scratch buffers.
class Scratch {
 public:
  Scratch(const Ort::KernelContext& ctx, size_t bytes) {
    if (bytes == 0) return;
    Ort::ConstMemoryInfo info = ctx.GetInput(0).GetTensorMemoryInfo();
    allocator_ = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(info));
    ptr_ = allocator_->Alloc(allocator_, bytes);
    if (ptr_ == nullptr) throw std::runtime_error("could not allocate " + std::to_string(bytes) + " bytes of scratch");
  }
  ~Scratch() {
    if (ptr_ != nullptr) allocator_->Free(allocator_, ptr_);
    if (allocator_ != nullptr) Ort::GetApi().ReleaseAllocator(allocator_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  OrtAllocator* allocator_ = nullptr;
  void* ptr_ = nullptr;
};

template <typename T>
struct MultiHeadLatentAttentionCuda : MlaAttributes {
  MultiHeadLatentAttentionCuda(const OrtApi*, const OrtKernelInfo* info) : MlaAttributes(info) {}

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<T>& query,
                      const Ort::Custom::Tensor<T>& latent, const Ort::Custom::Tensor<T>& key_rope,
                      const Ort::Custom::Tensor<T>& past_latent, const Ort::Custom::Tensor<T>& past_key_rope,
                      const Ort::Custom::Tensor<int64_t>& attention_mask, const Ort::Custom::Tensor<T>& cos,
                      const Ort::Custom::Tensor<T>& sin, const Ort::Custom::Tensor<T>& w_uk,
                      const Ort::Custom::Tensor<T>& w_uv,
                      std::optional<const Ort::Custom::Tensor<int64_t>*> past_length,  // version 2, host memory
                      Ort::Custom::Tensor<T>& output, Ort::Custom::Tensor<T>& present_latent,
                      Ort::Custom::Tensor<T>& present_key_rope) {
    try {
      // version 2's P is read on the host (the launch plan needs it): not capturable in a CUDA graph yet
      const MlaDims d = check_shapes(
          num_heads, num_kv_heads, rope_pairs,
          {query.Shape(), latent.Shape(), key_rope.Shape(), past_latent.Shape(), past_key_rope.Shape(),
           attention_mask.Shape(), cos.Shape(), sin.Shape(), w_uk.Shape(), w_uv.Shape()},
          read_past_length(past_length));
      cuda::Outputs out;
      out.output = output.Allocate({d.B, d.S, d.H * d.dv});
      out.present_latent = present_latent.Allocate({d.B, 1, d.present_rows, d.r});
      out.present_key_rope = present_key_rope.Allocate({d.B, 1, d.present_rows, d.KR});
      if (d.shared_buffer)
        expect_both_shared_or_neither(out.present_latent == past_latent.DataRaw(),
                                      out.present_key_rope == past_key_rope.DataRaw());
      if (d.B == 0 || d.S == 0) return Ort::Status{nullptr};

      Ort::KernelContext ctx(context);
      const cuda::Plan plan = cuda::make_plan(d, dtype_of<T>(), cuda::current_device());
      Scratch scratch(ctx, plan.scratch_bytes());
      cuda::Inputs in;
      in.query = query.Data();
      in.latent = latent.Data();
      in.key_rope = key_rope.Data();
      in.past_latent = d.past_rows ? past_latent.Data() : nullptr;
      in.past_key_rope = d.past_rows ? past_key_rope.Data() : nullptr;
      in.attention_mask = attention_mask.Data();
      in.cos = cos.Data();
      in.sin = sin.Data();
      in.w_uk = w_uk.Data();
      in.w_uv = w_uv.Data();
      const std::string error = cuda::launch(d, rope_pairs, scale, dtype_of<T>(), plan, in, out, scratch.get(),
                                             ctx.GetGPUComputeStream());
      if (!error.empty()) return Ort::Status((std::string(kOpName) + ": " + error).c_str(), ORT_FAIL);
    } catch (const ShapeError& e) {
      return Ort::Status((std::string(kOpName) + ": " + e.message).c_str(), ORT_INVALID_ARGUMENT);
    } catch (const std::exception& e) {
      return Ort::Status((std::string(kOpName) + ": " + e.what()).c_str(), ORT_FAIL);
    }
    return Ort::Status{nullptr};
  }
};

}  // namespace

#ifdef MLA_ZOO_CUDA_EMULATION
constexpr const char* kProvider = "CPUExecutionProvider";  // tests: the kernels emulated on the CPU
#else
constexpr const char* kProvider = "CUDAExecutionProvider";
#endif

// Registers the CUDA kernels (float, float16) under the CPU kernels' domain, name and version.
// version 2's past_length (input 10) in CPU memory: the launch plan needs P on the host
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t index) {
  return index == 10 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
}

void add_cuda_kernels(Ort::CustomOpDomain& domain) {
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> f32{
      Ort::Custom::CreateLiteCustomOp<MultiHeadLatentAttentionCuda<float>>(kOpName, kProvider, kOpVersion)};
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> f16{
      Ort::Custom::CreateLiteCustomOp<MultiHeadLatentAttentionCuda<Ort::Float16_t>>(kOpName, kProvider,
                                                                                    kOpVersion)};
  f32->GetInputMemoryType = input_memory;
  f16->GetInputMemoryType = input_memory;
  domain.Add(f32.get());
  domain.Add(f16.get());
}

}  // namespace mla_zoo
