// Raw-pointer inner loops of the CPU kernels, compiled once per CPU capability.
//
// vec_kernels_impl.h holds the loops (at::vec::Vectorized<float>); vec_kernels_{default,avx2,avx512}.cpp
// include it with CPU_CAPABILITY set, the way ATen builds its own native/cpu kernels. setup.py compiles
// every csrc/cpu/*.cpp with the same flags (no -mavx2), so the AVX files raise the target with
// `#pragma GCC target` instead. kernels() picks the table that matches at::get_cpu_capability(), which
// also honours ATEN_CPU_CAPABILITY=default|avx2|avx512.
//
// The drivers (gaussian_kl.cpp, pgd.cpp, nt_xent.cpp) check arguments, allocate, parallelise with
// at::parallel_for and call these; nothing here allocates or touches at::Tensor.
#pragma once

#include <cstdint>

namespace urkle_fast::cpu {

// element type of the tensors behind a void pointer; accumulation is always float32
enum class Dt : int { F32 = 0, BF16 = 1, F16 = 2 };

struct KernelTable {
  const char* name;

  // ---- Gaussian KL: rows [r0, r1) of four [B, D] inputs with unit inner stride and row strides s*.
  // out[r] = KL_r (float32)
  void (*kl_fwd_rows)(Dt dt, int64_t r0, int64_t r1, int64_t D,
                      const void* mp, int64_t smp, const void* lp, int64_t slp,
                      const void* mq, int64_t smq, const void* lq, int64_t slq,
                      float* out);
  // grads of rows [r0, r1), written to contiguous [B, D] outputs in the input dtype.
  // upstream of row r: scale * grad[r * grad_stride] (grad_stride 0 for a scalar upstream)
  void (*kl_bwd_rows)(Dt dt, int64_t r0, int64_t r1, int64_t D,
                      const float* grad, int64_t grad_stride, float scale,
                      const void* mp, int64_t smp, const void* lp, int64_t slp,
                      const void* mq, int64_t smq, const void* lq, int64_t slq,
                      void* dmp, void* dlp, void* dmq, void* dlq);

  // ---- PGD on a flat, dense range of n elements (the three tensors share one layout)
  void (*pgd_linf)(Dt dt, int64_t n, void* x, const void* g, const void* x0,
                   float alpha, float eps, float lo, float hi);
  // sums[0] += sum g^2, sums[1] += sum (x - x0) g, sums[2] += sum (x - x0)^2
  void (*pgd_l2_sums)(Dt dt, int64_t n, const void* x, const void* g, const void* x0, double* sums);
  // x = clamp(x0 + factor * ((x + step * g) - x0), lo, hi)
  void (*pgd_l2_apply)(Dt dt, int64_t n, void* x, const void* g, const void* x0,
                       float step, float factor, float lo, float hi);

  // ---- NT-Xent
  // u[r, :] = z[r, :] * inv_norm[r], inv_norm[r] = 1 / max(||z[r]||, 1e-12); u is contiguous [*, d] float32
  void (*normalize_rows)(Dt dt, int64_t r0, int64_t r1, int64_t d, const void* z, int64_t sz,
                         float* u, float* inv_norm);
  // online log-sum-exp over one row of logits (-inf entries are excluded): (m, l) -> (m', l')
  void (*lse_update)(const float* s, int64_t n, float* m, float* l);
  // s[j] = coef * exp(s[j] - lse) in place
  void (*scaled_softmax)(float* s, int64_t n, float lse, float coef);
  // s[j] = coef[j] * exp(s[j] - lse[j]) in place (a row of a transposed tile: one lse per column)
  void (*scaled_softmax_cols)(float* s, int64_t n, const float* lse, const float* coef);
  // dz[r] = (du[r] - u[r] (u[r] . du[r])) * inv_norm[r], cast to dt; du, u contiguous [*, d] float32
  void (*normalize_bwd_rows)(Dt dt, int64_t r0, int64_t r1, int64_t d, const float* du, const float* u,
                             const float* inv_norm, void* dz);
  float (*dot)(const float* a, const float* b, int64_t n);
  // y += a * x
  void (*axpy)(float a, const float* x, float* y, int64_t n);
  // y[j] = sum_t x[t * stride + j] for t < count (in place on y allowed when y == x)
  void (*sum_rows)(const float* x, int64_t count, int64_t stride, float* y, int64_t n);
};

// the table for this machine (chosen once)
const KernelTable& kernels();

namespace DEFAULT {
extern const KernelTable table;
}
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define URKLE_FAST_X86_DISPATCH 1
namespace AVX2 {
extern const KernelTable table;
}
namespace AVX512 {
extern const KernelTable table;
}
#endif

}  // namespace urkle_fast::cpu
