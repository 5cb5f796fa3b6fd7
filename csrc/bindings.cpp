// Torch bindings of the hand-written kernels, registered as ops in the lowrank_fused_C namespace
// (loaded by importing lowrank_fused._C). The GEMMs stay in Python on cuBLAS (backends/cuda.py).
// The CUDA stream comes from Python (torch.cuda.current_stream().cuda_stream) and the caller
// makes the tensors' device current: no c10/cuda headers, so this file also compile-checks
// against a CPU build of torch.
#include <optional>

#include <torch/extension.h>
#include <torch/library.h>

#include "op_arguments.h"

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

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The view op_arguments.h checks: a 1-D tensor of n elements is n x 1.
Matrix view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && (t.dim() == 1 || t.dim() == 2), "lowrank_fused_C: ", name,
              " must be a 1-D or 2-D CUDA tensor, got ", t.dim(), "-D on ", t.device());
  const bool matrix = t.dim() == 2;
  return Matrix{t.data_ptr(), dtype_code(t.scalar_type()), t.size(0), matrix ? t.size(1) : 1,
                t.stride(0), matrix ? t.stride(1) : 1};
}

// Runs an op_arguments.h entry or a launcher: its ArgumentError raised as a torch ValueError,
// a failed launch (LaunchError) as a RuntimeError.
template <typename Body> void checked(Body body) {
  try {
    body();
  } catch (const ArgumentError& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const LaunchError& e) {
    TORCH_CHECK(false, e.what());
  }
}

at::Tensor project(const at::Tensor& input, const at::Tensor& f, double scale, int64_t seed,
                   double p, at::ScalarType out_dtype, int64_t stream) {
  const Matrix in = view(input, "input"), f_view = view(f, "f");
  auto out = at::empty({in.rows, f_view.rows}, input.options().dtype(out_dtype));
  checked([&] {
    run_project(in, f_view, view(out, "out"), static_cast<float>(scale),
                static_cast<uint64_t>(seed), static_cast<float>(p), as_stream(stream));
  });
  return out;
}

// Returns dP (fp32, M x R; empty unless need_dp) and adds into db and dbias when given.
at::Tensor grad_output_pass(const at::Tensor& grad_y, const at::Tensor& b_eff,
                            const std::optional<at::Tensor>& p, double scale, bool need_dp,
                            const std::optional<at::Tensor>& db,
                            const std::optional<at::Tensor>& dbias, int64_t stream) {
  const Matrix g = view(grad_y, "grad_y"), b = view(b_eff, "b_eff");
  auto dp = at::empty({need_dp ? g.rows : 0, b.cols}, grad_y.options().dtype(at::kFloat));
  checked([&] {
    const Matrix dp_view = view(dp, "dp");
    const std::optional<Matrix> p_view = p ? std::optional(view(*p, "p")) : std::nullopt;
    const std::optional<Matrix> db_view = db ? std::optional(view(*db, "db")) : std::nullopt;
    const std::optional<Matrix> dbias_view =
        dbias ? std::optional(view(*dbias, "dbias")) : std::nullopt;
    run_grad_output_pass(g, b, p_view ? &*p_view : nullptr, static_cast<float>(scale),
                         need_dp ? &dp_view : nullptr, db_view ? &*db_view : nullptr,
                         dbias_view ? &*dbias_view : nullptr, as_stream(stream));
  });
  return dp;
}

at::Tensor grad_a(const at::Tensor& dp, const at::Tensor& x, int64_t seed, double p,
                  int64_t splits, int64_t stream) {
  const Matrix dp_view = view(dp, "dp"), x_view = view(x, "x");
  auto da = at::zeros({dp_view.cols, x_view.cols}, x.options().dtype(at::kFloat));
  checked([&] {
    run_grad_a(dp_view, x_view, view(da, "da"), splits,
               static_cast<uint64_t>(seed), static_cast<float>(p), as_stream(stream));
  });
  return da;
}

// drop(dP · A) as a new contiguous (M, K) tensor of out_dtype.
at::Tensor dropped_low_rank(const at::Tensor& dp, const at::Tensor& a, int64_t seed, double p,
                            at::ScalarType out_dtype, int64_t stream) {
  const Matrix dp_view = view(dp, "dp"), a_view = view(a, "a");
  auto out = at::empty({dp_view.rows, a_view.cols}, a.options().dtype(out_dtype));
  checked([&] {
    run_dropped_low_rank(view(out, "out"), dp_view, a_view,
                         static_cast<uint64_t>(seed), static_cast<float>(p), as_stream(stream));
  });
  return out;
}

at::Tensor keep_mask(const at::Tensor& like, int64_t rows, int64_t cols, int64_t seed,
                     double p, int64_t stream) {
  auto out = at::empty({rows, cols}, like.options().dtype(at::kByte));
  checked([&] {
    launch_keep_mask(out.data_ptr<uint8_t>(), rows, cols, static_cast<uint64_t>(seed),
                     static_cast<float>(p), as_stream(stream));
  });
  return out.to(at::kBool);
}

}  // namespace
}  // namespace lowrank_fused

TORCH_LIBRARY(lowrank_fused_C, m) {
  m.def("project(Tensor input, Tensor f, float scale, int seed, float p, ScalarType out_dtype, "
        "int stream) -> Tensor");
  m.def("grad_output_pass(Tensor grad_y, Tensor b_eff, Tensor? p, float scale, bool need_dp, "
        "Tensor(a!)? db, Tensor(b!)? dbias, int stream) -> Tensor");
  m.def("grad_a(Tensor dp, Tensor x, int seed, float p, int splits, int stream) -> Tensor");
  m.def("dropped_low_rank(Tensor dp, Tensor a, int seed, float p, ScalarType out_dtype, "
        "int stream) -> Tensor");
  m.def("keep_mask(Tensor like, int rows, int cols, int seed, float p, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank_fused_C, CUDA, m) {
  m.impl("project", &lowrank_fused::project);
  m.impl("grad_output_pass", &lowrank_fused::grad_output_pass);
  m.impl("grad_a", &lowrank_fused::grad_a);
  m.impl("dropped_low_rank", &lowrank_fused::dropped_low_rank);
  m.impl("keep_mask", &lowrank_fused::keep_mask);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lowrank_fused CUDA kernels; the ops live in torch.ops.lowrank_fused_C";
}
