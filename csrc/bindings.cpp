// Torch bindings of the hand-written kernels, registered as ops in the lowrank_fused_C namespace
// (loaded by importing lowrank_fused._C). The GEMMs stay in Python on cuBLAS (backends/cuda.py).
// The CUDA stream comes from Python (torch.cuda.current_stream().cuda_stream) and the caller
// makes the tensors' device current: no c10/cuda headers, so this file also compile-checks
// against a CPU build of torch.
#include <torch/extension.h>
#include <torch/library.h>

#include "lowrank_kernels.cuh"

namespace lowrank_fused {
namespace {

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "lowrank_fused cuda backend: expected float32, float16 or "
                                "bfloat16, got ", t);
  }
}

at::Tensor skinny_projection(const at::Tensor& input, const at::Tensor& f, double scale,
                             int64_t seed, double p, at::ScalarType out_dtype, int64_t stream) {
  TORCH_CHECK(input.is_cuda() && f.is_cuda(), "skinny_projection: CUDA tensors expected");
  TORCH_CHECK(input.dim() == 2 && f.dim() == 2 && input.size(1) == f.size(1),
              "skinny_projection: input (M, K) and f (R, K) expected, got ", input.sizes(),
              " and ", f.sizes());
  auto out = at::empty({input.size(0), f.size(0)}, input.options().dtype(out_dtype));
  launch_skinny_projection(input.data_ptr(), dtype_code(input.scalar_type()), input.stride(0),
                           input.stride(1), f.data_ptr(), dtype_code(f.scalar_type()),
                           f.stride(0), f.stride(1), out.data_ptr(), dtype_code(out_dtype),
                           input.size(0), input.size(1), f.size(0), static_cast<float>(scale),
                           static_cast<uint64_t>(seed), static_cast<float>(p),
                           reinterpret_cast<cudaStream_t>(stream));
  return out;
}

void dropout_(at::Tensor t, int64_t seed, double p, int64_t stream) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous(),
              "dropout_: a contiguous 2-D CUDA tensor expected");
  launch_dropout_inplace(t.data_ptr(), dtype_code(t.scalar_type()), t.size(0), t.size(1),
                         static_cast<uint64_t>(seed), static_cast<float>(p),
                         reinterpret_cast<cudaStream_t>(stream));
}

at::Tensor keep_mask(const at::Tensor& like, int64_t rows, int64_t cols, int64_t seed,
                     double p, int64_t stream) {
  auto out = at::empty({rows, cols}, like.options().dtype(at::kByte));
  launch_keep_mask(out.data_ptr<uint8_t>(), rows, cols, static_cast<uint64_t>(seed),
                   static_cast<float>(p), reinterpret_cast<cudaStream_t>(stream));
  return out.to(at::kBool);
}

}  // namespace
}  // namespace lowrank_fused

TORCH_LIBRARY(lowrank_fused_C, m) {
  m.def("skinny_projection(Tensor input, Tensor f, float scale, int seed, float p, "
        "ScalarType out_dtype, int stream) -> Tensor");
  m.def("dropout_(Tensor(a!) t, int seed, float p, int stream) -> ()");
  m.def("keep_mask(Tensor like, int rows, int cols, int seed, float p, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank_fused_C, CUDA, m) {
  m.impl("skinny_projection", &lowrank_fused::skinny_projection);
  m.impl("dropout_", &lowrank_fused::dropout_);
  m.impl("keep_mask", &lowrank_fused::keep_mask);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lowrank_fused CUDA kernels; the ops live in torch.ops.lowrank_fused_C";
}
