// Runs csrc/'s CUDA kernels as plain C++ on the CPU, for tests on machines without a GPU.
// Force-included (g++ -include) before csrc/lowrank_kernels.cu with -DLOWRANK_FUSED_EMULATION.
//
// A launch runs the blocks one after another; the threads of a block run as real std::threads,
// __syncthreads() is a std::barrier across them, and __shared__ arrays are function statics (one
// copy, which the blocks take in turn). This checks indexing, tiling, masking and reductions,
// and barrier placement as far as real threads racing on the CPU show it; it says nothing about
// warp-level timing, the memory model of a real GPU, or speed.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
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

namespace lf_emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;

template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  if (block.y != 1 || block.z != 1) throw "emulation: 1-D blocks only";
  grid_dim = grid;
  block_dim = block;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(block.x);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned int tx = 0; tx < block.x; ++tx)
          threads.emplace_back([&, tx] {
            thread_idx = dim3(tx);
            block_idx = dim3(bx, by, bz);
            kernel(args...);
            // An exited thread no longer counts at the block's barrier, as on the hardware.
            block_barrier->arrive_and_drop();
          });
        for (auto& t : threads) t.join();
      }
}

// Binds the launch configuration, then takes the kernel's arguments like <<<...>>>(args).
template <typename Kernel> struct Launch {
  dim3 grid, block;
  Kernel kernel;
  template <typename... Args> void operator()(Args&&... args) const {
    launch(grid, block, kernel, std::forward<Args>(args)...);
  }
};
template <typename Kernel> Launch<Kernel> make_launch(dim3 grid, dim3 block, Kernel kernel) {
  return Launch<Kernel>{grid, block, kernel};
}
}  // namespace lf_emu

#define threadIdx (::lf_emu::thread_idx)
#define blockIdx (::lf_emu::block_idx)
#define blockDim (::lf_emu::block_dim)
#define gridDim (::lf_emu::grid_dim)
#define LF_LAUNCH(grid, block, stream, ...) ::lf_emu::make_launch(grid, block, &__VA_ARGS__)

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
