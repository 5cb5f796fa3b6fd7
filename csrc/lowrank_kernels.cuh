// Launchers of the hand-written CUDA kernels (lowrank_kernels.cu). Plain CUDA, no torch headers,
// so nvcc compile-checks them anywhere. Dtype codes: 0 float32, 1 float16, 2 bfloat16.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace lowrank_fused {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[m, j] = scale * sum_k drop(in[m, k]) * f[j, k]   (M x R, row-major, contiguous out)
// f is addressed through its strides, so f = A (r x K) gives P = x·Aᵀ and f = B_effᵀ gives G·B_eff.
// Dropout (p > 0) keeps in[m, k] where keep_mask(seed, m * K + k) and scales it by 1 / (1 - p).
void launch_skinny_projection(const void* in, DType in_dtype, int64_t in_stride_m,
                              int64_t in_stride_k, const void* f, DType f_dtype,
                              int64_t f_stride_j, int64_t f_stride_k, void* out, DType out_dtype,
                              int64_t M, int64_t K, int64_t R, float scale, uint64_t seed,
                              float p, cudaStream_t stream);

// t[m, k] *= keep(seed, m * K + k) / (1 - p), in place on a contiguous M x K tensor.
void launch_dropout_inplace(void* t, DType dtype, int64_t M, int64_t K, uint64_t seed, float p,
                            cudaStream_t stream);

// out[m, k] = keep(seed, m * K + k) as 0/1 bytes (the mask every kernel above uses).
void launch_keep_mask(uint8_t* out, int64_t M, int64_t K, uint64_t seed, float p,
                      cudaStream_t stream);

}  // namespace lowrank_fused
