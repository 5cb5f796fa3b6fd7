// Runs csrc/'s CUDA kernels as plain C++ on the CPU, for tests on machines without a GPU.
// Force-included (g++ -include) before csrc/lowrank_kernels.cu with -DLOWRANK_FUSED_EMULATION.
//
// A launch runs the blocks one after another; the threads of a block run as real std::threads,
// __syncthreads() is a std::barrier across them, and __shared__ arrays are function statics (one
// copy, which the blocks take in turn). This checks indexing, tiling, masking and reductions,
// and barrier placement as far as real threads racing on the CPU show it; it says nothing about
// warp-level timing, the memory model of a real GPU, or speed. Warp-collective instructions
// (mma_m16n8k16) exchange fragments through a per-warp buffer between two warp barriers, with
// the PTX fragment layout, so a kernel's fragment indexing is checked as well.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
using cudaStream_t = void*;

// The runtime's error reporting: a launch here cannot fail, but a test can make the next
// cudaGetLastError report an error (fail_next_launch in shim.cpp), as a failed launch would.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};
namespace lf_emu {
inline thread_local cudaError_t pending_error = cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = lf_emu::pending_error;
  lf_emu::pending_error = cudaSuccess;  // read and reset, as the runtime does
  return error;
}
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    default: return "unrecognized error code";
  }
}

namespace lf_emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;

// One per warp of the running block: the operands of a warp-collective MMA.
struct WarpExchange {
  std::barrier<> barrier{32};
  float a[16][16], b[16][8];
};
inline std::deque<WarpExchange>* warps = nullptr;

template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0)
    throw "emulation: 1-D blocks of whole warps only";
  grid_dim = grid;
  block_dim = block;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(block.x);
        block_barrier = &barrier;
        std::deque<WarpExchange> block_warps(block.x / 32);
        warps = &block_warps;
        std::vector<std::thread> threads;
        for (unsigned int tx = 0; tx < block.x; ++tx)
          threads.emplace_back([&, tx] {
            thread_idx = dim3(tx);
            block_idx = dim3(bx, by, bz);
            kernel(args...);
            // An exited thread no longer counts at the block's barrier, as on the hardware.
            block_barrier->arrive_and_drop();
            (*warps)[tx / 32].barrier.arrive_and_drop();
          });
        for (auto& t : threads) t.join();
      }
}
}  // namespace lf_emu

#define threadIdx (::lf_emu::thread_idx)
#define blockIdx (::lf_emu::block_idx)
#define blockDim (::lf_emu::block_dim)
#define gridDim (::lf_emu::grid_dim)

inline void __syncthreads() { lf_emu::block_barrier->arrive_and_wait(); }

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

// Half types as their bit patterns, converted with round-to-nearest-even like cuda_fp16.h.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if (std::isnan(v)) {
    b.bits = 0x7FC0;
  } else {
    u += 0x7FFFu + ((u >> 16) & 1u);
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

namespace lf_emu {
inline float to_float(__half h) { return __half2float(h); }
inline float to_float(__nv_bfloat16 b) { return __bfloat162float(b); }

// The two T elements of a 32-bit fragment register, low half first (as in memory).
template <typename T> void unpack(uint32_t reg, float (&out)[2]) {
  T e[2];
  std::memcpy(e, &reg, 4);
  out[0] = to_float(e[0]);
  out[1] = to_float(e[1]);
}
}  // namespace lf_emu

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d (16 x 8) += a (16 x 16) · b (16 x 8),
// each lane holding its part in the PTX fragment layout (g = lane / 4, t = lane % 4).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  auto& w = (*lf_emu::warps)[threadIdx.x / 32];
  float v[2];
  for (int i = 0; i < 4; ++i) {
    lf_emu::unpack<T>(a[i], v);
    const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
    w.a[row][col] = v[0];
    w.a[row][col + 1] = v[1];
  }
  for (int i = 0; i < 2; ++i) {
    lf_emu::unpack<T>(b[i], v);
    w.b[2 * t + 8 * i][g] = v[0];
    w.b[2 * t + 8 * i + 1][g] = v[1];
  }
  w.barrier.arrive_and_wait();
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += w.a[row][k] * w.b[k][col];
    d[e] += sum;
  }
  w.barrier.arrive_and_wait();  // every lane has read before the next MMA overwrites
}
