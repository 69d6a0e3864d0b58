// Argument checks of the native ops, flash-attention CHECK_SHAPE style: every message names the op, the
// argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "vec_kernels.h"

namespace urkle_fast::cpu {

inline void check_defined(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a defined tensor, got an undefined one");
}

inline void check_dim(const char* fn, const char* name, const at::Tensor& t, int64_t dim, const char* what) {
  check_defined(fn, name, t);
  TORCH_CHECK(t.dim() == dim, fn, ": ", name, " must be ", dim, "-D ", what, ", got ", t.dim(), "-D with shape ",
              t.sizes());
}

inline void check_device(const char* fn, const char* name, const at::Tensor& t, c10::DeviceType dev) {
  TORCH_CHECK(t.device().type() == dev, fn, ": ", name, " must be on ", c10::DeviceTypeName(dev, true),
              ", got ", t.device());
}

inline void check_float_dtype(const char* fn, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, fn, ": ", name,
              " must have dtype float32, bfloat16 or float16, got ", st);
}

inline void check_like(const char* fn, const char* ref_name, const at::Tensor& ref, const char* name,
                       const at::Tensor& t) {
  check_defined(fn, name, t);
  TORCH_CHECK(t.sizes() == ref.sizes(), fn, ": ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline Dt to_dt(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return Dt::F32;
    case at::kBFloat16:
      return Dt::BF16;
    case at::kHalf:
      return Dt::F16;
    default:
      TORCH_CHECK(false, "urkle_fast: unsupported dtype ", st);
  }
}

// A [R, C] matrix the kernels can walk row by row: unit inner stride (row stride free), else a copy.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) {
    return t;
  }
  return t.contiguous();
}

// ---- checks and layout helpers shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of an op;
// `dev` is the device type the kernel runs on.

inline void check_kl_inputs(const char* fn, const at::Tensor& mu_p, const at::Tensor& logvar_p,
                            const at::Tensor& mu_q, const at::Tensor& logvar_q, int64_t reduction,
                            c10::DeviceType dev) {
  check_dim(fn, "mu_p", mu_p, 2, "[B, D]");
  check_device(fn, "mu_p", mu_p, dev);
  check_float_dtype(fn, "mu_p", mu_p);
  check_like(fn, "mu_p", mu_p, "logvar_p", logvar_p);
  check_like(fn, "mu_p", mu_p, "mu_q", mu_q);
  check_like(fn, "mu_p", mu_p, "logvar_q", logvar_q);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, fn, ": reduction must be 0 (none), 1 (sum) or 2 (mean), got ",
              reduction);
}

// the upstream gradient of the KL: float32, [B] for reduction 0, a scalar otherwise
inline void check_kl_grad(const char* fn, const at::Tensor& grad, int64_t B, int64_t reduction,
                          c10::DeviceType dev) {
  check_defined(fn, "grad", grad);
  check_device(fn, "grad", grad, dev);
  TORCH_CHECK(grad.scalar_type() == at::kFloat, fn, ": grad must be float32, got ", grad.scalar_type());
  if (reduction == 0) {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B, fn, ": grad must have shape [B] = [", B,
                "] for reduction 0 (none), got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, fn, ": grad must be a scalar (shape []) for reduction ", reduction,
                ", got shape ", grad.sizes());
  }
}

inline void check_pgd_inputs(const char* fn, const at::Tensor& x_adv, const at::Tensor& grad,
                             const at::Tensor& x_orig, double alpha, double eps, double lo, double hi,
                             c10::DeviceType dev) {
  check_defined(fn, "x_adv", x_adv);
  check_device(fn, "x_adv", x_adv, dev);
  check_float_dtype(fn, "x_adv", x_adv);
  check_like(fn, "x_adv", x_adv, "grad", grad);
  check_like(fn, "x_adv", x_adv, "x_orig", x_orig);
  TORCH_CHECK(std::isfinite(alpha), fn, ": alpha must be finite, got ", alpha);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, fn, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(!(lo > hi), fn, ": lo must be <= hi, got lo=", lo, ", hi=", hi);
}

// `t` in the memory layout of the dense tensor `like` (no copy when it already is)
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

// True when every sample (index of dim 0) is one contiguous block of the flat memory.
inline bool samples_are_blocks(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) * t.size(0) == t.numel();
}

}  // namespace urkle_fast::cpu
