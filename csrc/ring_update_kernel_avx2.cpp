// The ring_attention_update kernel for x86-64 with AVX2 + FMA + F16C, chosen at run time by
// ring_update::cpu_has_avx2(). The target is set by pragma, not by -mavx2, so the library still
// loads (and runs the baseline kernel) on a CPU without AVX2, and setuptools needs no per-file
// flags. Every header is included BEFORE the pragma: their inline functions stay baseline code
// (inlined into the AVX2 functions at most), so the linker can never pick an AVX2 copy of a
// function that baseline code calls.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

#include "ring_update_common.h"

#ifdef USP_NPU_HAS_AVX2_KERNEL
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define USP_NPU_ISA avx2
#define USP_NPU_ISA_AVX2 1
#include "ring_update_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // USP_NPU_HAS_AVX2_KERNEL
