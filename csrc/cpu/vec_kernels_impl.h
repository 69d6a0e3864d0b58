// Inner loops of the CPU kernels (see vec_kernels.h). Included exactly once per translation unit by
// vec_kernels_{default,avx2,avx512}.cpp, which define CPU_CAPABILITY (and CPU_CAPABILITY_AVX2 /
// CPU_CAPABILITY_AVX512) first; at::vec puts Vectorized in the inline namespace CPU_CAPABILITY, so the
// three copies never collide. No header guard on purpose.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "vec_kernels.h"

namespace urkle_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr int64_t kW = fVec::size();

// ---- loads and stores: kW elements of T <-> one float vector

template <typename T>
inline fVec load_f(const T* p);
template <>
inline fVec load_f<float>(const float* p) {
  return fVec::loadu(p);
}
template <>
inline fVec load_f<c10::BFloat16>(const c10::BFloat16* p) {
  fVec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}
template <>
inline fVec load_f<c10::Half>(const c10::Half* p) {
  fVec out;
  at::vec::load_fp32_from_fp16(p, out);
  return out;
}

template <typename T>
inline void store_f(T* p, const fVec& v);
template <>
inline void store_f<float>(float* p, const fVec& v) {
  v.store(p);
}
// one float vector -> kW reduced-precision values, round to nearest even as c10 does
template <>
inline void store_f<c10::BFloat16>(c10::BFloat16* p, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
#else
  at::vec::convert_float_bfloat16(v, v).store(p, kW);
#endif
}
template <>
inline void store_f<c10::Half>(c10::Half* p, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(__m512(v)));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
#else
  at::vec::convert_float_half(v, v).store(p, kW);
#endif
}

inline float hsum(const fVec& v) {
  alignas(64) float tmp[kW];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += tmp[i];
  return s;
}

inline float hmax(const fVec& v) {
  alignas(64) float tmp[kW];
  v.store(tmp);
  float m = tmp[0];
  for (int64_t i = 1; i < kW; ++i) m = std::max(m, tmp[i]);
  return m;
}

// Call f(T* or const T*) for dt. Kept tiny: every kernel below is a template on the element type.
#define URKLE_DISPATCH_DT(dt, ...)                  \
  switch (dt) {                                     \
    case Dt::F32: {                                 \
      using scalar_t = float;                       \
      __VA_ARGS__();                                \
      break;                                        \
    }                                               \
    case Dt::BF16: {                                \
      using scalar_t = c10::BFloat16;               \
      __VA_ARGS__();                                \
      break;                                        \
    }                                               \
    case Dt::F16: {                                 \
      using scalar_t = c10::Half;                   \
      __VA_ARGS__();                                \
      break;                                        \
    }                                               \
  }

// ======================================================================================= Gaussian KL
// Both passes use exp(lp - lq) rather than exp(lp) * exp(-lq): the same value without the overflow of
// exp(lp) when both log-variances are large.

template <typename T>
void kl_fwd_rows_t(int64_t r0, int64_t r1, int64_t D, const T* mp, int64_t smp, const T* lp, int64_t slp,
                   const T* mq, int64_t smq, const T* lq, int64_t slq, float* out) {
  const fVec one(1.f);
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = mp + r * smp;
    const T* b = lp + r * slp;
    const T* c = mq + r * smq;
    const T* e = lq + r * slq;
    fVec acc0(0.f), acc1(0.f);
    int64_t j = 0;
    for (; j + 2 * kW <= D; j += 2 * kW) {
      for (int u = 0; u < 2; ++u) {
        const int64_t o = j + u * kW;
        const fVec vmp = load_f(a + o), vlp = load_f(b + o), vmq = load_f(c + o), vlq = load_f(e + o);
        const fVec diff = vmp - vmq;
        const fVec t = (vlq - vlp) + (vlp - vlq).exp() + diff * diff * vlq.neg().exp() - one;
        if (u == 0) acc0 = acc0 + t; else acc1 = acc1 + t;
      }
    }
    for (; j + kW <= D; j += kW) {
      const fVec vmp = load_f(a + j), vlp = load_f(b + j), vmq = load_f(c + j), vlq = load_f(e + j);
      const fVec diff = vmp - vmq;
      acc0 = acc0 + ((vlq - vlp) + (vlp - vlq).exp() + diff * diff * vlq.neg().exp() - one);
    }
    float s = hsum(acc0 + acc1);
    for (; j < D; ++j) {
      const float fmp = float(a[j]), flp = float(b[j]), fmq = float(c[j]), flq = float(e[j]);
      const float diff = fmp - fmq;
      s += (flq - flp) + std::exp(flp - flq) + diff * diff * std::exp(-flq) - 1.f;
    }
    out[r] = 0.5f * s;
  }
}

template <typename T>
void kl_bwd_rows_t(int64_t r0, int64_t r1, int64_t D, const float* grad, int64_t grad_stride, float scale,
                   const T* mp, int64_t smp, const T* lp, int64_t slp, const T* mq, int64_t smq, const T* lq,
                   int64_t slq, T* dmp, T* dlp, T* dmq, T* dlq) {
  const fVec one(1.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float g = scale * grad[r * grad_stride];
    const fVec vg(g), vhg(0.5f * g);
    const T* a = mp + r * smp;
    const T* b = lp + r * slp;
    const T* c = mq + r * smq;
    const T* e = lq + r * slq;
    T* oa = dmp + r * D;
    T* ob = dlp + r * D;
    T* oc = dmq + r * D;
    T* oe = dlq + r * D;
    int64_t j = 0;
    for (; j + kW <= D; j += kW) {
      const fVec vmp = load_f(a + j), vlp = load_f(b + j), vmq = load_f(c + j), vlq = load_f(e + j);
      const fVec diff = vmp - vmq;
      const fVec inv_q = vlq.neg().exp();
      const fVec ratio = (vlp - vlq).exp();
      const fVec t = vg * diff * inv_q;
      store_f(oa + j, t);
      store_f(oc + j, t.neg());
      store_f(ob + j, vhg * (ratio - one));
      store_f(oe + j, vhg * (one - ratio - diff * diff * inv_q));
    }
    for (; j < D; ++j) {
      const float fmp = float(a[j]), flp = float(b[j]), fmq = float(c[j]), flq = float(e[j]);
      const float diff = fmp - fmq;
      const float inv_q = std::exp(-flq);
      const float ratio = std::exp(flp - flq);
      const float t = g * diff * inv_q;
      oa[j] = T(t);
      oc[j] = T(-t);
      ob[j] = T(0.5f * g * (ratio - 1.f));
      oe[j] = T(0.5f * g * (1.f - ratio - diff * diff * inv_q));
    }
  }
}

void kl_fwd_rows(Dt dt, int64_t r0, int64_t r1, int64_t D, const void* mp, int64_t smp, const void* lp,
                 int64_t slp, const void* mq, int64_t smq, const void* lq, int64_t slq, float* out) {
  URKLE_DISPATCH_DT(dt, [&] {
    kl_fwd_rows_t<scalar_t>(r0, r1, D, static_cast<const scalar_t*>(mp), smp, static_cast<const scalar_t*>(lp),
                            slp, static_cast<const scalar_t*>(mq), smq, static_cast<const scalar_t*>(lq), slq,
                            out);
  });
}

void kl_bwd_rows(Dt dt, int64_t r0, int64_t r1, int64_t D, const float* grad, int64_t grad_stride, float scale,
                 const void* mp, int64_t smp, const void* lp, int64_t slp, const void* mq, int64_t smq,
                 const void* lq, int64_t slq, void* dmp, void* dlp, void* dmq, void* dlq) {
  URKLE_DISPATCH_DT(dt, [&] {
    kl_bwd_rows_t<scalar_t>(r0, r1, D, grad, grad_stride, scale, static_cast<const scalar_t*>(mp), smp,
                            static_cast<const scalar_t*>(lp), slp, static_cast<const scalar_t*>(mq), smq,
                            static_cast<const scalar_t*>(lq), slq, static_cast<scalar_t*>(dmp),
                            static_cast<scalar_t*>(dlp), static_cast<scalar_t*>(dmq), static_cast<scalar_t*>(dlq));
  });
}

// ================================================================================================ PGD

template <typename T>
void pgd_linf_t(int64_t n, T* x, const T* g, const T* x0, float alpha, float eps, float lo, float hi) {
  const fVec va(alpha), ve(eps), vlo(lo), vhi(hi), zero(0.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const fVec vx = load_f(x + i), vg = load_f(g + i), vx0 = load_f(x0 + i);
    const fVec sign = vg.gt(zero) - vg.lt(zero);  // sign(0) = 0
    fVec y = vx + va * sign;
    y = at::vec::minimum(at::vec::maximum(y, vx0 - ve), vx0 + ve);
    y = at::vec::minimum(at::vec::maximum(y, vlo), vhi);
    store_f(x + i, y);
  }
  for (; i < n; ++i) {
    const float fg = float(g[i]), fx0 = float(x0[i]);
    const float sign = float(fg > 0.f) - float(fg < 0.f);
    float y = float(x[i]) + alpha * sign;
    y = std::min(std::max(y, fx0 - eps), fx0 + eps);
    y = std::min(std::max(y, lo), hi);
    x[i] = T(y);
  }
}

template <typename T>
void pgd_l2_sums_t(int64_t n, const T* x, const T* g, const T* x0, double* sums) {
  // float lanes for at most 64 vectors at a time, then into double: the norms decide the projection
  double sgg = 0.0, sdg = 0.0, sdd = 0.0;
  constexpr int64_t kBlock = 64 * kW;
  int64_t i = 0;
  while (i + kW <= n) {
    fVec gg(0.f), dg(0.f), dd(0.f);
    const int64_t end = std::min(n, i + kBlock);
    for (; i + kW <= end; i += kW) {
      const fVec vg = load_f(g + i);
      const fVec d = load_f(x + i) - load_f(x0 + i);
      gg = at::vec::fmadd(vg, vg, gg);
      dg = at::vec::fmadd(d, vg, dg);
      dd = at::vec::fmadd(d, d, dd);
    }
    sgg += hsum(gg);
    sdg += hsum(dg);
    sdd += hsum(dd);
  }
  for (; i < n; ++i) {
    const float fg = float(g[i]);
    const float d = float(x[i]) - float(x0[i]);
    sgg += double(fg) * fg;
    sdg += double(d) * fg;
    sdd += double(d) * d;
  }
  sums[0] += sgg;
  sums[1] += sdg;
  sums[2] += sdd;
}

template <typename T>
void pgd_l2_apply_t(int64_t n, T* x, const T* g, const T* x0, float step, float factor, float lo, float hi) {
  const fVec vs(step), vf(factor), vlo(lo), vhi(hi);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const fVec vx0 = load_f(x0 + i);
    const fVec delta = (load_f(x + i) + vs * load_f(g + i)) - vx0;
    const fVec y = vx0 + delta * vf;
    store_f(x + i, at::vec::minimum(at::vec::maximum(y, vlo), vhi));
  }
  for (; i < n; ++i) {
    const float fx0 = float(x0[i]);
    const float delta = (float(x[i]) + step * float(g[i])) - fx0;
    const float y = fx0 + delta * factor;
    x[i] = T(std::min(std::max(y, lo), hi));
  }
}

void pgd_linf(Dt dt, int64_t n, void* x, const void* g, const void* x0, float alpha, float eps, float lo,
              float hi) {
  URKLE_DISPATCH_DT(dt, [&] {
    pgd_linf_t<scalar_t>(n, static_cast<scalar_t*>(x), static_cast<const scalar_t*>(g),
                         static_cast<const scalar_t*>(x0), alpha, eps, lo, hi);
  });
}

void pgd_l2_sums(Dt dt, int64_t n, const void* x, const void* g, const void* x0, double* sums) {
  URKLE_DISPATCH_DT(dt, [&] {
    pgd_l2_sums_t<scalar_t>(n, static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(g),
                            static_cast<const scalar_t*>(x0), sums);
  });
}

void pgd_l2_apply(Dt dt, int64_t n, void* x, const void* g, const void* x0, float step, float factor, float lo,
                  float hi) {
  URKLE_DISPATCH_DT(dt, [&] {
    pgd_l2_apply_t<scalar_t>(n, static_cast<scalar_t*>(x), static_cast<const scalar_t*>(g),
                             static_cast<const scalar_t*>(x0), step, factor, lo, hi);
  });
}

// ============================================================================================ NT-Xent

template <typename T>
void normalize_rows_t(int64_t r0, int64_t r1, int64_t d, const T* z, int64_t sz, float* u, float* inv_norm) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* zr = z + r * sz;
    float* ur = u + r * d;
    // convert once into u, then scale in place (u is the float32 copy anyway)
    fVec acc(0.f);
    int64_t j = 0;
    for (; j + kW <= d; j += kW) {
      const fVec v = load_f(zr + j);
      v.store(ur + j);
      acc = at::vec::fmadd(v, v, acc);
    }
    float ss = hsum(acc);
    for (; j < d; ++j) {
      const float v = float(zr[j]);
      ur[j] = v;
      ss += v * v;
    }
    const float inv = 1.f / std::max(std::sqrt(ss), 1e-12f);
    inv_norm[r] = inv;
    const fVec vinv(inv);
    j = 0;
    for (; j + kW <= d; j += kW) (fVec::loadu(ur + j) * vinv).store(ur + j);
    for (; j < d; ++j) ur[j] *= inv;
  }
}

void normalize_rows(Dt dt, int64_t r0, int64_t r1, int64_t d, const void* z, int64_t sz, float* u,
                    float* inv_norm) {
  URKLE_DISPATCH_DT(dt, [&] {
    normalize_rows_t<scalar_t>(r0, r1, d, static_cast<const scalar_t*>(z), sz, u, inv_norm);
  });
}

// exp_u20: ATen's fast polynomial exp (AVX2/AVX512), a few ulp; plenty for a sum of exponentials whose
// result is only ever used through its log.
void lse_update(const float* s, int64_t n, float* m, float* l) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  fVec vmax(neg_inf);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) vmax = at::vec::maximum(vmax, fVec::loadu(s + j));
  float mt = hmax(vmax);
  for (; j < n; ++j) mt = std::max(mt, s[j]);
  if (mt == neg_inf) return;  // every entry of this tile row is excluded
  const float m_new = std::max(*m, mt);
  const fVec vm(m_new);
  fVec acc(0.f);
  j = 0;
  for (; j + kW <= n; j += kW) acc = acc + (fVec::loadu(s + j) - vm).exp_u20();
  float sum = hsum(acc);
  for (; j < n; ++j) sum += std::exp(s[j] - m_new);
  *l = *l * std::exp(*m - m_new) + sum;
  *m = m_new;
}

void scaled_softmax(float* s, int64_t n, float lse, float coef) {
  const fVec vl(lse), vc(coef);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) (vc * (fVec::loadu(s + j) - vl).exp_u20()).store(s + j);
  for (; j < n; ++j) s[j] = coef * std::exp(s[j] - lse);
}

void scaled_softmax_cols(float* s, int64_t n, const float* lse, const float* coef) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    (fVec::loadu(coef + j) * (fVec::loadu(s + j) - fVec::loadu(lse + j)).exp_u20()).store(s + j);
  }
  for (; j < n; ++j) s[j] = coef[j] * std::exp(s[j] - lse[j]);
}

template <typename T>
void normalize_bwd_rows_t(int64_t r0, int64_t r1, int64_t d, const float* du, const float* u,
                          const float* inv_norm, T* dz) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dur = du + r * d;
    const float* ur = u + r * d;
    T* dzr = dz + r * d;
    fVec acc(0.f);
    int64_t j = 0;
    for (; j + kW <= d; j += kW) acc = at::vec::fmadd(fVec::loadu(ur + j), fVec::loadu(dur + j), acc);
    float dot = hsum(acc);
    for (; j < d; ++j) dot += ur[j] * dur[j];
    const float inv = inv_norm[r];
    const fVec vdot(dot), vinv(inv);
    j = 0;
    for (; j + kW <= d; j += kW) {
      store_f(dzr + j, (fVec::loadu(dur + j) - fVec::loadu(ur + j) * vdot) * vinv);
    }
    for (; j < d; ++j) dzr[j] = T((dur[j] - ur[j] * dot) * inv);
  }
}

void normalize_bwd_rows(Dt dt, int64_t r0, int64_t r1, int64_t d, const float* du, const float* u,
                        const float* inv_norm, void* dz) {
  URKLE_DISPATCH_DT(dt, [&] {
    normalize_bwd_rows_t<scalar_t>(r0, r1, d, du, u, inv_norm, static_cast<scalar_t*>(dz));
  });
}

float dot(const float* a, const float* b, int64_t n) {
  fVec acc(0.f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) acc = at::vec::fmadd(fVec::loadu(a + j), fVec::loadu(b + j), acc);
  float s = hsum(acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

void axpy(float a, const float* x, float* y, int64_t n) {
  const fVec va(a);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) at::vec::fmadd(va, fVec::loadu(x + j), fVec::loadu(y + j)).store(y + j);
  for (; j < n; ++j) y[j] += a * x[j];
}

void sum_rows(const float* x, int64_t count, int64_t stride, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    fVec acc = fVec::loadu(x + j);
    for (int64_t t = 1; t < count; ++t) acc = acc + fVec::loadu(x + t * stride + j);
    acc.store(y + j);
  }
  for (; j < n; ++j) {
    float acc = x[j];
    for (int64_t t = 1; t < count; ++t) acc += x[t * stride + j];
    y[j] = acc;
  }
}

#undef URKLE_DISPATCH_DT

}  // namespace

#define URKLE_STR2(x) #x
#define URKLE_STR(x) URKLE_STR2(x)

extern const KernelTable table;
const KernelTable table = {
    URKLE_STR(CPU_CAPABILITY),
    kl_fwd_rows,
    kl_bwd_rows,
    pgd_linf,
    pgd_l2_sums,
    pgd_l2_apply,
    normalize_rows,
    lse_update,
    scaled_softmax,
    scaled_softmax_cols,
    normalize_bwd_rows,
    dot,
    axpy,
    sum_rows,
};

#undef URKLE_STR
#undef URKLE_STR2

}  // namespace CPU_CAPABILITY
}  // namespace urkle_fast::cpu
