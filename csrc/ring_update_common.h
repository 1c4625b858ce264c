// Shared pieces of the ring_attention_update CPU kernel: the operand description, the element
// conversions, the per-row weights and the kernel entry points. Every kernel translation unit
// includes this before any target pragma, so all of it is baseline-ISA code.
//
// A *row* is one query position of one head: (s, b, n) for SBH, (t, n) for TND. Per row the
// statistics are read once (lane 0), two weights are computed (one exp() per row, none per
// element), and the head_dim-long output is written as out = prev * wa + cur * wb.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace usp_npu::ring_update {

// A tensor seen through the row grid: element (i0, i1, i2) starts at
// ptr + i0 * s0 + i1 * s1 + i2 * s2 (strides in elements, not bytes).
struct Operand {
  void* ptr = nullptr;
  int64_t s0 = 0;
  int64_t s1 = 0;
  int64_t s2 = 0;

  template <typename T>
  T* at(int64_t i0, int64_t i1, int64_t i2) const {
    return static_cast<T*>(ptr) + i0 * s0 + i1 * s1 + i2 * s2;
  }
};

// Everything the kernel needs. Rows form the grid n0 x n1 x n2 (SBH: S x B x N;
// TND: T x 1 x N). The head dim (D elements) of every attn operand is contiguous; the K
// lanes of every statistic are contiguous when lanes > 1.
struct MergeArgs {
  int64_t n0 = 0;
  int64_t n1 = 0;
  int64_t n2 = 0;
  int64_t head_dim = 0;
  int64_t lanes = 1;
  Operand out, prev, cur;  // attn [.., D]
  Operand out_max, out_sum, prev_max, prev_sum, cur_max, cur_sum;  // stats [.., K]
};

// bf16 / fp16 <-> fp32 element conversions, written with integer masks instead of branches so
// that the loops over them auto-vectorise at the baseline ISA (SSE2 / NEON). ATen's generic
// Vectorized<BFloat16/Half> conversions (what an extension built without AVX2 flags gets) run
// element by element through c10::convert and were 3-6x slower here.
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t select_u32(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

inline float bf16_to_f32(uint16_t h) {
  return f32_from_bits(static_cast<uint32_t>(h) << 16);
}

// IEEE half -> float: normal numbers by exponent re-biasing (the multiply by 2^-112 also maps
// inf/NaN), subnormals by a magic-number subtraction; both are computed, one is kept.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const float normal = f32_from_bits((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
  const float subnormal = f32_from_bits((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  const bool is_subnormal = two_w < (UINT32_C(1) << 27);
  return f32_from_bits(sign | select_u32(is_subnormal, f32_bits(subnormal), f32_bits(normal)));
}

// float -> bf16, round to nearest even, NaN -> quiet NaN.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
  const bool is_nan = (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
  return static_cast<uint16_t>(select_u32(is_nan, UINT32_C(0x7FC0), rounded));
}

// float -> IEEE half, round to nearest even: scaling by 2^112 then 2^-110 lets the FPU round
// the mantissa at the half's precision (and overflow to inf); NaN -> quiet NaN.
inline uint16_t f32_to_f16(float f) {
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t bias = std::max(shl1_w & UINT32_C(0xFF000000), UINT32_C(0x71000000));
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  base = f32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
  const bool is_nan = shl1_w > UINT32_C(0xFF000000);
  return static_cast<uint16_t>((sign >> 16) | select_u32(is_nan, UINT32_C(0x7E00), nonsign));
}

// Element type T as arithmetic type A.
template <typename A, typename T>
inline A widen(T x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<A>(bf16_to_f32(x.x));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<A>(f16_to_f32(x.x));
  } else {
    return static_cast<A>(x);
  }
}

// Arithmetic type A back to the element type T (only float -> bf16/fp16 and identity occur).
template <typename T, typename A>
inline T narrow(A x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return T(f32_to_bf16(static_cast<float>(x)), T::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return T(f32_to_f16(static_cast<float>(x)), T::from_bits());
  } else {
    return static_cast<T>(x);
  }
}

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Which sides of a row take part (a side whose weight is exactly 0 is not even read, so
// garbage such as NaN in an empty accumulator cannot leak into the result).
enum class Sides { kBoth, kPrevOnly, kCurOnly, kNone };

// Merge weights of one row: m = max(mp, mc), l = lp e^(mp-m) + lc e^(mc-m), w = side / l.
// One exp() per row: the side holding the maximum has e^0 = 1. A side whose max is -inf takes
// no part (even if its sum is garbage); both -inf: the row saw no key on either side ->
// (m, l) = (-inf, 0) and both weights 0. NaN propagates. Written with selects, not branches:
// which side holds the maximum is a coin toss that a branch predictor would keep missing.
template <typename A>
struct RowWeights {
  A m, l, wa, wb;
};

template <typename A>
inline RowWeights<A> row_weights(A mp, A lp, A mc, A lc) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const bool prev_wins = mp >= mc || mp != mp;  // NaN in mp wins (and NaN in mc loses to
                                                // nothing: mp >= NaN is false)
  const A hi = prev_wins ? mp : mc;
  const A lo = prev_wins ? mc : mp;
  const A e = std::exp(lo - hi);  // in [0, 1]; NaN when both are -inf (handled below)
  A a = prev_wins ? lp : lp * e;
  A b = prev_wins ? lc * e : lc;
  a = mp == kNegInf ? A(0) : a;
  b = mc == kNegInf ? A(0) : b;
  const A l = a + b;
  const A inv = l == A(0) ? A(0) : A(1) / l;
  const bool empty = mp == kNegInf && mc == kNegInf;
  RowWeights<A> r;
  r.m = hi;  // -inf when both are
  r.l = empty ? A(0) : l;
  r.wa = empty ? A(0) : a * inv;
  r.wb = empty ? A(0) : b * inv;
  return r;
}

// True when the kernel compiled for AVX2 + FMA + F16C may run: an x86-64 CPU that has them, and
// USP_NPU_NO_AVX2 unset (set it to 1 to exercise the baseline kernel on such a CPU).
inline bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    __builtin_cpu_init();
    const char* off = std::getenv("USP_NPU_NO_AVX2");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c") && !(off != nullptr && off[0] == '1');
  }();
  return ok;
#else
  return false;
#endif
}

// The kernel, one build per instruction set (ring_update_kernel*.cpp): merges every row of
// `g` for (prev attn dtype, cur attn dtype); false when the pair is not supported.
namespace baseline {
bool run(const MergeArgs& g, c10::ScalarType prev, c10::ScalarType cur);
}  // namespace baseline

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define USP_NPU_HAS_AVX2_KERNEL 1
namespace avx2 {
bool run(const MergeArgs& g, c10::ScalarType prev, c10::ScalarType cur);
}  // namespace avx2
#endif

}  // namespace usp_npu::ring_update
