// Hand-written CUDA for the rank-r, memory-bound parts of the operator (one read of x or G,
// fp32 accumulation, 128-bit-friendly coalesced loads along K).
//
// Main GEMMs (y = x·Wᵀ + bias, dx = G·W) run on cuBLAS through ATen (see bindings.cpp), with the
// low-rank term accumulated into the same output by a second cuBLAS call (beta = 1). A CUTLASS
// kernel with the K-extension ([x | s·P]·[W | B_eff]ᵀ in one accumulator) would save that extra
// read and write of the M x N output; the choice is to be made by measurement on a GPU, which
// this first version has not had (see benchmarks/results/ once it has).
#include "lowrank_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lowrank_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kRanksPerBlock = 8;  // accumulators per thread

__device__ __forceinline__ float to_float(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// Counter-based uniform in [0, 1) from (seed, index): splitmix64 finaliser.
__device__ __forceinline__ float uniform(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits
}

__device__ __forceinline__ bool keep(uint64_t seed, uint64_t index, float p) {
  return uniform(seed, index) >= p;
}

// One block per (row m, group of kRanksPerBlock ranks): threads stride over K, then reduce.
__global__ void skinny_projection_kernel(const void* in, DType in_dt, int64_t in_sm,
                                         int64_t in_sk, const void* f, DType f_dt, int64_t f_sj,
                                         int64_t f_sk, void* out, DType out_dt, int64_t K,
                                         int64_t R, float scale, uint64_t seed, float p) {
  const int64_t m = blockIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRanksPerBlock;
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  float acc[kRanksPerBlock] = {0.f};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float v = to_float(in, in_dt, m * in_sm + k * in_sk);
    if (p > 0.f) v = keep(seed, static_cast<uint64_t>(m * K + k), p) ? v * keep_scale : 0.f;
#pragma unroll
    for (int j = 0; j < kRanksPerBlock; ++j) {
      if (j0 + j < R) acc[j] += v * to_float(f, f_dt, (j0 + j) * f_sj + k * f_sk);
    }
  }
  __shared__ float partial[kThreads / 32][kRanksPerBlock];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kRanksPerBlock; ++j) {
    float v = acc[j];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x < kRanksPerBlock && j0 + threadIdx.x < R) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w][threadIdx.x];
    store(out, out_dt, m * R + j0 + threadIdx.x, scale * total);
  }
}

__global__ void dropout_inplace_kernel(void* t, DType dt, int64_t total, int64_t K,
                                       uint64_t seed, float p) {
  const float keep_scale = 1.f / (1.f - p);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_float(t, dt, i);
    store(t, dt, i, keep(seed, static_cast<uint64_t>(i), p) ? v * keep_scale : 0.f);
  }
}

__global__ void keep_mask_kernel(uint8_t* out, int64_t total, uint64_t seed, float p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = keep(seed, static_cast<uint64_t>(i), p) ? 1 : 0;
  }
}

unsigned int elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace

void launch_skinny_projection(const void* in, DType in_dtype, int64_t in_stride_m,
                              int64_t in_stride_k, const void* f, DType f_dtype,
                              int64_t f_stride_j, int64_t f_stride_k, void* out, DType out_dtype,
                              int64_t M, int64_t K, int64_t R, float scale, uint64_t seed,
                              float p, cudaStream_t stream) {
  if (M == 0 || R == 0) return;
  const dim3 grid(static_cast<unsigned int>(M),
                  static_cast<unsigned int>((R + kRanksPerBlock - 1) / kRanksPerBlock));
  skinny_projection_kernel<<<grid, kThreads, 0, stream>>>(in, in_dtype, in_stride_m, in_stride_k,
                                                          f, f_dtype, f_stride_j, f_stride_k,
                                                          out, out_dtype, K, R, scale, seed, p);
}

void launch_dropout_inplace(void* t, DType dtype, int64_t M, int64_t K, uint64_t seed, float p,
                            cudaStream_t stream) {
  const int64_t total = M * K;
  if (total == 0) return;
  dropout_inplace_kernel<<<elementwise_blocks(total), kThreads, 0, stream>>>(t, dtype, total, K,
                                                                           seed, p);
}

void launch_keep_mask(uint8_t* out, int64_t M, int64_t K, uint64_t seed, float p,
                      cudaStream_t stream) {
  const int64_t total = M * K;
  if (total == 0) return;
  keep_mask_kernel<<<elementwise_blocks(total), kThreads, 0, stream>>>(out, total, seed, p);
}

}  // namespace lowrank_fused
