// The portable copy of the inner loops (at::vec's generic Vectorized), plus the capability choice.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#define CPU_CAPABILITY DEFAULT
#include "vec_kernels_impl.h"

#include <ATen/Version.h>

#include <string>

namespace urkle_fast::cpu {

const KernelTable& kernels() {
  static const KernelTable* chosen = []() -> const KernelTable* {
#ifdef URKLE_FAST_X86_DISPATCH
    // the capability ATen itself runs with (ATEN_CPU_CAPABILITY can lower it), confirmed against the CPU
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
      return &AVX512::table;
    }
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return &AVX2::table;
    }
#endif
    return &DEFAULT::table;
  }();
  return *chosen;
}

}  // namespace urkle_fast::cpu
