// Shared bits of the CUDA kernels: packed loads, warp reductions, launch helpers.
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter needs cusparse.h, which the
// toolkit on the development machines lacks (ENVIRONMENT.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace urkle_fast::cuda {

// N elements of T moved as one 16-byte (or smaller) access
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// elements per 16-byte access
template <typename T>
constexpr int kVec = 16 / sizeof(T);

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// enough blocks to fill the GPU several times over for a grid-stride loop, at least one
inline int64_t grid_for(int64_t work_items, int threads) {
  const int64_t cap = 65535LL * 8;
  const int64_t g = ceil_div(work_items, threads);
  return g < 1 ? 1 : (g > cap ? cap : g);
}

#define URKLE_CUDA_DISPATCH_FLOAT(st, NAME, ...)                                     \
  [&] {                                                                             \
    switch (st) {                                                                   \
      case at::kFloat: {                                                            \
        using scalar_t = float;                                                     \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::kBFloat16: {                                                         \
        using scalar_t = c10::BFloat16;                                             \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case at::kHalf: {                                                             \
        using scalar_t = c10::Half;                                                 \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      default:                                                                      \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", st);                      \
    }                                                                               \
  }()

}  // namespace urkle_fast::cuda
