// The ring_attention_update CPU kernel, compiled once per instruction set: a .cpp includes this
// file (once) with USP_NPU_ISA defined to a namespace name, and USP_NPU_ISA_AVX2 defined to 1
// inside a `#pragma GCC target("avx2,fma,f16c")` region for the AVX2 build.
//
// Everything defined here lives in usp_npu::ring_update::USP_NPU_ISA, so the AVX2 copies never
// stand in for baseline ones; templates from ATen/c10 that they use are instantiated from
// definitions outside the target region and so stay baseline code (merely inlined here).
#ifndef USP_NPU_ISA
#error "define USP_NPU_ISA before including ring_update_impl.h"
#endif

namespace usp_npu::ring_update::USP_NPU_ISA {

#if USP_NPU_ISA_AVX2
// 8 elements of T <-> one register of 8 fp32 (round to nearest even on the way back).
template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, c10::Half>) {
      return _mm256_cvtph_ps(h);
    } else {  // bf16 is the upper half of an fp32
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

// float -> bf16 bits (round to nearest even, NaN -> quiet NaN), one u32 per lane.
inline __m256i bf16_bits(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(_mm256_srli_epi32(biased, 16), _mm256_set1_epi32(0x7FC0), nan);
}

// 16 fp32 in two registers -> 16 elements of T.
template <typename T>
inline void store16(T* p, __m256 f0, __m256 f1) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, f0);
    _mm256_storeu_ps(p + 8, f1);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const __m256i h = _mm256_setr_m128i(
        _mm256_cvtps_ph(f0, _MM_FROUND_TO_NEAREST_INT),
        _mm256_cvtps_ph(f1, _MM_FROUND_TO_NEAREST_INT));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  } else {
    // u32 (< 2^16) -> u16: packus interleaves the 128-bit lanes of f0/f1, the permute undoes it
    const __m256i packed = _mm256_packus_epi32(bf16_bits(f0), bf16_bits(f1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }
}
#endif

// dst[0:n] = src[0:n] as type A (the scalar loop auto-vectorises at the baseline ISA).
template <typename A, typename T>
inline void widen_span(const T* src, A* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = widen<A>(src[j]);
  }
}

// dst[0:n] = src[0:n] as element type T, rounding to nearest even.
template <typename T, typename A>
inline void narrow_span(const A* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = narrow<T>(src[j]);
  }
}

#if USP_NPU_ISA_AVX2
// AVX2 registers of A: ATen's Vectorized<A> here is its generic (baseline) class, whose
// memcpy-based loads compile to store-forwarding stalls under an AVX2 target.
template <typename A>
struct Avx2;

template <>
struct Avx2<float> {
  using R = __m256;
  static constexpr int64_t kW = 8;
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
};

template <>
struct Avx2<double> {
  using R = __m256d;
  static constexpr int64_t kW = 4;
  static R set1(double x) { return _mm256_set1_pd(x); }
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
};
#endif

// dst[0:n] = prev[0:n] * wa + cur[0:n] * wb; all three of type A. Vectorized<A> in the
// baseline build, AVX2 registers in the AVX2 build.
template <Sides S, typename A>
inline void fma_span(A* dst, const A* prev, const A* cur, int64_t n, A wa, A wb) {
#if USP_NPU_ISA_AVX2
  using X = Avx2<A>;
  const typename X::R xa = X::set1(wa);
  const typename X::R xb = X::set1(wb);
  int64_t i = 0;
  for (; i + X::kW <= n; i += X::kW) {
    if constexpr (S == Sides::kBoth) {
      X::store(dst + i, X::fma(X::load(prev + i), xa, X::mul(X::load(cur + i), xb)));
    } else if constexpr (S == Sides::kPrevOnly) {
      X::store(dst + i, X::mul(X::load(prev + i), xa));
    } else if constexpr (S == Sides::kCurOnly) {
      X::store(dst + i, X::mul(X::load(cur + i), xb));
    } else {
      X::store(dst + i, X::set1(A(0)));
    }
  }
  for (; i < n; ++i) {  // tail: fewer than one register
    const A p = (S == Sides::kBoth || S == Sides::kPrevOnly) ? prev[i] * wa : A(0);
    const A c = (S == Sides::kBoth || S == Sides::kCurOnly) ? cur[i] * wb : A(0);
    dst[i] = p + c;
  }
  return;
#endif
  using V = at::vec::Vectorized<A>;
  constexpr int64_t kW = V::size();
  const V va(wa);
  const V vb(wb);
  auto one = [&](int64_t j, int64_t count) {
    V o(A(0));
    if constexpr (S == Sides::kBoth) {
      o = at::vec::fmadd(V::loadu(prev + j, count), va, V::loadu(cur + j, count) * vb);
    } else if constexpr (S == Sides::kPrevOnly) {
      o = V::loadu(prev + j, count) * va;
    } else if constexpr (S == Sides::kCurOnly) {
      o = V::loadu(cur + j, count) * vb;
    }
    o.store(dst + j, static_cast<int>(count));
  };
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    one(j, kW);
  }
  if (j < n) {
    one(j, n - j);
  }
}

// Elements of the head dim converted per step when prev/cur/out are not of type A.
constexpr int64_t kChunk = 64;

// out[0:d] = prev[0:d] * wa + cur[0:d] * wb: operands of type A are used in place; others are
// widened into (and the output narrowed from) small stack buffers, chunk by chunk.
template <Sides S, typename P, typename C, typename A>
inline void combine_head(P* out, const P* prev, const C* cur, int64_t d, A wa, A wb) {
  constexpr bool kPrevIsA = std::is_same_v<P, A>;
  constexpr bool kCurIsA = std::is_same_v<C, A>;
  constexpr bool kUsePrev = S == Sides::kBoth || S == Sides::kPrevOnly;
  constexpr bool kUseCur = S == Sides::kBoth || S == Sides::kCurOnly;
#if USP_NPU_ISA_AVX2
  if constexpr (std::is_same_v<A, float>) {  // fp32 / bf16 / fp16: all in registers
    const __m256 xa = _mm256_set1_ps(wa);
    const __m256 xb = _mm256_set1_ps(wb);
    auto eight = [&](int64_t j) {
      if constexpr (S == Sides::kBoth) {
        return _mm256_fmadd_ps(load8(prev + j), xa, _mm256_mul_ps(load8(cur + j), xb));
      } else if constexpr (S == Sides::kPrevOnly) {
        return _mm256_mul_ps(load8(prev + j), xa);
      } else if constexpr (S == Sides::kCurOnly) {
        return _mm256_mul_ps(load8(cur + j), xb);
      } else {
        return _mm256_setzero_ps();
      }
    };
    int64_t j = 0;
    if constexpr (std::is_same_v<P, c10::BFloat16> && std::is_same_v<C, c10::BFloat16>) {
      // All bf16: widen by interleaving with zeros (per 128-bit lane: elements 0-3 and 8-11
      // in one register, 4-7 and 12-15 in the other); packus re-interleaves the same way, so
      // the order comes back with no permute.
      const __m256i zero = _mm256_setzero_si256();
      auto halves = [&](const C* x, __m256& lo, __m256& hi) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
        hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
      };
      for (; j + 16 <= d; j += 16) {
        __m256 p_lo = _mm256_setzero_ps(), p_hi = p_lo, c_lo = p_lo, c_hi = p_lo;
        if constexpr (kUsePrev) {
          halves(prev + j, p_lo, p_hi);
        }
        if constexpr (kUseCur) {
          halves(cur + j, c_lo, c_hi);
        }
        const __m256 o_lo = _mm256_fmadd_ps(p_lo, xa, _mm256_mul_ps(c_lo, xb));
        const __m256 o_hi = _mm256_fmadd_ps(p_hi, xa, _mm256_mul_ps(c_hi, xb));
        const __m256i packed = _mm256_packus_epi32(bf16_bits(o_lo), bf16_bits(o_hi));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), packed);
      }
    }
    for (; j + 16 <= d; j += 16) {
      store16(out + j, eight(j), eight(j + 8));
    }
    for (; j < d; ++j) {
      const float p = kUsePrev ? widen<float>(prev[j]) * wa : 0.0f;
      const float c = kUseCur ? widen<float>(cur[j]) * wb : 0.0f;
      out[j] = narrow<P>(p + c);
    }
    return;
  }
#endif
  if constexpr (kPrevIsA && kCurIsA) {
    fma_span<S, A>(out, prev, cur, d, wa, wb);
  } else {
    alignas(64) A pbuf[kPrevIsA ? 1 : kChunk];
    alignas(64) A cbuf[kCurIsA ? 1 : kChunk];
    alignas(64) A obuf[kPrevIsA ? 1 : kChunk];
    for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
      const int64_t n = std::min(kChunk, d - j0);
      const A* p = kUsePrev ? pbuf : nullptr;  // an unused side is never read
      const A* c = kUseCur ? cbuf : nullptr;
      A* o = obuf;
      if constexpr (kPrevIsA) {
        p = prev + j0;
        o = out + j0;
      } else if constexpr (kUsePrev) {
        widen_span(prev + j0, pbuf, n);
      }
      if constexpr (kCurIsA) {
        c = cur + j0;
      } else if constexpr (kUseCur) {
        widen_span(cur + j0, cbuf, n);
      }
      fma_span<S, A>(o, p, c, n, wa, wb);
      if constexpr (!kPrevIsA) {
        narrow_span(obuf, out + j0, n);
      }
    }
  }
}

// Phase 1 of a block: statistics of every row of the block; weights go to w[2 * row + {0, 1}]
// with row = ((i0 - i0_begin) * n1 + i1) * n2 + i2. The loops run along the statistics' memory
// (SBH [B, N, S, K]: S innermost; TND [T, N, K]: N innermost). Walking them in attn order
// instead jumps between heads: 6 * B * N streams with power-of-two strides, which thrash the
// caches (that cost 2x in time).
template <typename A, int64_t kLanes>
void block_weights(const MergeArgs& g, int64_t i0_begin, int64_t i0_end, A* w) {
  const bool i0_inner = std::abs(g.prev_max.s0) <= std::abs(g.prev_max.s2);
  auto one = [&](int64_t i0, int64_t i1, int64_t i2) {
    const RowWeights<A> r = row_weights<A>(
        *g.prev_max.at<A>(i0, i1, i2),
        *g.prev_sum.at<A>(i0, i1, i2),
        *g.cur_max.at<A>(i0, i1, i2),
        *g.cur_sum.at<A>(i0, i1, i2));
    A* om = g.out_max.at<A>(i0, i1, i2);
    A* os = g.out_sum.at<A>(i0, i1, i2);
    for (int64_t k = 0; k < kLanes; ++k) {  // a constant: one broadcast store for K = 8
      om[k] = r.m;
      os[k] = r.l;
    }
    const int64_t row = ((i0 - i0_begin) * g.n1 + i1) * g.n2 + i2;
    w[2 * row] = r.wa;
    w[2 * row + 1] = r.wb;
  };
  for (int64_t i1 = 0; i1 < g.n1; ++i1) {
    if (i0_inner) {
      for (int64_t i2 = 0; i2 < g.n2; ++i2) {
        for (int64_t i0 = i0_begin; i0 < i0_end; ++i0) {
          one(i0, i1, i2);
        }
      }
    } else {
      for (int64_t i0 = i0_begin; i0 < i0_end; ++i0) {
        for (int64_t i2 = 0; i2 < g.n2; ++i2) {
          one(i0, i1, i2);
        }
      }
    }
  }
}

// Phase 2 of a block: the attn rows, in attn memory order, with the weights of phase 1.
template <typename P, typename C, typename A>
void block_rows(const MergeArgs& g, int64_t i0_begin, int64_t i0_end, const A* w) {
  const int64_t d = g.head_dim;
  const bool in_place = g.out.ptr == g.prev.ptr;
  int64_t row = 0;
  for (int64_t i0 = i0_begin; i0 < i0_end; ++i0) {
    for (int64_t i1 = 0; i1 < g.n1; ++i1) {
      for (int64_t i2 = 0; i2 < g.n2; ++i2, ++row) {
        const A wa = w[2 * row];
        const A wb = w[2 * row + 1];
        P* out = g.out.at<P>(i0, i1, i2);
        const P* prev = g.prev.at<P>(i0, i1, i2);
        const C* cur = g.cur.at<C>(i0, i1, i2);
        if (wa != A(0) && wb != A(0)) {
          combine_head<Sides::kBoth>(out, prev, cur, d, wa, wb);
        } else if (wa != A(0)) {
          if (!(in_place && wa == A(1))) {  // cur empty, in place: already the answer
            combine_head<Sides::kPrevOnly>(out, prev, cur, d, wa, wb);
          }
        } else if (wb != A(0)) {
          combine_head<Sides::kCurOnly>(out, prev, cur, d, wa, wb);
        } else {
          combine_head<Sides::kNone>(out, prev, cur, d, wa, wb);
        }
      }
    }
  }
}

// Rows per block (the weights of a block wait in a small buffer between the two phases).
constexpr int64_t kBlockRows = 2048;
// Elements per parallel task: enough work to amortise waking a thread.
constexpr int64_t kGrainElements = int64_t{1} << 16;

// The whole merge, one pass over the data: blocks of consecutive i0 (S or T), parallel over
// blocks; per block, phase 1 (statistics) then phase 2 (attn).
template <typename P, typename C, typename A>
void merge_rows(const MergeArgs& g) {
  const int64_t inner_rows = g.n1 * g.n2;
  if (g.n0 == 0 || inner_rows == 0) {
    return;
  }
  const int64_t block = std::clamp<int64_t>(kBlockRows / inner_rows, 1, g.n0);
  const int64_t row_elems = std::max<int64_t>(inner_rows * std::max<int64_t>(g.head_dim, 1), 1);
  const int64_t grain = std::max<int64_t>(block, kGrainElements / row_elems);
  at::parallel_for(0, g.n0, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> w(static_cast<size_t>(2 * std::min(block, end - begin) * inner_rows));
    for (int64_t b0 = begin; b0 < end; b0 += block) {
      const int64_t b1 = std::min(end, b0 + block);
      if (g.lanes == 8) {
        block_weights<A, 8>(g, b0, b1, w.data());
      } else {
        block_weights<A, 1>(g, b0, b1, w.data());
      }
      block_rows<P, C, A>(g, b0, b1, w.data());
    }
  });
}

// Runs the instantiation for (prev dtype, cur dtype); returns false for an unsupported pair.
bool run(const MergeArgs& g, c10::ScalarType p, c10::ScalarType c) {
  using c10::BFloat16;
  using c10::Half;
  using c10::ScalarType;
  if (p == ScalarType::Double) {
    switch (c) {
      case ScalarType::Double: merge_rows<double, double, double>(g); return true;
      case ScalarType::Float: merge_rows<double, float, double>(g); return true;
      case ScalarType::BFloat16: merge_rows<double, BFloat16, double>(g); return true;
      case ScalarType::Half: merge_rows<double, Half, double>(g); return true;
      default: return false;
    }
  }
  if (p == ScalarType::Float) {
    switch (c) {
      case ScalarType::Float: merge_rows<float, float, float>(g); return true;
      case ScalarType::BFloat16: merge_rows<float, BFloat16, float>(g); return true;
      case ScalarType::Half: merge_rows<float, Half, float>(g); return true;
      default: return false;
    }
  }
  if (p == ScalarType::BFloat16 && c == ScalarType::BFloat16) {
    merge_rows<BFloat16, BFloat16, float>(g);
    return true;
  }
  if (p == ScalarType::Half && c == ScalarType::Half) {
    merge_rows<Half, Half, float>(g);
    return true;
  }
  return false;
}

}  // namespace usp_npu::ring_update::USP_NPU_ISA
