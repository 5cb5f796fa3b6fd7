// Hand-written CUDA for the rank-r parts of the operator; the M x N and M x K GEMMs stay on
// cuBLAS (backends/cuda.py). Each kernel streams x or G once (or writes dx's low-rank term
// once), in 16-byte vectors where the rows allow it, through shared-memory tiles, accumulating
// in fp32. At 2r flops per 2-byte element, CUDA cores fed from shared memory fall behind the
// memory stream from about r = 16 on an H100, so over a 16-bit base (x, G or dx in fp16/bf16)
// every kernel runs on tensor cores (mma.sync m16n8k16, fp32 accumulators): the other operands
// (fp32 adapters, P, and the fp32 dP of the dA and dx kernels) are rounded to the base's dtype as
// they are loaded, the math the Triton backend and PEFT's autocast run. Over an fp32 base the
// kernels stay on CUDA cores in fp32.
#include "lowrank_kernels.cuh"
#include "keep_mask.cuh"

#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#ifndef LOWRANK_FUSED_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace lowrank_fused {
namespace {

// A launch that failed (bad configuration, too many resources, an earlier sticky error) raises
// here, naming the kernel, instead of in whatever op next checks for errors.
void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw LaunchError(std::string("lowrank_fused_C: launch of ") + kernel +
                      " failed: " + cudaGetErrorString(error));
}

// A kernel bound to its launch configuration (LF_LAUNCH); called with the kernel's arguments,
// it launches (on the CPU under tests/cuda_emulation/) and checks the launch.
template <typename... Params> struct CheckedLaunch {
  const char* name;
  dim3 grid, block;
  cudaStream_t stream;
  void (*kernel)(Params...);

  template <typename... Args> void operator()(Args&&... args) const {
#ifdef LOWRANK_FUSED_EMULATION
    ::lf_emu::launch(grid, block, kernel, std::forward<Args>(args)...);
#else
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
    check_launch(name);
  }
};

template <typename... Params>
CheckedLaunch<Params...> checked_launch(const char* name, dim3 grid, dim3 block,
                                        cudaStream_t stream, void (*kernel)(Params...)) {
  return CheckedLaunch<Params...>{name, grid, block, stream, kernel};
}
}  // namespace
}  // namespace lowrank_fused

// LF_LAUNCH(grid, block, stream, kernel<...>)(args...): kernel<<<grid, block, 0, stream>>>(args...)
// followed by the launch check.
#define LF_LAUNCH(grid, block, stream, ...) \
  ::lowrank_fused::checked_launch(#__VA_ARGS__, grid, block, stream, &__VA_ARGS__)

namespace lowrank_fused {
namespace {

constexpr int kThreads = 256;
// Blocks per SM the streaming rank passes ask ptxas to keep (at most 80 registers): left to
// itself it settled lower (48-64) and spilled 4 bytes around the main loop.
constexpr int kMinBlocks = 3;

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

template <typename T> __host__ __device__ constexpr DType dtype_of() {
  return std::is_same_v<T, __half> ? kFloat16
                                   : (std::is_same_v<T, __nv_bfloat16> ? kBFloat16 : kFloat32);
}

// For the small operands (f, p, a), whose dtype is a runtime argument.
__device__ __forceinline__ float load_float(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case kFloat16: return to_float(static_cast<const __half*>(base)[i]);
    case kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Element i of a runtime-dtype operand as an MMA input of type T: rounded to T unless it is one.
template <typename T> __device__ __forceinline__ T load_as(const void* base, DType dt, int64_t i) {
  if (dt == dtype_of<T>()) return static_cast<const T*>(base)[i];
  return from_float<T>(load_float(base, dt, i));
}

__device__ __forceinline__ void store_float(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case kFloat16: static_cast<__half*>(base)[i] = from_float<__half>(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = from_float<__nv_bfloat16>(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

// Loads rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of a strided T matrix into a float (or T)
// shared-memory tile, zero outside rows < row_end and columns < col_end. Each thread loads 8
// consecutive columns of one row: one or two 16-byte loads when the row is contiguous and
// aligned. Dropout keeps (row, col) where keep(seed, row, col, p) (keep_mask.cuh), and the kept
// value is rounded to T, as the reference's dropout(x) is.
template <typename T, int ROWS, int COLS, int PITCH, typename S>
__device__ __forceinline__ void load_tile(S (*tile)[PITCH], const T* src, int64_t stride_r,
                                          int64_t stride_c, int64_t r0, int64_t c0,
                                          int64_t row_end, int64_t col_end, uint64_t seed,
                                          float p_drop, float keep_scale) {
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
  for (int i = 0; i < 8; ++i) tile[row][col + i] = from_float<S>(v[i]);
}

// ---- rank pass: out = s·drop(in)·fᵀ, with the dB and dbias partial sums of the same tiles ----

constexpr int kPassRows = 64;  // rows of `in` per block
constexpr int kPassCols = 32;  // columns of `in` per step of the streamed loop

// Block: kPassRows rows x RB ranks (grid.y covers R in RB-wide groups). Thread (ty, tx) of a
// 16 x 16 grid accumulates rows ty + 16·i and ranks tx + 16·c, so that a warp reads one row of
// in_tile (broadcast) and 16 consecutive rows of f_tile (pitch 33: distinct banks).
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads, kMinBlocks) rank_pass_kernel(RankPassArgs a) {
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
                                 a.in_stride_k, m0, k0, a.M, a.K, a.seed, a.p_drop,
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

// ---- the rank pass on tensor cores, over a 16-bit `in` ----
//
// mma.sync m16n8k16 (fp32 accumulators): at r = 64 the CUDA-core pass above is bound by its
// shared-memory operand loads at several times x's memory time; on tensor cores it is
// memory-bound. f and p are rounded to in's type T as they are loaded (exact when they are T);
// results keep their dtypes (out in out_dtype, db in fp32).

// d += a·b for one m16n8k16 tile, with the PTX fragment layout (g = lane / 4, t = lane % 4):
// a[0..3] hold A(g, 2t..2t+1), A(g+8, 2t..), A(g, 2t+8..), A(g+8, 2t+8..); b[0..1] hold
// B(2t..2t+1, g), B(2t+8.., g); d[0..3] hold D(g, 2t), D(g, 2t+1), D(g+8, 2t), D(g+8, 2t+1).
// Under emulation, tests/cuda_emulation/emulation.h supplies mma_m16n8k16 with that layout.
#ifndef LOWRANK_FUSED_EMULATION
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4],
                                                            const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Two consecutive T elements of a shared-memory row as one 32-bit register.
template <typename T> __device__ __forceinline__ uint32_t pair_at(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Two T elements as one 32-bit register, `low` first (its place in memory order).
template <typename T> __device__ __forceinline__ uint32_t pack(T low, T high) {
  const T e[2] = {low, high};
  uint32_t r;
  memcpy(&r, e, sizeof r);
  return r;
}

constexpr int kMmaPitch = kPassCols + 8;  // halves per tile row: 4-byte pairs, fewer conflicts

// Same blocks and outputs as rank_pass_kernel. out: warp w owns rows 16·(w % 4) and the RB / 16
// n-tiles of 8 ranks from (RB / 2)·(w / 4). db: per step, the (kPassCols x RB) partial
// Σ_m in[m, k]·p[m, j] is cut into 16 x 8 tiles taken by the warps in turn, with in_tile read
// transposed as the A operand and p kept rank-major (pt_tile) as the B operand.
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads, kMinBlocks) rank_pass_mma_kernel(RankPassArgs a) {
  constexpr int BM = kPassRows, BK = kPassCols, kTiles = RB / 16;
  constexpr int kDbTiles = (BK / 16) * (RB / 8), kWarps = kThreads / 32;
  alignas(16) __shared__ T in_tile[BM][kMmaPitch];
  alignas(16) __shared__ T f_tile[RB][kMmaPitch];
  alignas(16) __shared__ T pt_tile[RB][BM + 8];
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
  const int row0 = 16 * (warp % 4), rank0 = (RB / 2) * (warp / 4);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * RB;
  const bool with_dbias = a.dbias != nullptr && blockIdx.y == 0;
  const float keep_scale = a.p_drop > 0.f ? 1.f / (1.f - a.p_drop) : 1.f;
  if (a.db != nullptr) {
    for (int i = t; i < RB * BM; i += kThreads) {
      const int jj = i / BM, mm = i % BM;
      pt_tile[jj][mm] = m0 + mm < a.M && j0 + jj < a.R
                            ? load_as<T>(a.p, a.p_dtype, (m0 + mm) * a.R + j0 + jj)
                            : from_float<T>(0.f);
    }
  }
  float acc[kTiles][4] = {};
  for (int64_t k0 = 0; k0 < a.K; k0 += BK) {
    load_tile<T, BM, BK, kMmaPitch>(in_tile, static_cast<const T*>(a.in), a.in_stride_m,
                                    a.in_stride_k, m0, k0, a.M, a.K, a.seed, a.p_drop,
                                    keep_scale);
    for (int i = t; i < RB * BK; i += kThreads) {
      const int jj = i / BK, kk = i % BK;
      f_tile[jj][kk] = j0 + jj < a.R && k0 + kk < a.K
                           ? load_as<T>(a.f, a.f_dtype,
                                        (j0 + jj) * a.f_stride_j + (k0 + kk) * a.f_stride_k)
                           : from_float<T>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK && a.out != nullptr; kk += 16) {
      const uint32_t frag_a[4] = {pair_at(&in_tile[row0 + g][kk + 2 * q]),
                                  pair_at(&in_tile[row0 + g + 8][kk + 2 * q]),
                                  pair_at(&in_tile[row0 + g][kk + 2 * q + 8]),
                                  pair_at(&in_tile[row0 + g + 8][kk + 2 * q + 8])};
#pragma unroll
      for (int n = 0; n < kTiles; ++n) {
        const T* f_row = f_tile[rank0 + 8 * n + g];
        const uint32_t frag_b[2] = {pair_at(f_row + kk + 2 * q), pair_at(f_row + kk + 2 * q + 8)};
        mma_m16n8k16<T>(acc[n], frag_a, frag_b);
      }
    }
    for (int tile = warp; tile < kDbTiles && a.db != nullptr; tile += kWarps) {
      const int c0 = 16 * (tile % (BK / 16)), n0 = 8 * (tile / (BK / 16));
      float part[4] = {};
#pragma unroll
      for (int mm = 0; mm < BM; mm += 16) {
        const int r = mm + 2 * q;
        const uint32_t frag_a[4] = {pack(in_tile[r][c0 + g], in_tile[r + 1][c0 + g]),
                                    pack(in_tile[r][c0 + g + 8], in_tile[r + 1][c0 + g + 8]),
                                    pack(in_tile[r + 8][c0 + g], in_tile[r + 9][c0 + g]),
                                    pack(in_tile[r + 8][c0 + g + 8], in_tile[r + 9][c0 + g + 8])};
        const uint32_t frag_b[2] = {pair_at(&pt_tile[n0 + g][r]), pair_at(&pt_tile[n0 + g][r + 8])};
        mma_m16n8k16<T>(part, frag_a, frag_b);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t k = k0 + c0 + g + 8 * (e / 2), j = j0 + n0 + 2 * q + e % 2;
        if (k < a.K && j < a.R) atomicAdd(a.db + k * a.R + j, a.scale * part[e]);
      }
    }
    if (with_dbias && t < BK && k0 + t < a.K) {
      float s = 0.f;
      for (int mm = 0; mm < BM; ++mm) s += to_float(in_tile[mm][t]);
      atomicAdd(a.dbias + k0 + t, s);
    }
    __syncthreads();
  }
  if (a.out == nullptr) return;
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = m0 + row0 + g + 8 * (e / 2);
      const int64_t j = j0 + rank0 + 8 * n + 2 * q + e % 2;
      if (m < a.M && j < a.R) store_float(a.out, a.out_dtype, m * a.R + j, a.scale * acc[n][e]);
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
    load_tile<T, BM, BK, BK + 1>(x_tile, x, x_sm, x_sk, m0, k0, m_end, K, seed, p_drop,
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

// dA on tensor cores, over a 16-bit x: D = dPᵀ·drop(x) in m16n8k16 tiles, ranks as the MMA rows,
// x's columns as its columns and x's rows as the reduction; dP is rounded to T as it is loaded
// (dpt_tile, rank-major, so that each A-fragment register is one 4-byte read). Warp w owns the
// 16 ranks from 16·(w % RB/16) and RB / 16 n-tiles of 8 columns from 8·(RB / 16)·(w / (RB / 16)):
// one dP fragment and RB / 16 x fragments per 16 rows, x's element pairs along a column packed
// from two reads (pitch 72: conflict-free).
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads, kMinBlocks) grad_a_mma_kernel(const float* dp, const T* x,
                                                              int64_t x_sm, int64_t x_sk,
                                                              float* da, int64_t M, int64_t K,
                                                              int64_t R, int64_t rows_per_split,
                                                              bool atomic, uint64_t seed,
                                                              float p_drop) {
  constexpr int BM = kGradARows, BK = kGradACols, kRankTiles = RB / 16, kColTiles = RB / 16;
  static_assert(BM % 16 == 0 && kRankTiles * (BK / 8 / kColTiles) == kThreads / 32,
                "every warp owns one rank tile and kColTiles column tiles");
  alignas(16) __shared__ T x_tile[BM][BK + 8];
  alignas(16) __shared__ T dpt_tile[RB][BM + 8];
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
  const int rank0 = 16 * (warp % kRankTiles), col0 = 8 * kColTiles * (warp / kRankTiles);
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * RB;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  const float keep_scale = p_drop > 0.f ? 1.f / (1.f - p_drop) : 1.f;
  float acc[kColTiles][4] = {};
  for (int64_t m0 = m_begin; m0 < m_end; m0 += BM) {
    load_tile<T, BM, BK, BK + 8>(x_tile, x, x_sm, x_sk, m0, k0, m_end, K, seed, p_drop,
                                 keep_scale);
    for (int i = t; i < BM * RB; i += kThreads) {
      const int mm = i / RB, jj = i % RB;  // coalesced over dP's rows
      dpt_tile[jj][mm] =
          from_float<T>(m0 + mm < m_end && j0 + jj < R ? dp[(m0 + mm) * R + j0 + jj] : 0.f);
    }
    __syncthreads();
#pragma unroll
    for (int mm = 0; mm < BM; mm += 16) {
      const uint32_t frag_a[4] = {pair_at(&dpt_tile[rank0 + g][mm + 2 * q]),
                                  pair_at(&dpt_tile[rank0 + g + 8][mm + 2 * q]),
                                  pair_at(&dpt_tile[rank0 + g][mm + 2 * q + 8]),
                                  pair_at(&dpt_tile[rank0 + g + 8][mm + 2 * q + 8])};
      const int r = mm + 2 * q;
#pragma unroll
      for (int n = 0; n < kColTiles; ++n) {
        const int c = col0 + 8 * n + g;
        const uint32_t frag_b[2] = {pack(x_tile[r][c], x_tile[r + 1][c]),
                                    pack(x_tile[r + 8][c], x_tile[r + 9][c])};
        mma_m16n8k16<T>(acc[n], frag_a, frag_b);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < kColTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = j0 + rank0 + g + 8 * (e / 2);
      const int64_t k = k0 + col0 + 8 * n + 2 * q + e % 2;
      if (j >= R || k >= K) continue;
      if (atomic) atomicAdd(da + j * K + k, acc[n][e]);
      else da[j * K + k] = acc[n][e];
    }
  }
}

// ---- out = drop(dP·A): dx's low-rank term, written before the G·W GEMM adds into it ----

constexpr int kAddRows = 32, kAddCols = 64, kAddRanks = 32;

// Block: kAddRows x kAddCols of out. Thread t owns column t % 64 and rows t / 64 + 4·i; ranks are
// consumed kAddRanks at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads) dropped_low_rank_kernel(
    T* out, const float* dp, const void* a, DType a_dt, int64_t a_sj, int64_t a_sk, int64_t M,
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
    out[m * K + k] = from_float<T>(low_rank);
  }
}

// The term on tensor cores, for a 16-bit out: a block computes kAddMmaRows x kAddCols of out in
// m16n8k16 tiles, rows of dP as the MMA rows and ranks as the reduction, kAddRanks ranks per
// step; dP and A are rounded to T as they are loaded (A rank-minor, at_tile[k][j], so that each
// B-fragment register is one 4-byte read). Warp w owns the 16 rows from 16·(w % 4) and the four
// n-tiles from 32·(w / 4). The fp32 sums go through out_tile, so that the mask (applied in fp32,
// then rounded once, as the CUDA-core kernel does) and the 16-byte stores run by 8-column strips.
constexpr int kAddMmaRows = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads) dropped_low_rank_mma_kernel(
    T* out, const float* dp, const void* a, DType a_dt, int64_t a_sj, int64_t a_sk, int64_t M,
    int64_t K, int64_t R, uint64_t seed, float p_drop) {
  constexpr int BM = kAddMmaRows, BK = kAddCols, RB = kAddRanks, kColTiles = 4;
  constexpr int kStrips = BM * BK / (8 * kThreads);
  static_assert((BM / 16) * (BK / 8 / kColTiles) == kThreads / 32 && BM * BK % (8 * kThreads) == 0,
                "one 16-row tile of kColTiles n-tiles per warp, whole strips per thread");
  alignas(16) __shared__ T dp_tile[BM][RB + 8];
  alignas(16) __shared__ T at_tile[BK][RB + 8];
  alignas(16) __shared__ float out_tile[BM][BK + 8];
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
  const int row0 = 16 * (warp % (BM / 16)), col0 = 8 * kColTiles * (warp / (BM / 16));
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * BK;
  float acc[kColTiles][4] = {};
  for (int64_t j0 = 0; j0 < R; j0 += RB) {
    for (int i = t; i < BM * RB; i += kThreads) {
      const int mm = i / RB, jj = i % RB;
      dp_tile[mm][jj] =
          from_float<T>(m0 + mm < M && j0 + jj < R ? dp[(m0 + mm) * R + j0 + jj] : 0.f);
    }
    for (int i = t; i < RB * BK; i += kThreads) {
      const int jj = i / BK, kk = i % BK;  // coalesced over A's columns when a_sk = 1
      at_tile[kk][jj] = j0 + jj < R && k0 + kk < K
                            ? load_as<T>(a, a_dt, (j0 + jj) * a_sj + (k0 + kk) * a_sk)
                            : from_float<T>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int jk = 0; jk < RB; jk += 16) {
      if (j0 + jk >= R) break;  // all-zero ranks (block-uniform)
      const uint32_t frag_a[4] = {pair_at(&dp_tile[row0 + g][jk + 2 * q]),
                                  pair_at(&dp_tile[row0 + g + 8][jk + 2 * q]),
                                  pair_at(&dp_tile[row0 + g][jk + 2 * q + 8]),
                                  pair_at(&dp_tile[row0 + g + 8][jk + 2 * q + 8])};
#pragma unroll
      for (int n = 0; n < kColTiles; ++n) {
        const T* a_col = at_tile[col0 + 8 * n + g];
        const uint32_t frag_b[2] = {pair_at(a_col + jk + 2 * q), pair_at(a_col + jk + 2 * q + 8)};
        mma_m16n8k16<T>(acc[n], frag_a, frag_b);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < kColTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      out_tile[row0 + g + 8 * (e / 2)][col0 + 8 * n + 2 * q + e % 2] = acc[n][e];
  }
  __syncthreads();
  const float keep_scale = 1.f / (1.f - p_drop);
#pragma unroll
  for (int s = 0; s < kStrips; ++s) {
    const int strip = t + s * kThreads, row = strip / (BK / 8), col = (strip % (BK / 8)) * 8;
    const int64_t gr = m0 + row, gc = k0 + col;
    if (gr >= M) continue;
    T v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const bool kept = keep(seed, gr, gc + i, p_drop);
      v[i] = from_float<T>(out_tile[row][col + i] * (kept ? keep_scale : 0.f));  // NaN·0 = NaN
    }
    T* ptr = out + gr * K + gc;
    if (gc + 8 <= K && reinterpret_cast<uintptr_t>(ptr) % 16 == 0) {
      uint4 raw;
      memcpy(&raw, v, sizeof raw);
      *reinterpret_cast<uint4*>(ptr) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (gc + i < K) ptr[i] = v[i];
    }
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
  // A 16-bit `in` runs on tensor cores, f and p rounded to its type; an fp32 one on CUDA cores.
  with_type(args.in_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (rb == 16) LF_LAUNCH(grid, kThreads, stream, rank_pass_mma_kernel<T, 16>)(args);
      else if (rb == 32) LF_LAUNCH(grid, kThreads, stream, rank_pass_mma_kernel<T, 32>)(args);
      else LF_LAUNCH(grid, kThreads, stream, rank_pass_mma_kernel<T, 64>)(args);
    } else if (rb == 16) {
      LF_LAUNCH(grid, kThreads, stream, rank_pass_kernel<T, 16>)(args);
    } else if (rb == 32) {
      LF_LAUNCH(grid, kThreads, stream, rank_pass_kernel<T, 32>)(args);
    } else {
      LF_LAUNCH(grid, kThreads, stream, rank_pass_kernel<T, 64>)(args);
    }
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
  // A 16-bit x runs on tensor cores, dP rounded to its type; an fp32 one on CUDA cores.
  with_type(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    if constexpr (!std::is_same_v<T, float>) {
      if (rb == 16) {
        LF_LAUNCH(grid, kThreads, stream, grad_a_mma_kernel<T, 16>)(
            dp, xt, x_stride_m, x_stride_k, da, M, K, R, rows, atomic, seed, p_drop);
      } else if (rb == 32) {
        LF_LAUNCH(grid, kThreads, stream, grad_a_mma_kernel<T, 32>)(
            dp, xt, x_stride_m, x_stride_k, da, M, K, R, rows, atomic, seed, p_drop);
      } else {
        LF_LAUNCH(grid, kThreads, stream, grad_a_mma_kernel<T, 64>)(
            dp, xt, x_stride_m, x_stride_k, da, M, K, R, rows, atomic, seed, p_drop);
      }
    } else if (rb == 16) {
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

void launch_dropped_low_rank(void* out, DType out_dtype, const float* dp, const void* a,
                             DType a_dtype, int64_t a_stride_j, int64_t a_stride_k, int64_t M,
                             int64_t K, int64_t R, uint64_t seed, float p_drop,
                             cudaStream_t stream) {
  if (M == 0 || K == 0) return;  // R = 0 still launches: the term is written as zeros
  // A 16-bit out runs on tensor cores, dP and A rounded to its type; an fp32 one on CUDA cores.
  with_type(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      const dim3 grid(blocks_for(M, kAddMmaRows), blocks_for(K, kAddCols));
      LF_LAUNCH(grid, kThreads, stream, dropped_low_rank_mma_kernel<T>)(
          static_cast<T*>(out), dp, a, a_dtype, a_stride_j, a_stride_k, M, K, R, seed, p_drop);
    } else {
      const dim3 grid(blocks_for(M, kAddRows), blocks_for(K, kAddCols));
      LF_LAUNCH(grid, kThreads, stream, dropped_low_rank_kernel<T>)(
          static_cast<T*>(out), dp, a, a_dtype, a_stride_j, a_stride_k, M, K, R, seed, p_drop);
    }
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
