// The ring_attention_update kernel for the baseline ISA of the build (SSE2 on x86-64, NEON on
// aarch64): at::vec::Vectorized over the head dim. Runs wherever the library loads.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

#include "ring_update_common.h"

#define USP_NPU_ISA baseline
#define USP_NPU_ISA_AVX2 0
#include "ring_update_impl.h"
