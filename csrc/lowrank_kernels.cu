// Hand-written CUDA for the rank-r, memory-bound parts of the operator: each kernel streams x or
// G once, in 16-byte vector loads where the rows allow it, through shared-memory tiles, with
// fp32 accumulation on CUDA cores. Up to r = 16 that keeps them memory-bound (2r flops per
// 2-byte element sits at the H100's FP32 ridge, about 20 flops/byte); at r = 64 they become
// compute-bound at about 4x their memory time, and tensor-core (mma.sync) tiles would be the fix,
// if measurement shows these passes matter next to the GEMMs.
//
// Main GEMMs: cuBLAS, not CUTLASS, for now. y = x·Wᵀ + bias and dx = G·W run on cuBLAS through
// ATen (backends/cuda.py), and the low-rank term is added into the same output by a second
// cuBLAS call (beta = 1). What a CUTLASS K-extension ([x | s·P]·[W | B_eff]ᵀ in one accumulator)
// would save is that second call's read and write of the M x N output: at 8192 x 4096 bf16 that
// is 128 MiB, about 40 us at 3.35 TB/s next to a GEMM of about 0.45 ms on an H100, so roughly
// 9%, more than the 5% forward budget. The Triton backend already has the K-extension, so the
// measured cuda-vs-triton figures (benchmarks/results/, lowrank_fused/auto_policy.json) show
// whether that saving is real; a CUTLASS mainloop over two operand pairs (headers: the
// nvidia-cutlass wheel) is the next step if it is and Triton's GEMM trails cuBLAS. No GPU has
// been lent to this project yet, so neither figure exists.
#include "lowrank_kernels.cuh"
#include "keep_mask.cuh"

#ifndef LOWRANK_FUSED_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LF_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace lowrank_fused {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// For the small operands (f, p, a), whose dtype is a runtime argument.
__device__ __forceinline__ float load_float(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case kFloat16: return to_float(static_cast<const __half*>(base)[i]);
    case kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_float(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case kFloat16: static_cast<__half*>(base)[i] = from_float<__half>(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = from_float<__nv_bfloat16>(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// Loads rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of a strided T matrix into a float
// shared-memory tile, zero outside rows < row_end and columns < col_end. Each thread loads 8
// consecutive columns of one row: one or two 16-byte loads when the row is contiguous and
// aligned. Dropout keeps (row, col) where keep(seed, row, col, p) (keep_mask.cuh; mask_ld is
// unused since the mask takes (row, col)), and the kept value is rounded to T, as the
// reference's dropout(x) is.
template <typename T, int ROWS, int COLS, int PITCH>
__device__ __forceinline__ void load_tile(float (*tile)[PITCH], const T* src, int64_t stride_r,
                                          int64_t stride_c, int64_t r0, int64_t c0,
                                          int64_t row_end, int64_t col_end, int64_t mask_ld,
                                          uint64_t seed, float p_drop, float keep_scale) {
  static_assert(ROWS * COLS == kThreads * 8, "one 8-wide strip per thread");
  static_assert(16 % sizeof(T) == 0, "16-byte vectors of T");
  constexpr int kVecs = 8 * sizeof(T) / 16;
  const int row = threadIdx.x / (COLS / 8);
  const int col = (threadIdx.x % (COLS / 8)) * 8;
  const int64_t gr = r0 + row, gc = c0 + col;
  float v[8];
  if (gr < row_end) {
    const T* ptr = src + gr * stride_r + gc * stride_c;
    if (stride_c == 1 && gc + 8 <= col_end && reinterpret_cast<uintptr_t>(ptr) % 16 == 0) {
      uint4 raw[kVecs];
#pragma unroll
      for (int q = 0; q < kVecs; ++q) raw[q] = reinterpret_cast<const uint4*>(ptr)[q];
      const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = gc + i < col_end ? to_float(ptr[i * stride_c]) : 0.f;
    }
    if (p_drop > 0.f) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bool kept = keep(seed, gr, gc + i, p_drop);
        v[i] = to_float(from_float<T>(v[i] * (kept ? keep_scale : 0.f)));  // NaN·0 = NaN
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) tile[row][col + i] = v[i];
}

// ---- rank pass: out = s·drop(in)·fᵀ, with the dB and dbias partial sums of the same tiles ----

constexpr int kPassRows = 64;  // rows of `in` per block
constexpr int kPassCols = 32;  // columns of `in` per step of the streamed loop

// Block: kPassRows rows x RB ranks (grid.y covers R in RB-wide groups). Thread (ty, tx) of a
// 16 x 16 grid accumulates rows ty + 16·i and ranks tx + 16·c, so that a warp reads one row of
// in_tile (broadcast) and 16 consecutive rows of f_tile (pitch 33: distinct banks).
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads) rank_pass_kernel(RankPassArgs a) {
  constexpr int BM = kPassRows, BK = kPassCols;
  constexpr int kRowsPerThread = BM / 16, kRanksPerThread = RB / 16;
  __shared__ float in_tile[BM][BK + 1];
  __shared__ float f_tile[RB][BK + 1];
  __shared__ float p_tile[BM][RB + 1];
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * RB;
  const bool with_dbias = a.dbias != nullptr && blockIdx.y == 0;
  const float keep_scale = a.p_drop > 0.f ? 1.f / (1.f - a.p_drop) : 1.f;
  if (a.db != nullptr) {
    for (int i = t; i < BM * RB; i += kThreads) {
      const int mm = i / RB, jj = i % RB;
      p_tile[mm][jj] = m0 + mm < a.M && j0 + jj < a.R
                           ? load_float(a.p, a.p_dtype, (m0 + mm) * a.R + j0 + jj) : 0.f;
    }
  }
  float acc[kRowsPerThread][kRanksPerThread] = {};
  for (int64_t k0 = 0; k0 < a.K; k0 += BK) {
    load_tile<T, BM, BK, BK + 1>(in_tile, static_cast<const T*>(a.in), a.in_stride_m,
                                 a.in_stride_k, m0, k0, a.M, a.K, a.K, a.seed, a.p_drop,
                                 keep_scale);
    for (int i = t; i < RB * BK; i += kThreads) {
      const int jj = i / BK, kk = i % BK;
      f_tile[jj][kk] = j0 + jj < a.R && k0 + kk < a.K
                           ? load_float(a.f, a.f_dtype,
                                        (j0 + jj) * a.f_stride_j + (k0 + kk) * a.f_stride_k)
                           : 0.f;
    }
    __syncthreads();
    if (a.out != nullptr) {
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float fv[kRanksPerThread];
#pragma unroll
        for (int c = 0; c < kRanksPerThread; ++c) fv[c] = f_tile[tx + 16 * c][kk];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const float xv = in_tile[ty + 16 * i][kk];
#pragma unroll
          for (int c = 0; c < kRanksPerThread; ++c) acc[i][c] += xv * fv[c];
        }
      }
    }
    if (a.db != nullptr) {
      // Column n of this step against ranks jj + 8·c: a warp shares jj (p_tile broadcast) and
      // reads 32 consecutive columns of in_tile.
      const int n = t % BK, jj = t / BK;
      if (k0 + n < a.K) {
#pragma unroll
        for (int c = 0; c < RB / 8; ++c) {
          const int j = jj + 8 * c;
          float s = 0.f;
#pragma unroll 8
          for (int mm = 0; mm < BM; ++mm) s += in_tile[mm][n] * p_tile[mm][j];
          if (j0 + j < a.R) atomicAdd(a.db + (k0 + n) * a.R + j0 + j, a.scale * s);
        }
      }
    }
    if (with_dbias && t < BK && k0 + t < a.K) {
      float s = 0.f;
      for (int mm = 0; mm < BM; ++mm) s += in_tile[mm][t];
      atomicAdd(a.dbias + k0 + t, s);
    }
    __syncthreads();
  }
  if (a.out != nullptr) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t m = m0 + ty + 16 * i;
#pragma unroll
      for (int c = 0; c < kRanksPerThread; ++c) {
        const int64_t j = j0 + tx + 16 * c;
        if (m < a.M && j < a.R) store_float(a.out, a.out_dtype, m * a.R + j, a.scale * acc[i][c]);
      }
    }
  }
}

// ---- dA = dPᵀ·drop(x) ----

constexpr int kGradARows = 32;  // rows of x per step
constexpr int kGradACols = 64;  // columns of x (and of dA) per block

// Block: kGradACols columns of dA x RB ranks over one range of rows. Thread t owns column
// t % 64 and ranks t / 64 + 4·c: a warp reads 32 consecutive columns of x_tile and one dp_tile
// element (broadcast).
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads) grad_a_kernel(const float* dp, const T* x,
                                                          int64_t x_sm, int64_t x_sk, float* da,
                                                          int64_t M, int64_t K, int64_t R,
                                                          int64_t rows_per_split, bool atomic,
                                                          uint64_t seed, float p_drop) {
  constexpr int BM = kGradARows, BK = kGradACols, kRanksPerThread = RB / 4;
  __shared__ float x_tile[BM][BK + 1];
  __shared__ float dp_tile[BM][RB + 1];
  const int t = threadIdx.x, kx = t % BK, jy = t / BK;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * RB;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  const float keep_scale = p_drop > 0.f ? 1.f / (1.f - p_drop) : 1.f;
  float acc[kRanksPerThread] = {};
  for (int64_t m0 = m_begin; m0 < m_end; m0 += BM) {
    load_tile<T, BM, BK, BK + 1>(x_tile, x, x_sm, x_sk, m0, k0, m_end, K, K, seed, p_drop,
                                 keep_scale);
    for (int i = t; i < BM * RB; i += kThreads) {
      const int mm = i / RB, jj = i % RB;
      dp_tile[mm][jj] = m0 + mm < m_end && j0 + jj < R ? dp[(m0 + mm) * R + j0 + jj] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < BM; ++mm) {
      const float xv = x_tile[mm][kx];
#pragma unroll
      for (int c = 0; c < kRanksPerThread; ++c) acc[c] += dp_tile[mm][jy + 4 * c] * xv;
    }
    __syncthreads();
  }
  const int64_t k = k0 + kx;
  if (k >= K) return;
#pragma unroll
  for (int c = 0; c < kRanksPerThread; ++c) {
    const int64_t j = j0 + jy + 4 * c;
    if (j >= R) continue;
    if (atomic) atomicAdd(da + j * K + k, acc[c]);
    else da[j * K + k] = acc[c];
  }
}

// ---- dx += drop(dP·A) ----

constexpr int kAddRows = 32, kAddCols = 64, kAddRanks = 32;

// Block: kAddRows x kAddCols of dx. Thread t owns column t % 64 and rows t / 64 + 4·i; ranks are
// consumed kAddRanks at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads) add_dropped_low_rank_kernel(
    T* dx, const float* dp, const void* a, DType a_dt, int64_t a_sj, int64_t a_sk, int64_t M,
    int64_t K, int64_t R, uint64_t seed, float p_drop) {
  constexpr int BM = kAddRows, BK = kAddCols, RB = kAddRanks, kRowsPerThread = BM / 4;
  __shared__ float dp_tile[BM][RB + 1];
  __shared__ float a_tile[RB][BK + 1];
  const int t = threadIdx.x, kx = t % BK, my = t / BK;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BK;
  float acc[kRowsPerThread] = {};
  for (int64_t j0 = 0; j0 < R; j0 += RB) {
    for (int i = t; i < BM * RB; i += kThreads) {
      const int mm = i / RB, jj = i % RB;
      dp_tile[mm][jj] = m0 + mm < M && j0 + jj < R ? dp[(m0 + mm) * R + j0 + jj] : 0.f;
    }
    for (int i = t; i < RB * BK; i += kThreads) {
      const int jj = i / BK, kk = i % BK;
      a_tile[jj][kk] = j0 + jj < R && k0 + kk < K
                           ? load_float(a, a_dt, (j0 + jj) * a_sj + (k0 + kk) * a_sk) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < RB; ++jj) {
      const float av = a_tile[jj][kx];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] += dp_tile[my + 4 * i][jj] * av;
    }
    __syncthreads();
  }
  const int64_t k = k0 + kx;
  if (k >= K) return;
  const float keep_scale = 1.f / (1.f - p_drop);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + my + 4 * i;
    if (m >= M) continue;
    const bool kept = keep(seed, m, k, p_drop);
    const float low_rank = acc[i] * (kept ? keep_scale : 0.f);  // NaN·0 = NaN
    dx[m * K + k] = from_float<T>(to_float(dx[m * K + k]) + low_rank);
  }
}

__global__ void keep_mask_kernel(uint8_t* out, int64_t total, int64_t K, uint64_t seed, float p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = keep(seed, i / K, i % K, p) ? 1 : 0;
  }
}

unsigned int blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned int>((n + per_block - 1) / per_block);
}

// Calls body(T{}) with the C++ type of a dtype code.
template <typename Body> void with_type(DType dt, Body body) {
  switch (dt) {
    case kFloat16: body(__half{}); break;
    case kBFloat16: body(__nv_bfloat16{}); break;
    default: body(float{});
  }
}

// The smallest rank group of 16, 32 or 64 that holds R (64 beyond: several groups).
int rank_group(int64_t R) { return R <= 16 ? 16 : (R <= 32 ? 32 : 64); }

}  // namespace

void launch_rank_pass(const RankPassArgs& args, cudaStream_t stream) {
  // K = 0 still launches: the empty sums are written as zeros.
  if (args.M == 0 || args.R == 0) return;
  const int rb = rank_group(args.R);
  const dim3 grid(blocks_for(args.M, kPassRows), blocks_for(args.R, rb));
  with_type(args.in_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (rb == 16) LF_LAUNCH(grid, kThreads, stream, rank_pass_kernel<T, 16>)(args);
    else if (rb == 32) LF_LAUNCH(grid, kThreads, stream, rank_pass_kernel<T, 32>)(args);
    else LF_LAUNCH(grid, kThreads, stream, rank_pass_kernel<T, 64>)(args);
  });
}

void launch_grad_a(const float* dp, const void* x, DType x_dtype, int64_t x_stride_m,
                   int64_t x_stride_k, float* da, int64_t M, int64_t K, int64_t R, int splits,
                   uint64_t seed, float p_drop, cudaStream_t stream) {
  if (M == 0 || R == 0 || K == 0) return;
  // Each range of rows is a whole number of steps.
  int64_t rows = (M + splits - 1) / splits;
  rows = (rows + kGradARows - 1) / kGradARows * kGradARows;
  const int rb = rank_group(R);
  const dim3 grid(blocks_for(K, kGradACols), blocks_for(R, rb), blocks_for(M, rows));
  const bool atomic = grid.z > 1;
  with_type(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    if (rb == 16) {
      LF_LAUNCH(grid, kThreads, stream, grad_a_kernel<T, 16>)(
          dp, xt, x_stride_m, x_stride_k, da, M, K, R, rows, atomic, seed, p_drop);
    } else if (rb == 32) {
      LF_LAUNCH(grid, kThreads, stream, grad_a_kernel<T, 32>)(
          dp, xt, x_stride_m, x_stride_k, da, M, K, R, rows, atomic, seed, p_drop);
    } else {
      LF_LAUNCH(grid, kThreads, stream, grad_a_kernel<T, 64>)(
          dp, xt, x_stride_m, x_stride_k, da, M, K, R, rows, atomic, seed, p_drop);
    }
  });
}

void launch_add_dropped_low_rank(void* dx, DType dx_dtype, const float* dp, const void* a,
                                 DType a_dtype, int64_t a_stride_j, int64_t a_stride_k,
                                 int64_t M, int64_t K, int64_t R, uint64_t seed, float p_drop,
                                 cudaStream_t stream) {
  if (M == 0 || K == 0 || R == 0) return;
  const dim3 grid(blocks_for(M, kAddRows), blocks_for(K, kAddCols));
  with_type(dx_dtype, [&](auto tag) {
    using T = decltype(tag);
    LF_LAUNCH(grid, kThreads, stream, add_dropped_low_rank_kernel<T>)(
        static_cast<T*>(dx), dp, a, a_dtype, a_stride_j, a_stride_k, M, K, R, seed, p_drop);
  });
}

void launch_keep_mask(uint8_t* out, int64_t M, int64_t K, uint64_t seed, float p,
                      cudaStream_t stream) {
  const int64_t total = M * K;
  if (total == 0) return;
  const int64_t blocks = blocks_for(total, kThreads);
  const dim3 grid(static_cast<unsigned int>(blocks < 65535 * 8 ? blocks : 65535 * 8));
  LF_LAUNCH(grid, kThreads, stream, keep_mask_kernel)(out, total, K, seed, p);
}

}  // namespace lowrank_fused
