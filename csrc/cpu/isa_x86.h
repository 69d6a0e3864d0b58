// Included by the AVX2 and AVX512 copies right after their `#pragma GCC target`: silences the warnings
// of a raised target and defines the ISA macros that g++ does not set for `#pragma GCC target` in C++,
// which sleef.h and at::vec test. No include guard: each copy is its own translation unit.
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
