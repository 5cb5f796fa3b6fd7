// Launchers of the hand-written CUDA kernels (lowrank_kernels.cu). Plain CUDA, no torch headers,
// so nvcc compile-checks them anywhere, and tests/cuda_emulation/ runs them on the CPU.
// Dtype codes: 0 float32, 1 float16, 2 bfloat16. Every matrix is row-major unless strides say
// otherwise; "contiguous" means row-major with no padding. Numerics: over a 16-bit base (`in`, x
// or out in fp16/bf16) the products run on tensor cores with every other operand (f, p, dp, a)
// rounded to the base's dtype as it is loaded, fp32 accumulation; over an fp32 base, in fp32.
#pragma once
#include <cstdint>
#include <stdexcept>
#ifndef LOWRANK_FUSED_EMULATION
#include <cuda_runtime.h>
#endif

namespace lowrank_fused {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Thrown by a launcher whose kernel launch failed (cudaGetLastError right after it): the message
// names the kernel and gives CUDA's error string.
struct LaunchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One streaming pass over the rows of `in` (M x K, any strides), reading each element once:
//   out[m, j]  = scale * sum_k drop(in[m, k]) * f[j, k]            (M x R, contiguous; optional)
//   db[k, j]  += scale * sum_m in[m, k] * p[m, j]                  (K x R fp32, atomic; optional)
//   dbias[k]  += sum_m in[m, k]                                    (K fp32, atomic; optional)
// f (R x K) is addressed through its strides: f = A gives P = x·Aᵀ; in = G with f = B_effᵀ gives
// dP = s·G·B_eff, and with p = P the partial sums of dB_eff = s·Gᵀ·P and dbias in the same read.
// Dropout (p_drop > 0) keeps in[m, k] where keep(seed, m, k, p) (keep_mask.cuh) and scales it
// by 1 / (1 - p), p quantised to a multiple of 2^-24 by the caller.
struct RankPassArgs {
  const void* in; DType in_dtype; int64_t in_stride_m, in_stride_k;
  const void* f; DType f_dtype; int64_t f_stride_j, f_stride_k;
  const void* p; DType p_dtype;  // M x R contiguous; read only when db is set
  void* out; DType out_dtype;    // nullptr: no out
  float* db;                     // nullptr: no db
  float* dbias;                  // nullptr: no dbias
  int64_t M, K, R;
  float scale;
  uint64_t seed;
  float p_drop;
};
void launch_rank_pass(const RankPassArgs& args, cudaStream_t stream);

// da[j, k] (+)= sum_m dp[m, j] * drop(x[m, k]): dp fp32 M x R contiguous, x M x K (any strides),
// da fp32 R x K contiguous. M is cut into `splits` ranges run in parallel; with splits > 1 they
// are added atomically, so da must be zeroed first (splits == 1 is deterministic).
void launch_grad_a(const float* dp, const void* x, DType x_dtype, int64_t x_stride_m,
                   int64_t x_stride_k, float* da, int64_t M, int64_t K, int64_t R, int splits,
                   uint64_t seed, float p_drop, cudaStream_t stream);

// out[m, k] = drop(sum_j dp[m, j] * a[j, k]) for a contiguous M x K out: the dropout-masked
// low-rank term of the input gradient, written (not added) so that the G·W GEMM then adds into it
// with beta = 1 and dx is not read a second time. dp fp32 M x R contiguous, a (R x K) through its
// strides.
void launch_dropped_low_rank(void* out, DType out_dtype, const float* dp, const void* a,
                             DType a_dtype, int64_t a_stride_j, int64_t a_stride_k, int64_t M,
                             int64_t K, int64_t R, uint64_t seed, float p_drop,
                             cudaStream_t stream);

// out[m, k] = keep(seed, m, k, p) as 0/1 bytes: the mask every kernel above uses.
void launch_keep_mask(uint8_t* out, int64_t M, int64_t K, uint64_t seed, float p,
                      cudaStream_t stream);

}  // namespace lowrank_fused
