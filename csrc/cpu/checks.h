// Argument checks of the native ops, flash-attention CHECK_SHAPE style: every message names the op, the
// argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace urkle_fast::cpu
