// AVX2 copy of the inner loops; chosen at run time by kernels() (vec_kernels_default.cpp).
// setup.py compiles all of csrc/cpu with the same flags, so the target is raised here, before any include.
#include "vec_kernels.h"
#ifdef URKLE_FAST_X86_DISPATCH
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// g++ does not define the ISA macros for `#pragma GCC target` in C++; sleef.h and at::vec test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __LZCNT__
#define __LZCNT__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "vec_kernels_impl.h"
#endif
