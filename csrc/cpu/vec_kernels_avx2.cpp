// AVX2 copy of the inner loops; chosen at run time by kernels() (vec_kernels_default.cpp).
// setup.py compiles all of csrc/cpu with the same flags, so the target is raised here, before any include.
#include "vec_kernels.h"
#ifdef URKLE_FAST_X86_DISPATCH
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "isa_x86.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "vec_kernels_impl.h"
#endif
