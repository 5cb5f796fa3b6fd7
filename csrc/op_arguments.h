// The ops' argument handling: shape, stride and dtype checks, and the arguments each launcher
// gets. Torch-free, so that bindings.cpp (on at::Tensor) and tests/cuda_emulation/shim.cpp (on
// CPU tensors, run on the emulated kernels) go through this same code, and a marshalling bug
// here fails the CPU tests. Outputs are allocated by the caller and checked here.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "lowrank_kernels.cuh"

namespace lowrank_fused {

// A strided 2-D view; a 1-D tensor of n elements is n x 1.
struct Matrix {
  void* data;
  DType dtype;
  int64_t rows, cols, stride_r, stride_c;
};

struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Parts> [[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream out;
  out << "lowrank_fused_C: ";
  (out << ... << parts);
  throw ArgumentError(out.str());
}

inline const char* dtype_name(DType dt) {
  return dt == kFloat32 ? "float32" : (dt == kFloat16 ? "float16" : "bfloat16");
}

inline bool is_contiguous(const Matrix& t) {
  return (t.cols <= 1 || t.stride_c == 1) && (t.rows <= 1 || t.stride_r == t.cols);
}

// `t` must be a contiguous rows x cols matrix, of `dtype` unless dtype is nullptr.
inline void require_rows(const Matrix& t, int64_t rows, int64_t cols, const DType* dtype,
                         const char* name) {
  if (t.rows != rows || t.cols != cols || !is_contiguous(t) ||
      (dtype != nullptr && t.dtype != *dtype)) {
    fail(name, " must be a contiguous ", dtype ? dtype_name(*dtype) : "", " (", rows, ", ", cols,
         ") tensor, got ", dtype_name(t.dtype), " (", t.rows, ", ", t.cols, ") with strides (",
         t.stride_r, ", ", t.stride_c, ")");
  }
}
inline constexpr DType kF32 = kFloat32;
}  // namespace detail

// out (M, R) = scale · drop(input) · fᵀ: input (M, K), f (R, K), both through their strides.
inline void run_project(const Matrix& input, const Matrix& f, const Matrix& out, float scale,
                        uint64_t seed, float p_drop, cudaStream_t stream) {
  if (input.cols != f.cols)
    detail::fail("project: input (M, K) and f (R, K) expected, got (", input.rows, ", ",
                 input.cols, ") and (", f.rows, ", ", f.cols, ")");
  detail::require_rows(out, input.rows, f.rows, nullptr, "project: out");
  launch_rank_pass(RankPassArgs{input.data, input.dtype, input.stride_r, input.stride_c, f.data,
                                f.dtype, f.stride_r, f.stride_c, nullptr, kFloat32, out.data,
                                out.dtype, nullptr, nullptr, input.rows, input.cols, f.rows,
                                scale, seed, p_drop},
                   stream);
}

// One read of G (M, N): dp (fp32 M x R) = scale · G · B_eff, db (fp32 N x R) += scale · Gᵀ · P
// and dbias (fp32 N) += column sums of G, each only when not nullptr (db needs p, M x R).
inline void run_grad_output_pass(const Matrix& grad_y, const Matrix& b_eff, const Matrix* p,
                                 float scale, const Matrix* dp, const Matrix* db,
                                 const Matrix* dbias, cudaStream_t stream) {
  const int64_t m = grad_y.rows, n = grad_y.cols, r = b_eff.cols;
  if (b_eff.rows != n)
    detail::fail("grad_output_pass: grad_y (M, N) and b_eff (N, R) expected, got (", m, ", ", n,
                 ") and (", b_eff.rows, ", ", r, ")");
  if (dp) detail::require_rows(*dp, m, r, &detail::kF32, "grad_output_pass: dp");
  if (db) {
    detail::require_rows(*db, n, r, &detail::kF32, "grad_output_pass: db");
    if (!p) detail::fail("grad_output_pass: db needs p");
    detail::require_rows(*p, m, r, nullptr, "grad_output_pass: p");
  }
  if (dbias) detail::require_rows(*dbias, n, 1, &detail::kF32, "grad_output_pass: dbias");
  // f = B_effᵀ (R x N): its row stride is B_eff's column stride and vice versa.
  launch_rank_pass(RankPassArgs{grad_y.data, grad_y.dtype, grad_y.stride_r, grad_y.stride_c,
                                b_eff.data, b_eff.dtype, b_eff.stride_c, b_eff.stride_r,
                                db ? p->data : nullptr, db ? p->dtype : kFloat32,
                                dp ? dp->data : nullptr, kFloat32,
                                db ? static_cast<float*>(db->data) : nullptr,
                                dbias ? static_cast<float*>(dbias->data) : nullptr, m, n, r,
                                scale, 0, 0.f},
                   stream);
}

// da (fp32 R x K, zeroed by the caller) = dpᵀ · drop(x): dp fp32 (M, R), x (M, K) through its
// strides; M is split `splits` ways (1: deterministic).
inline void run_grad_a(const Matrix& dp, const Matrix& x, const Matrix& da, int64_t splits,
                       uint64_t seed, float p_drop, cudaStream_t stream) {
  detail::require_rows(dp, x.rows, dp.cols, &detail::kF32, "grad_a: dp");
  detail::require_rows(da, dp.cols, x.cols, &detail::kF32, "grad_a: da");
  if (splits < 1) detail::fail("grad_a: splits must be >= 1, got ", splits);
  launch_grad_a(static_cast<const float*>(dp.data), x.data, x.dtype, x.stride_r, x.stride_c,
                static_cast<float*>(da.data), x.rows, x.cols, dp.cols, static_cast<int>(splits),
                seed, p_drop, stream);
}

// out (M, K, contiguous) = drop(dp · a): dp fp32 (M, R), a (R, K) through its strides.
inline void run_dropped_low_rank(const Matrix& out, const Matrix& dp, const Matrix& a,
                                 uint64_t seed, float p_drop, cudaStream_t stream) {
  detail::require_rows(out, out.rows, out.cols, nullptr, "dropped_low_rank: out");
  detail::require_rows(dp, out.rows, a.rows, &detail::kF32, "dropped_low_rank: dp");
  if (a.cols != out.cols)
    detail::fail("dropped_low_rank: a (R, K) with K = ", out.cols, " expected, got (", a.rows,
                 ", ", a.cols, ")");
  launch_dropped_low_rank(out.data, out.dtype, static_cast<const float*>(dp.data), a.data,
                          a.dtype, a.stride_r, a.stride_c, out.rows, out.cols, a.rows, seed,
                          p_drop, stream);
}

}  // namespace lowrank_fused
