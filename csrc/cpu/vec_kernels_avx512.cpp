// AVX512 copy of the inner loops; chosen at run time by kernels() (vec_kernels_default.cpp).
// setup.py compiles all of csrc/cpu with the same flags, so the target is raised here, before any include.
#include "vec_kernels.h"
#ifdef URKLE_FAST_X86_DISPATCH
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "isa_x86.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "vec_kernels_impl.h"
#endif
