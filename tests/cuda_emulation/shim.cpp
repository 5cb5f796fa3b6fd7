// C entry points to csrc/'s launchers, for ctypes (tests/test_csrc_emulated.py).
#include "../../csrc/lowrank_kernels.cuh"

using namespace lowrank_fused;

extern "C" {

void rank_pass(const void* in, int in_dtype, int64_t in_sm, int64_t in_sk, const void* f,
               int f_dtype, int64_t f_sj, int64_t f_sk, const void* p, int p_dtype, void* out,
               int out_dtype, float* db, float* dbias, int64_t M, int64_t K, int64_t R,
               float scale, uint64_t seed, float p_drop) {
  RankPassArgs args{in, static_cast<DType>(in_dtype), in_sm, in_sk,
                    f, static_cast<DType>(f_dtype), f_sj, f_sk,
                    p, static_cast<DType>(p_dtype), out, static_cast<DType>(out_dtype),
                    db, dbias, M, K, R, scale, seed, p_drop};
  launch_rank_pass(args, nullptr);
}

void grad_a(const float* dp, const void* x, int x_dtype, int64_t x_sm, int64_t x_sk, float* da,
            int64_t M, int64_t K, int64_t R, int splits, uint64_t seed, float p_drop) {
  launch_grad_a(dp, x, static_cast<DType>(x_dtype), x_sm, x_sk, da, M, K, R, splits, seed,
                p_drop, nullptr);
}

void add_dropped_low_rank(void* dx, int dx_dtype, const float* dp, const void* a, int a_dtype,
                          int64_t a_sj, int64_t a_sk, int64_t M, int64_t K, int64_t R,
                          uint64_t seed, float p_drop) {
  launch_add_dropped_low_rank(dx, static_cast<DType>(dx_dtype), dp, a,
                              static_cast<DType>(a_dtype), a_sj, a_sk, M, K, R, seed, p_drop,
                              nullptr);
}

void keep_mask(uint8_t* out, int64_t M, int64_t K, uint64_t seed, float p) {
  launch_keep_mask(out, M, K, seed, p, nullptr);
}
}
