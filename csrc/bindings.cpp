// Torch bindings of the hand-written kernels, registered as ops in the lowrank_fused_C namespace
// (loaded by importing lowrank_fused._C). The GEMMs stay in Python on cuBLAS (backends/cuda.py).
// The CUDA stream comes from Python (torch.cuda.current_stream().cuda_stream) and the caller
// makes the tensors' device current: no c10/cuda headers, so this file also compile-checks
// against a CPU build of torch.
#include <optional>

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

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2, "lowrank_fused_C: ", name,
              " must be a 2-D CUDA tensor, got ", t.dim(), "-D on ", t.device());
}

void check_fp32_rows(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  check_matrix(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.size(0) == rows &&
                  t.size(1) == cols,
              "lowrank_fused_C: ", name, " must be a contiguous float32 (", rows, ", ", cols,
              ") tensor, got ", t.scalar_type(), " ", t.sizes());
}

// P = scale · drop(input) · fᵀ: input (M, K), f (R, K), both through their strides.
at::Tensor project(const at::Tensor& input, const at::Tensor& f, double scale, int64_t seed,
                   double p, at::ScalarType out_dtype, int64_t stream) {
  check_matrix(input, "input");
  check_matrix(f, "f");
  TORCH_CHECK(input.size(1) == f.size(1), "project: input (M, K) and f (R, K) expected, got ",
              input.sizes(), " and ", f.sizes());
  auto out = at::empty({input.size(0), f.size(0)}, input.options().dtype(out_dtype));
  RankPassArgs args{input.data_ptr(), dtype_code(input.scalar_type()), input.stride(0),
                    input.stride(1), f.data_ptr(), dtype_code(f.scalar_type()), f.stride(0),
                    f.stride(1), nullptr, kFloat32, out.data_ptr(), dtype_code(out_dtype),
                    nullptr, nullptr, input.size(0), input.size(1), f.size(0),
                    static_cast<float>(scale), static_cast<uint64_t>(seed),
                    static_cast<float>(p)};
  launch_rank_pass(args, as_stream(stream));
  return out;
}

// One read of G (M, N): returns dP = scale · G · B_eff (fp32, M x R; empty unless need_dp) and
// adds scale · Gᵀ · P into db (fp32 N x R) and the column sums of G into dbias (fp32 N), each
// only when given.
at::Tensor grad_output_pass(const at::Tensor& grad_y, const at::Tensor& b_eff,
                            const std::optional<at::Tensor>& p, double scale, bool need_dp,
                            const std::optional<at::Tensor>& db,
                            const std::optional<at::Tensor>& dbias, int64_t stream) {
  check_matrix(grad_y, "grad_y");
  check_matrix(b_eff, "b_eff");
  const int64_t m = grad_y.size(0), n = grad_y.size(1), r = b_eff.size(1);
  TORCH_CHECK(b_eff.size(0) == n, "grad_output_pass: grad_y (M, N) and b_eff (N, R) expected, "
              "got ", grad_y.sizes(), " and ", b_eff.sizes());
  if (db) {
    check_fp32_rows(*db, n, r, "db");
    TORCH_CHECK(p && p->is_contiguous() && p->size(0) == m && p->size(1) == r,
                "grad_output_pass: db needs p, a contiguous (", m, ", ", r, ") tensor");
  }
  if (dbias) {
    TORCH_CHECK(dbias->is_cuda() && dbias->scalar_type() == at::kFloat &&
                    dbias->is_contiguous() && dbias->numel() == n,
                "grad_output_pass: dbias must be a contiguous float32 CUDA tensor of ", n,
                " elements");
  }
  auto dp = at::empty({need_dp ? m : 0, r}, grad_y.options().dtype(at::kFloat));
  const bool with_db = db.has_value();
  RankPassArgs args{grad_y.data_ptr(), dtype_code(grad_y.scalar_type()), grad_y.stride(0),
                    grad_y.stride(1), b_eff.data_ptr(), dtype_code(b_eff.scalar_type()),
                    b_eff.stride(1), b_eff.stride(0),
                    with_db ? p->data_ptr() : nullptr,
                    with_db ? dtype_code(p->scalar_type()) : kFloat32,
                    need_dp ? dp.data_ptr() : nullptr, kFloat32,
                    with_db ? db->data_ptr<float>() : nullptr,
                    dbias ? dbias->data_ptr<float>() : nullptr, m, n, r,
                    static_cast<float>(scale), 0, 0.f};
  launch_rank_pass(args, as_stream(stream));
  return dp;
}

// dA = dPᵀ · drop(x) in fp32 (R x K); M is split `splits` ways (1: deterministic).
at::Tensor grad_a(const at::Tensor& dp, const at::Tensor& x, int64_t seed, double p,
                  int64_t splits, int64_t stream) {
  check_matrix(x, "x");
  check_fp32_rows(dp, x.size(0), dp.size(1), "dp");
  TORCH_CHECK(splits >= 1, "grad_a: splits must be >= 1, got ", splits);
  auto da = at::zeros({dp.size(1), x.size(1)}, x.options().dtype(at::kFloat));
  launch_grad_a(dp.data_ptr<float>(), x.data_ptr(), dtype_code(x.scalar_type()), x.stride(0),
                x.stride(1), da.data_ptr<float>(), x.size(0), x.size(1), dp.size(1),
                static_cast<int>(splits), static_cast<uint64_t>(seed), static_cast<float>(p),
                as_stream(stream));
  return da;
}

// dx += drop(dP · A), in place on a contiguous dx (M, K).
void add_dropped_low_rank_(at::Tensor dx, const at::Tensor& dp, const at::Tensor& a,
                           int64_t seed, double p, int64_t stream) {
  check_matrix(dx, "dx");
  check_matrix(a, "a");
  TORCH_CHECK(dx.is_contiguous(), "add_dropped_low_rank_: dx must be contiguous");
  check_fp32_rows(dp, dx.size(0), a.size(0), "dp");
  TORCH_CHECK(a.size(1) == dx.size(1), "add_dropped_low_rank_: a (R, K) with K = ", dx.size(1),
              " expected, got ", a.sizes());
  launch_add_dropped_low_rank(dx.data_ptr(), dtype_code(dx.scalar_type()),
                              dp.data_ptr<float>(), a.data_ptr(), dtype_code(a.scalar_type()),
                              a.stride(0), a.stride(1), dx.size(0), dx.size(1), a.size(0),
                              static_cast<uint64_t>(seed), static_cast<float>(p),
                              as_stream(stream));
}

at::Tensor keep_mask(const at::Tensor& like, int64_t rows, int64_t cols, int64_t seed,
                     double p, int64_t stream) {
  auto out = at::empty({rows, cols}, like.options().dtype(at::kByte));
  launch_keep_mask(out.data_ptr<uint8_t>(), rows, cols, static_cast<uint64_t>(seed),
                   static_cast<float>(p), as_stream(stream));
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
  m.def("add_dropped_low_rank_(Tensor(a!) dx, Tensor dp, Tensor a, int seed, float p, "
        "int stream) -> ()");
  m.def("keep_mask(Tensor like, int rows, int cols, int seed, float p, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank_fused_C, CUDA, m) {
  m.impl("project", &lowrank_fused::project);
  m.impl("grad_output_pass", &lowrank_fused::grad_output_pass);
  m.impl("grad_a", &lowrank_fused::grad_a);
  m.impl("add_dropped_low_rank_", &lowrank_fused::add_dropped_low_rank_);
  m.impl("keep_mask", &lowrank_fused::keep_mask);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "lowrank_fused CUDA kernels; the ops live in torch.ops.lowrank_fused_C";
}
