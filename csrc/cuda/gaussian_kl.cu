// Gaussian KL, CUDA (docs/MATH.md section 2, docs/KERNEL_CONTRACT.md). Forward: one warp per row, 16-byte
// loads, float32 row sums, then ATen's sum for the reduction. Backward: one elementwise pass writing
// the four gradients. Compiled only when setup.py finds nvcc (URKLE_FAST_WITH_CUDA).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <tuple>

#include "../cpu/checks.h"
#include "common.cuh"

namespace urkle_fast::cuda {
namespace {

constexpr const char* kFwd = "gaussian_kl_fwd_native";
constexpr const char* kBwd = "gaussian_kl_bwd_native";
constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void kl_fwd_rows_kernel(const T* __restrict__ mp, int64_t smp,  // [B, D]
                                   const T* __restrict__ lp, int64_t slp,  // [B, D]
                                   const T* __restrict__ mq, int64_t smq,  // [B, D]
                                   const T* __restrict__ lq, int64_t slq,  // [B, D]
                                   int64_t B, int64_t D,
                                   float* __restrict__ rows) {  // [B]
  const int64_t warps = blockDim.x / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; r < B;
       r += static_cast<int64_t>(gridDim.x) * warps) {
    const T* a = mp + r * smp;
    const T* b = lp + r * slp;
    const T* c = mq + r * smq;
    const T* e = lq + r * slq;
    float acc = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < D; j += 32 * VEC) {
      const auto pa = *reinterpret_cast<const Pack<T, VEC>*>(a + j);
      const auto pb = *reinterpret_cast<const Pack<T, VEC>*>(b + j);
      const auto pc = *reinterpret_cast<const Pack<T, VEC>*>(c + j);
      const auto pe = *reinterpret_cast<const Pack<T, VEC>*>(e + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float fmp = static_cast<float>(pa.v[k]), flp = static_cast<float>(pb.v[k]);
        const float fmq = static_cast<float>(pc.v[k]), flq = static_cast<float>(pe.v[k]);
        const float diff = fmp - fmq;
        // exp(lp - lq), not exp(lp) * exp(-lq): no overflow when both log-variances are large
        acc += (flq - flp) + expf(flp - flq) + diff * diff * expf(-flq) - 1.f;
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) rows[r] = 0.5f * acc;
  }
}

template <typename T, int VEC>
__global__ void kl_bwd_kernel(const float* __restrict__ grad, int64_t grad_stride, float scale,  // [B] or [1]
                              const T* __restrict__ mp, int64_t smp,  // [B, D]
                              const T* __restrict__ lp, int64_t slp,  // [B, D]
                              const T* __restrict__ mq, int64_t smq,  // [B, D]
                              const T* __restrict__ lq, int64_t slq,  // [B, D]
                              int64_t B, int64_t D,
                              T* __restrict__ dmp, T* __restrict__ dlp,  // [B, D] contiguous
                              T* __restrict__ dmq, T* __restrict__ dlq) {  // [B, D] contiguous
  const int64_t per_row = D / VEC;
  const int64_t total = B * per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / per_row;
    const int64_t j = (idx - r * per_row) * VEC;
    const float g = scale * grad[r * grad_stride];
    const auto pa = *reinterpret_cast<const Pack<T, VEC>*>(mp + r * smp + j);
    const auto pb = *reinterpret_cast<const Pack<T, VEC>*>(lp + r * slp + j);
    const auto pc = *reinterpret_cast<const Pack<T, VEC>*>(mq + r * smq + j);
    const auto pe = *reinterpret_cast<const Pack<T, VEC>*>(lq + r * slq + j);
    Pack<T, VEC> oa, ob, oc, oe;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float fmp = static_cast<float>(pa.v[k]), flp = static_cast<float>(pb.v[k]);
      const float fmq = static_cast<float>(pc.v[k]), flq = static_cast<float>(pe.v[k]);
      const float diff = fmp - fmq;
      const float inv_q = expf(-flq);
      const float ratio = expf(flp - flq);
      const float t = g * diff * inv_q;
      oa.v[k] = static_cast<T>(t);
      oc.v[k] = static_cast<T>(-t);
      ob.v[k] = static_cast<T>(0.5f * g * (ratio - 1.f));
      oe.v[k] = static_cast<T>(0.5f * g * (1.f - ratio - diff * diff * inv_q));
    }
    const int64_t o = r * D + j;
    *reinterpret_cast<Pack<T, VEC>*>(dmp + o) = oa;
    *reinterpret_cast<Pack<T, VEC>*>(dlp + o) = ob;
    *reinterpret_cast<Pack<T, VEC>*>(dmq + o) = oc;
    *reinterpret_cast<Pack<T, VEC>*>(dlq + o) = oe;
  }
}

// 16-byte accesses when every row start is 16-byte aligned and D is a multiple of the pack
template <typename T>
bool can_pack(int64_t D, std::initializer_list<const at::Tensor*> ts) {
  if (D % kVec<T> != 0) return false;
  for (const at::Tensor* t : ts) {
    if (!aligned16(t->const_data_ptr()) || (t->stride(0) * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  }
  return true;
}

at::Tensor gaussian_kl_fwd_cuda(const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& mu_q,
                                const at::Tensor& logvar_q, int64_t reduction) {
  urkle_fast::cpu::check_kl_inputs(kFwd, mu_p, logvar_p, mu_q, logvar_q, reduction, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu_p.device());
  const int64_t B = mu_p.size(0), D = mu_p.size(1);
  using urkle_fast::cpu::rows_unit_stride;
  const at::Tensor mp = rows_unit_stride(mu_p), lp = rows_unit_stride(logvar_p);
  const at::Tensor mq = rows_unit_stride(mu_q), lq = rows_unit_stride(logvar_q);
  at::Tensor rows = at::empty({B}, mu_p.options().dtype(at::kFloat));
  if (B > 0 && D == 0) rows.zero_();
  if (B > 0 && D > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t blocks = grid_for(B, kThreads / 32);
    URKLE_CUDA_DISPATCH_FLOAT(mu_p.scalar_type(), kFwd, [&] {
      const auto* a = mp.const_data_ptr<scalar_t>();
      const auto* b = lp.const_data_ptr<scalar_t>();
      const auto* c = mq.const_data_ptr<scalar_t>();
      const auto* e = lq.const_data_ptr<scalar_t>();
      if (can_pack<scalar_t>(D, {&mp, &lp, &mq, &lq})) {
        kl_fwd_rows_kernel<scalar_t, kVec<scalar_t>><<<blocks, kThreads, 0, stream>>>(
            a, mp.stride(0), b, lp.stride(0), c, mq.stride(0), e, lq.stride(0), B, D, rows.data_ptr<float>());
      } else {
        kl_fwd_rows_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(
            a, mp.stride(0), b, lp.stride(0), c, mq.stride(0), e, lq.stride(0), B, D, rows.data_ptr<float>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (reduction == 0) return rows;
  at::Tensor total = rows.sum();
  return reduction == 2 ? total.div_(static_cast<double>(B)) : total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& mu_q,
    const at::Tensor& logvar_q, int64_t reduction) {
  urkle_fast::cpu::check_kl_inputs(kBwd, mu_p, logvar_p, mu_q, logvar_q, reduction, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu_p.device());
  const int64_t B = mu_p.size(0), D = mu_p.size(1);
  urkle_fast::cpu::check_kl_grad(kBwd, grad, B, reduction, c10::DeviceType::CUDA);
  const at::Tensor g = reduction == 0 ? grad.contiguous() : grad.reshape({1}).contiguous();
  const float scale = reduction == 2 ? 1.f / static_cast<float>(B > 0 ? B : 1) : 1.f;
  const int64_t g_stride = reduction == 0 ? 1 : 0;
  using urkle_fast::cpu::rows_unit_stride;
  const at::Tensor mp = rows_unit_stride(mu_p), lp = rows_unit_stride(logvar_p);
  const at::Tensor mq = rows_unit_stride(mu_q), lq = rows_unit_stride(logvar_q);
  auto opts = mu_p.options();
  at::Tensor d_mp = at::empty({B, D}, opts), d_lp = at::empty({B, D}, opts);
  at::Tensor d_mq = at::empty({B, D}, opts), d_lq = at::empty({B, D}, opts);
  if (B > 0 && D > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    URKLE_CUDA_DISPATCH_FLOAT(mu_p.scalar_type(), kBwd, [&] {
      const auto* a = mp.const_data_ptr<scalar_t>();
      const auto* b = lp.const_data_ptr<scalar_t>();
      const auto* c = mq.const_data_ptr<scalar_t>();
      const auto* e = lq.const_data_ptr<scalar_t>();
      auto* oa = d_mp.data_ptr<scalar_t>();
      auto* ob = d_lp.data_ptr<scalar_t>();
      auto* oc = d_mq.data_ptr<scalar_t>();
      auto* oe = d_lq.data_ptr<scalar_t>();
      if (can_pack<scalar_t>(D, {&mp, &lp, &mq, &lq})) {  // outputs are fresh, contiguous: aligned too
        constexpr int V = kVec<scalar_t>;
        kl_bwd_kernel<scalar_t, V><<<grid_for(B * (D / V), kThreads), kThreads, 0, stream>>>(
            g.const_data_ptr<float>(), g_stride, scale, a, mp.stride(0), b, lp.stride(0), c, mq.stride(0), e,
            lq.stride(0), B, D, oa, ob, oc, oe);
      } else {
        kl_bwd_kernel<scalar_t, 1><<<grid_for(B * D, kThreads), kThreads, 0, stream>>>(
            g.const_data_ptr<float>(), g_stride, scale, a, mp.stride(0), b, lp.stride(0), c, mq.stride(0), e,
            lq.stride(0), B, D, oa, ob, oc, oe);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {d_mp, d_lp, d_mq, d_lq};
}

}  // namespace
}  // namespace urkle_fast::cuda

TORCH_LIBRARY_IMPL(urkle_fast, CUDA, m) {
  m.impl("gaussian_kl_fwd_native", &urkle_fast::cuda::gaussian_kl_fwd_cuda);
  m.impl("gaussian_kl_bwd_native", &urkle_fast::cuda::gaussian_kl_bwd_cuda);
}
