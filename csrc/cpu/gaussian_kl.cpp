// Gaussian KL, CPU: one pass over the four [B, D] inputs per direction (docs/MATH.md section 2,
// docs/KERNEL_CONTRACT.md). Rows are split across threads; each row is one vectorised float32 sum.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "checks.h"
#include "vec_kernels.h"

namespace urkle_fast::cpu {
namespace {

constexpr const char* kFwd = "gaussian_kl_fwd_native";
constexpr const char* kBwd = "gaussian_kl_bwd_native";

// rows per task: about 32K elements, so that small batches stay on one thread
int64_t row_grain(int64_t D) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
}

at::Tensor gaussian_kl_fwd_cpu(const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& mu_q,
                               const at::Tensor& logvar_q, int64_t reduction) {
  check_kl_inputs(kFwd, mu_p, logvar_p, mu_q, logvar_q, reduction, c10::DeviceType::CPU);
  const int64_t B = mu_p.size(0), D = mu_p.size(1);
  const at::Tensor mp = rows_unit_stride(mu_p), lp = rows_unit_stride(logvar_p);
  const at::Tensor mq = rows_unit_stride(mu_q), lq = rows_unit_stride(logvar_q);
  const Dt dt = to_dt(mu_p.scalar_type());
  const KernelTable& k = kernels();

  at::Tensor rows = at::empty({B}, mu_p.options().dtype(at::kFloat));
  float* out = rows.data_ptr<float>();
  if (B > 0 && D > 0) {
    at::parallel_for(0, B, row_grain(D), [&](int64_t r0, int64_t r1) {
      k.kl_fwd_rows(dt, r0, r1, D, mp.const_data_ptr(), mp.stride(0), lp.const_data_ptr(), lp.stride(0),
                    mq.const_data_ptr(), mq.stride(0), lq.const_data_ptr(), lq.stride(0), out);
    });
  } else if (B > 0) {
    rows.zero_();
  }
  if (reduction == 0) {
    return rows;
  }
  // the reduction over B rows: in double, so sum and mean do not depend on the thread count
  double total = 0.0;
  for (int64_t r = 0; r < B; ++r) total += out[r];
  if (reduction == 2) {
    total = B > 0 ? total / double(B) : std::numeric_limits<double>::quiet_NaN();
  }
  at::Tensor result = at::empty({}, mu_p.options().dtype(at::kFloat));
  *result.data_ptr<float>() = static_cast<float>(total);
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& mu_q,
    const at::Tensor& logvar_q, int64_t reduction) {
  check_kl_inputs(kBwd, mu_p, logvar_p, mu_q, logvar_q, reduction, c10::DeviceType::CPU);
  const int64_t B = mu_p.size(0), D = mu_p.size(1);
  check_kl_grad(kBwd, grad, B, reduction, c10::DeviceType::CPU);
  const at::Tensor g = reduction == 0 ? grad.contiguous() : grad.reshape({1}).contiguous();
  const float scale = reduction == 2 ? 1.f / static_cast<float>(std::max<int64_t>(B, 1)) : 1.f;
  const int64_t g_stride = reduction == 0 ? 1 : 0;

  const at::Tensor mp = rows_unit_stride(mu_p), lp = rows_unit_stride(logvar_p);
  const at::Tensor mq = rows_unit_stride(mu_q), lq = rows_unit_stride(logvar_q);
  const Dt dt = to_dt(mu_p.scalar_type());
  const KernelTable& k = kernels();
  auto opts = mu_p.options();
  at::Tensor d_mp = at::empty({B, D}, opts), d_lp = at::empty({B, D}, opts);
  at::Tensor d_mq = at::empty({B, D}, opts), d_lq = at::empty({B, D}, opts);
  if (B > 0 && D > 0) {
    const float* gp = g.const_data_ptr<float>();
    at::parallel_for(0, B, row_grain(D), [&](int64_t r0, int64_t r1) {
      k.kl_bwd_rows(dt, r0, r1, D, gp, g_stride, scale, mp.const_data_ptr(), mp.stride(0), lp.const_data_ptr(),
                    lp.stride(0), mq.const_data_ptr(), mq.stride(0), lq.const_data_ptr(), lq.stride(0),
                    d_mp.data_ptr(), d_lp.data_ptr(), d_mq.data_ptr(), d_lq.data_ptr());
    });
  }
  return {d_mp, d_lp, d_mq, d_lq};
}

}  // namespace
}  // namespace urkle_fast::cpu

TORCH_LIBRARY_IMPL(urkle_fast, CPU, m) {
  m.impl("gaussian_kl_fwd_native", &urkle_fast::cpu::gaussian_kl_fwd_cpu);
  m.impl("gaussian_kl_bwd_native", &urkle_fast::cpu::gaussian_kl_bwd_cpu);
}
