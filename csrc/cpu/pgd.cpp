// PGD steps, CPU, in place on x_adv (docs/MATH.md section 3, docs/KERNEL_CONTRACT.md).
//
// The three tensors are walked as one flat range of memory whenever they share a dense layout
// (contiguous, channels_last or any other permutation): an elementwise step does not care about the
// logical order. Otherwise the step runs on contiguous copies and is copied back into x_adv.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "vec_kernels.h"

namespace urkle_fast::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: ~100 us of work, amortises the thread wake-up

// The three operands as raw byte pointers over one layout: x_adv itself when `direct` (updated in
// place), else a contiguous copy that finish() writes back.
struct Operands {
  at::Tensor x_adv, x, g, x0;
  bool direct;
  Dt dt;
  int64_t es;
  char* xp;
  const char* gp;
  const char* x0p;

  Operands(at::Tensor& x_adv_, const at::Tensor& grad, const at::Tensor& x_orig, bool direct_)
      : x_adv(x_adv_), x(direct_ ? x_adv_ : x_adv_.contiguous()), direct(direct_) {
    g = in_layout_of(grad, x);
    x0 = in_layout_of(x_orig, x);
    dt = to_dt(x.scalar_type());
    es = x.element_size();
    xp = static_cast<char*>(x.data_ptr());
    gp = static_cast<const char*>(g.const_data_ptr());
    x0p = static_cast<const char*>(x0.const_data_ptr());
  }
  void finish() {
    if (!direct) x_adv.copy_(x);
  }
};

void pgd_step_linf_cpu(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig, double alpha,
                       double eps, double lo, double hi) {
  constexpr const char* fn = "pgd_step_linf_native_";
  check_pgd_inputs(fn, x_adv, grad, x_orig, alpha, eps, lo, hi, c10::DeviceType::CPU);
  const int64_t n = x_adv.numel();
  if (n == 0) return;
  Operands o(x_adv, grad, x_orig, x_adv.is_non_overlapping_and_dense());
  const KernelTable& k = kernels();
  const float a = float(alpha), e = float(eps), l = float(lo), h = float(hi);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t end) {
    k.pgd_linf(o.dt, end - b, o.xp + b * o.es, o.gp + b * o.es, o.x0p + b * o.es, a, e, l, h);
  });
  o.finish();
}

void pgd_step_l2_cpu(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig, double alpha,
                     double eps, double lo, double hi) {
  constexpr const char* fn = "pgd_step_l2_native_";
  check_pgd_inputs(fn, x_adv, grad, x_orig, alpha, eps, lo, hi, c10::DeviceType::CPU);
  TORCH_CHECK(x_adv.dim() >= 1, fn, ": x_adv must have a batch dimension (dim >= 1), got a 0-D tensor");
  const int64_t n = x_adv.numel();
  if (n == 0) return;
  Operands o(x_adv, grad, x_orig, samples_are_blocks(x_adv));
  const Dt dt = o.dt;
  const int64_t es = o.es;
  char* xp = o.xp;
  const char* gp = o.gp;
  const char* x0p = o.x0p;
  const KernelTable& k = kernels();

  const int64_t S = o.x.size(0), per = n / S;
  // pass 1: per sample ||g||^2, (x - x0).g, ||x - x0||^2, over chunks so that one huge sample still
  // uses every thread
  const int64_t chunk = kGrain;
  const int64_t cps = (per + chunk - 1) / chunk;  // chunks per sample
  std::vector<double> partial(static_cast<size_t>(S * cps * 3), 0.0);
  at::parallel_for(0, S * cps, std::max<int64_t>(1, kGrain / std::max<int64_t>(chunk, 1)), [&](int64_t b,
                                                                                              int64_t end) {
    for (int64_t t = b; t < end; ++t) {
      const int64_t s = t / cps, c = t % cps;
      const int64_t off = s * per + c * chunk;
      const int64_t len = std::min(chunk, per - c * chunk);
      k.pgd_l2_sums(dt, len, xp + off * es, gp + off * es, x0p + off * es, &partial[3 * t]);
    }
  });
  // the step is x + a g with a = alpha / ||g||, so ||delta||^2 = ||d||^2 + 2 a d.g + a^2 ||g||^2 (d = x - x0)
  std::vector<float> step(S), factor(S);
  for (int64_t s = 0; s < S; ++s) {
    double gg = 0, dg = 0, dd = 0;
    for (int64_t c = 0; c < cps; ++c) {
      gg += partial[3 * (s * cps + c)];
      dg += partial[3 * (s * cps + c) + 1];
      dd += partial[3 * (s * cps + c) + 2];
    }
    const double a = alpha / std::max(std::sqrt(gg), 1e-12);
    const double dn = std::sqrt(std::max(dd + 2 * a * dg + a * a * gg, 0.0));
    step[s] = float(a);
    factor[s] = float(std::min(1.0, eps / std::max(dn, 1e-12)));
  }
  // pass 2: step, project, clip
  const float l = float(lo), h = float(hi);
  at::parallel_for(0, S * cps, 1, [&](int64_t b, int64_t end) {
    for (int64_t t = b; t < end; ++t) {
      const int64_t s = t / cps, c = t % cps;
      const int64_t off = s * per + c * chunk;
      const int64_t len = std::min(chunk, per - c * chunk);
      k.pgd_l2_apply(dt, len, xp + off * es, gp + off * es, x0p + off * es, step[s], factor[s], l, h);
    }
  });
  o.finish();
}

}  // namespace
}  // namespace urkle_fast::cpu

TORCH_LIBRARY_IMPL(urkle_fast, CPU, m) {
  m.impl("pgd_step_linf_native_", &urkle_fast::cpu::pgd_step_linf_cpu);
  m.impl("pgd_step_l2_native_", &urkle_fast::cpu::pgd_step_l2_cpu);
}
