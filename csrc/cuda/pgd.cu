// PGD steps, CUDA, in place on x_adv (docs/MATH.md section 3, docs/KERNEL_CONTRACT.md).
//
// l_inf: one elementwise pass over the flat memory when the three tensors share a dense layout
// (contiguous, channels_last, ...), else on contiguous copies copied back into x_adv.
// l2: per-sample partial sums (||g||^2, (x - x0).g, ||x - x0||^2 in double) over chunks, a per-sample
// step / projection factor, then one elementwise pass. Compiled only when setup.py finds nvcc.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "../cpu/checks.h"
#include "common.cuh"

namespace urkle_fast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void pgd_linf_kernel(T* __restrict__ x,         // [n] flat, in place
                                const T* __restrict__ g,   // [n]
                                const T* __restrict__ x0,  // [n]
                                int64_t n_packs, float alpha, float eps, float lo, float hi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    auto px = reinterpret_cast<Pack<T, VEC>*>(x)[i];
    const auto pg = reinterpret_cast<const Pack<T, VEC>*>(g)[i];
    const auto p0 = reinterpret_cast<const Pack<T, VEC>*>(x0)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float fg = static_cast<float>(pg.v[k]), f0 = static_cast<float>(p0.v[k]);
      const float sign = static_cast<float>(fg > 0.f) - static_cast<float>(fg < 0.f);  // sign(0) = 0
      float y = static_cast<float>(px.v[k]) + alpha * sign;
      y = fminf(fmaxf(y, f0 - eps), f0 + eps);
      y = fminf(fmaxf(y, lo), hi);
      px.v[k] = static_cast<T>(y);
    }
    reinterpret_cast<Pack<T, VEC>*>(x)[i] = px;
  }
}

// partial[(s * chunks + c) * 3 + {0,1,2}] = sums over chunk c of sample s; grid (chunks, samples)
template <typename T>
__global__ void pgd_l2_sums_kernel(const T* __restrict__ x, const T* __restrict__ g,
                                   const T* __restrict__ x0,  // [S, per] flat
                                   int64_t per, int64_t chunk, double* __restrict__ partial) {
  const int64_t s = blockIdx.y, c = blockIdx.x;
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < per ? begin + chunk : per;
  const int64_t base = s * per;
  double gg = 0.0, dg = 0.0, dd = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float fg = static_cast<float>(g[base + i]);
    const float d = static_cast<float>(x[base + i]) - static_cast<float>(x0[base + i]);
    gg += double(fg) * fg;
    dg += double(d) * fg;
    dd += double(d) * d;
  }
  __shared__ double sh[3][32];
  gg = warp_sum(gg);
  dg = warp_sum(dg);
  dd = warp_sum(dd);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  if (lane == 0) {
    sh[0][warp] = gg;
    sh[1][warp] = dg;
    sh[2][warp] = dd;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    gg = lane < nw ? sh[0][lane] : 0.0;
    dg = lane < nw ? sh[1][lane] : 0.0;
    dd = lane < nw ? sh[2][lane] : 0.0;
    gg = warp_sum(gg);
    dg = warp_sum(dg);
    dd = warp_sum(dd);
    if (lane == 0) {
      double* out = partial + (s * gridDim.x + c) * 3;
      out[0] = gg;
      out[1] = dg;
      out[2] = dd;
    }
  }
}

// per sample: step = alpha / ||g||, factor = min(1, eps / ||delta||) with
// ||delta||^2 = ||d||^2 + 2 step d.g + step^2 ||g||^2 (d = x - x0)
__global__ void pgd_l2_factors_kernel(const double* __restrict__ partial, int64_t S, int64_t chunks,
                                      double alpha, double eps, float* __restrict__ step,
                                      float* __restrict__ factor) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double gg = 0.0, dg = 0.0, dd = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      gg += partial[(s * chunks + c) * 3];
      dg += partial[(s * chunks + c) * 3 + 1];
      dd += partial[(s * chunks + c) * 3 + 2];
    }
    const double a = alpha / fmax(sqrt(gg), 1e-12);
    const double dn = sqrt(fmax(dd + 2.0 * a * dg + a * a * gg, 0.0));
    step[s] = static_cast<float>(a);
    factor[s] = static_cast<float>(fmin(1.0, eps / fmax(dn, 1e-12)));
  }
}

template <typename T>
__global__ void pgd_l2_apply_kernel(T* __restrict__ x, const T* __restrict__ g,
                                    const T* __restrict__ x0,  // [S, per] flat
                                    int64_t n, int64_t per, const float* __restrict__ step,
                                    const float* __restrict__ factor, float lo, float hi) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = i / per;
    const float f0 = static_cast<float>(x0[i]);
    const float delta = (static_cast<float>(x[i]) + step[s] * static_cast<float>(g[i])) - f0;
    const float y = f0 + delta * factor[s];
    x[i] = static_cast<T>(fminf(fmaxf(y, lo), hi));
  }
}

void pgd_step_linf_cuda(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig, double alpha,
                        double eps, double lo, double hi) {
  constexpr const char* fn = "pgd_step_linf_native_";
  urkle_fast::cpu::check_pgd_inputs(fn, x_adv, grad, x_orig, alpha, eps, lo, hi, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const int64_t n = x_adv.numel();
  if (n == 0) return;
  const bool direct = x_adv.is_non_overlapping_and_dense();
  at::Tensor x = direct ? x_adv : x_adv.contiguous();
  const at::Tensor g = urkle_fast::cpu::in_layout_of(grad, x);
  const at::Tensor x0 = urkle_fast::cpu::in_layout_of(x_orig, x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float a = float(alpha), e = float(eps), l = float(lo), h = float(hi);
  URKLE_CUDA_DISPATCH_FLOAT(x.scalar_type(), fn, [&] {
    auto* xp = x.data_ptr<scalar_t>();
    const auto* gp = g.const_data_ptr<scalar_t>();
    const auto* x0p = x0.const_data_ptr<scalar_t>();
    constexpr int V = kVec<scalar_t>;
    if (n % V == 0 && aligned16(xp) && aligned16(gp) && aligned16(x0p)) {
      pgd_linf_kernel<scalar_t, V><<<grid_for(n / V, kThreads), kThreads, 0, stream>>>(xp, gp, x0p, n / V, a, e, l, h);
    } else {
      pgd_linf_kernel<scalar_t, 1><<<grid_for(n, kThreads), kThreads, 0, stream>>>(xp, gp, x0p, n, a, e, l, h);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!direct) x_adv.copy_(x);
}

void pgd_step_l2_cuda(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_orig, double alpha,
                      double eps, double lo, double hi) {
  constexpr const char* fn = "pgd_step_l2_native_";
  urkle_fast::cpu::check_pgd_inputs(fn, x_adv, grad, x_orig, alpha, eps, lo, hi, c10::DeviceType::CUDA);
  TORCH_CHECK(x_adv.dim() >= 1, fn, ": x_adv must have a batch dimension (dim >= 1), got a 0-D tensor");
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const int64_t n = x_adv.numel();
  if (n == 0) return;
  const bool direct = urkle_fast::cpu::samples_are_blocks(x_adv);
  at::Tensor x = direct ? x_adv : x_adv.contiguous();
  const at::Tensor g = urkle_fast::cpu::in_layout_of(grad, x);
  const at::Tensor x0 = urkle_fast::cpu::in_layout_of(x_orig, x);
  const int64_t S = x.size(0), per = n / S;
  const int64_t chunk = 16 * kThreads * 8;  // 32K elements per block of the reduction
  const int64_t chunks = ceil_div(per, chunk);
  TORCH_CHECK(chunks <= 2147483647LL && S <= 65535, fn, ": at most 65535 samples of 2^31 chunks, got ", S,
              " samples of ", per, " elements");
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial = at::empty({S * chunks * 3}, x.options().dtype(at::kDouble));
  at::Tensor step = at::empty({S}, x.options().dtype(at::kFloat));
  at::Tensor factor = at::empty({S}, x.options().dtype(at::kFloat));
  URKLE_CUDA_DISPATCH_FLOAT(x.scalar_type(), fn, [&] {
    auto* xp = x.data_ptr<scalar_t>();
    const auto* gp = g.const_data_ptr<scalar_t>();
    const auto* x0p = x0.const_data_ptr<scalar_t>();
    pgd_l2_sums_kernel<scalar_t><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(S)), kThreads, 0,
                                   stream>>>(xp, gp, x0p, per, chunk, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pgd_l2_factors_kernel<<<grid_for(S, kThreads), kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), S, chunks, alpha, eps, step.data_ptr<float>(), factor.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pgd_l2_apply_kernel<scalar_t><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        xp, gp, x0p, n, per, step.const_data_ptr<float>(), factor.const_data_ptr<float>(), float(lo), float(hi));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!direct) x_adv.copy_(x);
}

}  // namespace
}  // namespace urkle_fast::cuda

TORCH_LIBRARY_IMPL(urkle_fast, CUDA, m) {
  m.impl("pgd_step_linf_native_", &urkle_fast::cuda::pgd_step_linf_cuda);
  m.impl("pgd_step_l2_native_", &urkle_fast::cuda::pgd_step_l2_cuda);
}
