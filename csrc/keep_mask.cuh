// The dropout keep-mask: the same bits as lowrank_fused/dropout.py's definition (read it there),
// in uint32 arithmetic. keep(seed, row, col, p) for p quantised to a multiple of 2^-16 (the
// backends pass DropoutSpec.quantised_p, which float32 holds exactly). Columns c and c + 16 of
// each aligned 32-column group share one hash: its low 16 bits decide c, its high 16 bits c + 16.
#pragma once

#include <cstdint>

namespace lowrank_fused {
namespace keep_mask_detail {

__host__ __device__ __forceinline__ uint32_t tail(uint32_t x) {
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

__host__ __device__ __forceinline__ uint32_t mix(uint32_t x) { return tail(x ^ (x >> 16)); }

}  // namespace keep_mask_detail

// The 16-bit threshold for drop probability p: round(p * 2^16), at most 2^16 - 1.
__host__ __device__ __forceinline__ uint32_t keep_threshold(float p) {
  const float t = p * 65536.0f + 0.5f;
  return static_cast<uint32_t>(t < 65535.0f ? t : 65535.0f);
}

__host__ __device__ __forceinline__ bool keep(uint64_t seed, int64_t row, int64_t col, float p) {
  using namespace keep_mask_detail;
  const uint32_t s = static_cast<uint32_t>(seed);
  const uint32_t c = static_cast<uint32_t>(col);
  const uint32_t pair = ((c >> 5) << 4) | (c & 15u);
  const uint32_t row_key = mix(static_cast<uint32_t>(row) ^ mix(s));
  const uint32_t col_key = pair * 0x9E3779B9u + mix(s ^ 0x9E3779B9u);
  const uint32_t h = tail(row_key ^ col_key);
  return ((c & 16u) ? (h >> 16) : (h & 0xFFFFu)) >= keep_threshold(p);
}

}  // namespace lowrank_fused
