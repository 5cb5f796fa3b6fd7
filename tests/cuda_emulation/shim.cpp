// C entry points for ctypes (tests/test_csrc_emulated.py): the launchers themselves, for the
// kernel tests, and the ops' argument handling (csrc/op_arguments.h, shared with bindings.cpp)
// on CPU tensors, for the backend tests.
#include "../../csrc/op_arguments.h"

using namespace lowrank_fused;

namespace {
// Runs an op_arguments.h entry: nullptr when it went through, else the error text (an
// exception must not cross the C boundary).
template <typename Body> const char* checked(Body body) {
  static thread_local std::string error;
  try {
    body();
    return nullptr;
  } catch (const ArgumentError& e) {
    error = e.what();
    return error.c_str();
  } catch (const LaunchError& e) {
    error = e.what();
    return error.c_str();
  }
}
}  // namespace

extern "C" {

// Test hook: the next cudaGetLastError (the check after the next launch) reports `error`.
void fail_next_launch(int error) { lf_emu::pending_error = static_cast<cudaError_t>(error); }

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

void dropped_low_rank(void* out, int out_dtype, const float* dp, const void* a, int a_dtype,
                      int64_t a_sj, int64_t a_sk, int64_t M, int64_t K, int64_t R,
                      uint64_t seed, float p_drop) {
  launch_dropped_low_rank(out, static_cast<DType>(out_dtype), dp, a, static_cast<DType>(a_dtype),
                          a_sj, a_sk, M, K, R, seed, p_drop, nullptr);
}

void keep_mask(uint8_t* out, int64_t M, int64_t K, uint64_t seed, float p) {
  launch_keep_mask(out, M, K, seed, p, nullptr);
}

// ---- the ops' argument handling; a null Matrix* is an absent optional ----

const char* op_project(const Matrix* input, const Matrix* f, const Matrix* out, float scale,
                       uint64_t seed, float p_drop) {
  return checked([&] { run_project(*input, *f, *out, scale, seed, p_drop, nullptr); });
}

const char* op_grad_output_pass(const Matrix* grad_y, const Matrix* b_eff, const Matrix* p,
                                float scale, const Matrix* dp, const Matrix* db,
                                const Matrix* dbias) {
  return checked(
      [&] { run_grad_output_pass(*grad_y, *b_eff, p, scale, dp, db, dbias, nullptr); });
}

const char* op_grad_a(const Matrix* dp, const Matrix* x, const Matrix* da, int64_t splits,
                      uint64_t seed, float p_drop) {
  return checked([&] { run_grad_a(*dp, *x, *da, splits, seed, p_drop, nullptr); });
}

const char* op_dropped_low_rank(const Matrix* out, const Matrix* dp, const Matrix* a,
                                uint64_t seed, float p_drop) {
  return checked([&] { run_dropped_low_rank(*out, *dp, *a, seed, p_drop, nullptr); });
}
}
