// Helpers every ISA's kernels share (avx512.cpp, avx2.cpp): nothing here needs more than SSE2,
// which every x86-64 CPU has.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <emmintrin.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace lowbit::detail {

constexpr int TILE = 4;  // weight rows interleaved in the int4 layout (kernels/native.py)

enum ZeroMode { ZERO_CONST = 0, ZERO_INT = 1, ZERO_FLOAT = 2 };

// Weights are read once per token, from DRAM: the hardware prefetcher alone kept too few
// reads in flight for a core's share of the bandwidth (measured on the Xeon host: the int8
// head 2.74 -> 1.89 ms, a W4 decode step ~15% faster). A prefetch past the end never faults.
constexpr int64_t PREFETCH_BYTES = 4096;
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
}
// into L2 only, twice as far: for streams whose lines would push reused data out of L1 (avx512.cpp)
inline void prefetch_ahead_l2(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + 2 * PREFETCH_BYTES, _MM_HINT_T1);
}

// sum of x over each group (g a multiple of 32), fp32: the zero-point term multiplies it.
// Eight lanes in two SSE registers: a scalar sum was one add chain, ~2 us per 3072 columns,
// paid by every int4 GEMV call (7 per layer and token).
inline void group_sums(const c10::BFloat16* x, int64_t m, int64_t k, int64_t g, float* sx) {
  const int64_t G = k / g;
  const __m128i zero = _mm_setzero_si128();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < G; ++j) {
      const c10::BFloat16* p = x + i * k + j * g;
      __m128 a = _mm_setzero_ps(), b = _mm_setzero_ps();
      for (int64_t c = 0; c < g; c += 8) {  // bf16 -> fp32: the 16 bits above 16 zero bits
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c));
        a = _mm_add_ps(a, _mm_castsi128_ps(_mm_unpacklo_epi16(zero, v)));
        b = _mm_add_ps(b, _mm_castsi128_ps(_mm_unpackhi_epi16(zero, v)));
      }
      a = _mm_add_ps(a, b);
      a = _mm_add_ps(a, _mm_movehl_ps(a, a));
      sx[i * G + j] = _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)));
    }
}

// Calls f(std::integral_constant<int, count>{}) for a run-time count in 1..N: a microkernel
// templated on how many rows (or registers) it holds, for the full blocks and the tail.
template <typename F, int... C>
void with_count_of(int count, F& f, std::integer_sequence<int, C...>) {
  ((count == C + 1 ? f(std::integral_constant<int, C + 1>{}) : void()), ...);
}
template <int N, typename F>
void with_count(int count, F&& f) {
  with_count_of(count, f, std::make_integer_sequence<int, N>{});
}

// Calls f(S{}, std::integral_constant<int, ZMODE>{}) for the stored scale type (fp16 / fp32)
// and zero-point mode: the one place the kernels' template arguments are chosen at run time.
template <typename F>
void dispatch(bool half, int64_t zero_mode, F&& f) {
  auto by_zero = [&](auto s) {
    if (zero_mode == ZERO_CONST) f(s, std::integral_constant<int, ZERO_CONST>{});
    else if (zero_mode == ZERO_INT) f(s, std::integral_constant<int, ZERO_INT>{});
    else f(s, std::integral_constant<int, ZERO_FLOAT>{});
  };
  if (half) by_zero(c10::Half{}); else by_zero(float{});
}

}  // namespace lowbit::detail
