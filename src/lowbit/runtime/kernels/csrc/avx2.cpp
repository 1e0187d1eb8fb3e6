// lowbit's CPU kernels for AVX2 + FMA, the fallback on CPUs without AVX512-BF16. They read
// the same packed layouts as avx512.cpp (kernels/native.py writes one layout), so a
// prepared weight serves either build.
//
// int4 GEMV: fp32 FMA on the codes, no float weight written. In a 32-byte half h of a row's
// 64-byte chunk (see avx512.cpp for the layout), 32-bit lane d holds words 16h + 2d and
// 16h + 2d + 1, so the nibble at bit 16p + 4s is column 32s + 16h + 2d + p of the chunk.
// AND-ing a lane with 0xF << sh gives q * 2^sh, an integer below 2^28 and exact in fp32.
// Instead of shifting each code back, the activations are put into the same lane order
// once per call and scaled by 2^-sh (exact for |x| >= 2^-117, any activation that is not
// ~0; a process that flushes subnormals loses only those), so 8 weights cost one AND,
// one int->float conversion and one FMA. The top nibble (sh = 28 would set the sign bit)
// is shifted down instead. A trailing 64-column chunk holds, per row, bytes j = col j |
// col j+32 << 4: lane d, bit 8b + 4t is column 4d + b + 32t. The group scale multiplies
// each 32-column sum; the zero term enters per row as sum_g zero_term_g * sum_{k in g} x_k.
//
// Dequantization (prefill) widens words to lanes instead, so columns come out in order,
// and rounds to bf16 to nearest-even in integer ops (weights are finite).
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "common.h"
#include "lowbit_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using namespace lowbit::detail;

#define LB_INLINE inline __attribute__((always_inline))

LB_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// the nibble at bit sh of each lane, as q * 2^sh (sh < 28) or q (sh == 28), in fp32
LB_INLINE __m256 lanes(__m256i v, int sh) {
  const __m256i q = sh == 28 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(v, _mm256_set1_epi32(0xF << sh));
  return _mm256_cvtepi32_ps(q);
}

inline float unscale(int sh) { return sh == 28 ? 1.f : std::ldexp(1.f, -sh); }

// One activation row in the kernel's lane order: per 128-column chunk and sub-chunk s, the
// four 8-lane vectors (h, p) that multiply lanes(half h, 16p + 4s); per trailing sub-chunk
// t, the four (b) that multiply lanes(v, 8b + 4t).
void permute_x(const at::BFloat16* x, int64_t k, float* xp) {
  const int64_t nc = k / 128;
  float f[4][2];  // per (s, p): unscale(16p + 4s), once per call, not per element (a libm call)
  for (int s = 0; s < 4; ++s)
    for (int p = 0; p < 2; ++p) f[s][p] = unscale(16 * p + 4 * s);
  for (int64_t c = 0; c < nc; ++c)
    for (int s = 0; s < 4; ++s)
      for (int h = 0; h < 2; ++h)
        for (int p = 0; p < 2; ++p)
          for (int d = 0; d < 8; ++d)
            xp[128 * c + 32 * s + 16 * h + 8 * p + d] = static_cast<float>(x[128 * c + 32 * s + 16 * h + 2 * d + p]) * f[s][p];
  if (k % 128)
    for (int t = 0; t < 2; ++t)
      for (int b = 0; b < 4; ++b) {
        const float ft = unscale(8 * b + 4 * t);
        for (int d = 0; d < 8; ++d)
          xp[128 * nc + 32 * t + 8 * b + d] = static_cast<float>(x[128 * nc + 32 * t + 4 * d + b]) * ft;
      }
}

// sum a[j] * b[j], j < len
LB_INLINE float dot(const float* a, const float* b, int64_t len) {
  __m256 d0 = _mm256_setzero_ps(), d1 = d0;
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    d0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), d0);
    d1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), d1);
  }
  float d = hsum(_mm256_add_ps(d0, d1));
  for (; j < len; ++j) d += a[j] * b[j];
  return d;
}

// 8 scales (or float offsets) as fp32
LB_INLINE __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
LB_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LB_INLINE float load1(const c10::Half* p) { return _cvtsh_ss(p->x); }
LB_INLINE float load1(const float* p) { return *p; }

// Row r's scale and zero term for each 32-column unit (su, zu), and its zero-term sum
// sum_g zero_term_g * sx[i][g] for each of m activation rows (zdot). sg, zg: G floats of scratch.
template <typename S, int ZMODE>
void row_prologue(const S* scale, const void* zp, float zconst, int64_t r, int64_t k, int64_t g, int64_t m,
                  const float* sx, float* sg, float* zg, float* su, float* zu, float* zdot) {
  const int64_t G = k / g;
  const S* sr = scale + r * G;
  int64_t j = 0;
  // vector over groups: a scalar loop (c10's fp16 conversion), with the s loop below not unrolled,
  // read 2.7 GB/s in the Xeon host's 4096x4096 GEMV; this and the unrolling together, 6.5
  for (; j + 8 <= G; j += 8) {
    const __m256 sv = load8(sr + j);
    __m256 z;
    if (ZMODE == ZERO_CONST) {
      z = _mm256_mul_ps(sv, _mm256_set1_ps(-zconst));
    } else if (ZMODE == ZERO_INT) {
      const __m128i zq = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(zp) + r * G + j));
      z = _mm256_mul_ps(sv, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_cvtepu8_epi32(zq))));
    } else {
      z = load8(static_cast<const S*>(zp) + r * G + j);
    }
    _mm256_storeu_ps(sg + j, sv);
    _mm256_storeu_ps(zg + j, z);
  }
  for (; j < G; ++j) {
    const float sv = load1(sr + j);
    sg[j] = sv;
    if (ZMODE == ZERO_CONST) zg[j] = -sv * zconst;
    else if (ZMODE == ZERO_INT) zg[j] = -sv * static_cast<float>(static_cast<const uint8_t*>(zp)[r * G + j]);
    else zg[j] = load1(static_cast<const S*>(zp) + r * G + j);
  }
  for (int64_t i = 0; i < m; ++i) zdot[i] = dot(zg, sx + i * G, G);
  if (g == 32) {
    std::copy(sg, sg + G, su);
    std::copy(zg, zg + G, zu);
  } else {
    for (int64_t u = 0; u < k / 32; ++u) su[u] = sg[u * 32 / g], zu[u] = zg[u * 32 / g];
  }
}

template <typename S, int ZMODE>
void int4_tiles(int64_t m, const uint8_t* codes, const S* scale, const void* zp, float zconst, const float* xp,
                const float* sx, at::BFloat16* y, int64_t n, int64_t k, int64_t g, int64_t t0, int64_t t1) {
  const int64_t nc = k / 128, U = k / 32;
  std::vector<float> sg(k / g), zg(k / g), su(TILE * U), zu(TILE * U), zdot(TILE * m);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = codes + t * TILE * (k / 2);
    for (int rr = 0; rr < TILE; ++rr)
      row_prologue<S, ZMODE>(scale, zp, zconst, t * TILE + rr, k, g, m, sx, sg.data(), zg.data(), su.data() + rr * U,
                             zu.data() + rr * U, zdot.data() + rr * m);
    for (int64_t i = 0; i < m; ++i) {  // m > 1 rereads the tile from L1
      const float* xi = xp + i * k;
      __m256 acc[TILE];
      for (int rr = 0; rr < TILE; ++rr) acc[rr] = _mm256_setzero_ps();
      for (int64_t c = 0; c < nc; ++c) {
        const uint8_t* chunk = tile + c * TILE * 64;
        prefetch_ahead(chunk);
        prefetch_ahead(chunk + 64 * 2);
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {  // unrolled: each lanes() shift a constant
          const float* xs = xi + 128 * c + 32 * s;
          const __m256 x00 = _mm256_loadu_ps(xs), x01 = _mm256_loadu_ps(xs + 8), x10 = _mm256_loadu_ps(xs + 16),
                       x11 = _mm256_loadu_ps(xs + 24);
          for (int rr = 0; rr < TILE; ++rr) {
            const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + rr * 64));
            const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + rr * 64 + 32));
            __m256 d = _mm256_mul_ps(lanes(v0, 4 * s), x00);
            d = _mm256_fmadd_ps(lanes(v0, 16 + 4 * s), x01, d);
            d = _mm256_fmadd_ps(lanes(v1, 4 * s), x10, d);
            d = _mm256_fmadd_ps(lanes(v1, 16 + 4 * s), x11, d);
            acc[rr] = _mm256_fmadd_ps(d, _mm256_set1_ps(su[rr * U + 4 * c + s]), acc[rr]);
          }
        }
      }
      if (k % 128) {
        const uint8_t* tail = tile + nc * TILE * 64;
#pragma GCC unroll 2
        for (int t2 = 0; t2 < 2; ++t2) {
          const float* xs = xi + 128 * nc + 32 * t2;
          for (int rr = 0; rr < TILE; ++rr) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tail + rr * 32));
            __m256 d = _mm256_mul_ps(lanes(v, 4 * t2), _mm256_loadu_ps(xs));
            for (int b = 1; b < 4; ++b) d = _mm256_fmadd_ps(lanes(v, 8 * b + 4 * t2), _mm256_loadu_ps(xs + 8 * b), d);
            acc[rr] = _mm256_fmadd_ps(d, _mm256_set1_ps(su[rr * U + 4 * nc + t2]), acc[rr]);
          }
        }
      }
      for (int rr = 0; rr < TILE && t * TILE + rr < n; ++rr)
        y[i * n + t * TILE + rr] = at::BFloat16(hsum(acc[rr]) + zdot[rr * m + i]);
    }
  }
}

LB_INLINE __m256i bf16_bits(__m256 f) {  // round to nearest even, in the low 16 bits of each lane
  const __m256i b = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
}

// 16 consecutive bf16: a holds the first 8 values, b the next 8
LB_INLINE void store_bf16(at::BFloat16* o, __m256 a, __m256 b) {
  const __m256i p = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));  // a0-3 b0-3 | a4-7 b4-7
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute4x64_epi64(p, 0xD8));
}

// 8 codes (one per 32-bit lane) -> scale * q + zero_term
LB_INLINE __m256 dequant8(__m256i lanes32, int sh, float s, float z) {
  const __m256i q = _mm256_and_si256(_mm256_srli_epi32(lanes32, sh), _mm256_set1_epi32(0xF));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(s), _mm256_set1_ps(z));
}

template <typename S, int ZMODE>
void int4_dequant_tiles(const uint8_t* codes, const S* scale, const void* zp, float zconst, int64_t k, int64_t g,
                        int64_t t0, int64_t t1, at::BFloat16* out) {
  const int64_t nc = k / 128, U = k / 32;
  std::vector<float> sg(k / g), zg(k / g), su(U), zu(U);
  float zdot;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = codes + t * TILE * (k / 2);
    for (int rr = 0; rr < TILE; ++rr) {
      const int64_t r = t * TILE + rr;
      row_prologue<S, ZMODE>(scale, zp, zconst, r, k, g, 0, nullptr, sg.data(), zg.data(), su.data(), zu.data(), &zdot);
      at::BFloat16* o = out + (r - t0 * TILE) * k;
      for (int64_t c = 0; c < nc; ++c)
        for (int h = 0; h < 2; ++h) {  // words 16h .. 16h + 15: columns 16h + 0..15 of each sub-chunk
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + (c * TILE + rr) * 64 + 32 * h));
          const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v));
          const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1));
          for (int s = 0; s < 4; ++s) {
            const int64_t u = 4 * c + s;
            store_bf16(o + 128 * c + 32 * s + 16 * h, dequant8(lo, 4 * s, su[u], zu[u]), dequant8(hi, 4 * s, su[u], zu[u]));
          }
        }
      if (k % 128) {
        const uint8_t* tail = tile + nc * TILE * 64 + rr * 32;
        for (int e = 0; e < 4; e += 2) {  // bytes 8e .. 8e + 15: columns 8e + 0..15 of each sub-chunk
          const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tail + 8 * e)));
          const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tail + 8 * e + 8)));
          for (int t2 = 0; t2 < 2; ++t2) {
            const int64_t u = 4 * nc + t2;
            store_bf16(o + 128 * nc + 32 * t2 + 8 * e, dequant8(lo, 4 * t2, su[u], zu[u]), dequant8(hi, 4 * t2, su[u], zu[u]));
          }
        }
      }
    }
  }
}

LB_INLINE __m256 int8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

}  // namespace

int64_t lowbit::int4_blocks(int64_t, int64_t) { return 0; }  // the tiled layout alone

void lowbit::int4_gemm(const at::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale,
                       bool half_scale, const void* zero, int64_t zero_mode, float zconst, int64_t n,
                       int64_t group_size, at::BFloat16* y) {
  const int64_t G = k / group_size, n_tiles = (n + TILE - 1) / TILE;
  std::vector<float> sx(m * G), xp(m * k);
  group_sums(x, m, k, group_size, sx.data());
  for (int64_t i = 0; i < m; ++i) permute_x(x + i * k, k, xp.data() + i * k);
  at::parallel_for(0, n_tiles, 4, [&](int64_t t0, int64_t t1) {
    dispatch(half_scale, zero_mode, [&](auto s, auto z) {
      using S = decltype(s);
      int4_tiles<S, decltype(z)::value>(m, codes, static_cast<const S*>(scale), zero, zconst, xp.data(), sx.data(), y,
                                        n, k, group_size, t0, t1);
    });
  });
}

void lowbit::int4_dequant_rows(const uint8_t* codes, const void* scale, bool half_scale, const void* zero,
                               int64_t zero_mode, float zconst, int64_t k, int64_t group_size, int64_t r0, int64_t r1,
                               at::BFloat16* out) {
  dispatch(half_scale, zero_mode, [&](auto s, auto z) {
    using S = decltype(s);
    int4_dequant_tiles<S, decltype(z)::value>(codes, static_cast<const S*>(scale), zero, zconst, k, group_size,
                                              r0 / TILE, (r1 + TILE - 1) / TILE, out);
  });
}

// x as fp32 (exact copies of the bf16 activations): the FMA's other operand.
int64_t lowbit::int8_x_floats(int64_t k) { return k; }
void lowbit::int8_prepare_x(const at::BFloat16* x, int64_t m, int64_t k, float* xp) {
  for (int64_t i = 0; i < m * k; ++i) xp[i] = static_cast<float>(x[i]);
}

// Rows in order (one memory stream per thread); four chains over k per row hide FMA latency.
void lowbit::int8_gemm(const float* xp, int64_t m, int64_t k, const int8_t* wp, const float* sp, int64_t n,
                       at::BFloat16* yp) {
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* wr = wp + r * k;
      for (int64_t i = 0; i < m; ++i) {  // m > 1 rereads the row from L1
        const float* xi = xp + i * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < k; c += 32) {
          prefetch_ahead(wr + c);
          a0 = _mm256_fmadd_ps(int8x8(wr + c), _mm256_loadu_ps(xi + c), a0);
          a1 = _mm256_fmadd_ps(int8x8(wr + c + 8), _mm256_loadu_ps(xi + c + 8), a1);
          a2 = _mm256_fmadd_ps(int8x8(wr + c + 16), _mm256_loadu_ps(xi + c + 16), a2);
          a3 = _mm256_fmadd_ps(int8x8(wr + c + 24), _mm256_loadu_ps(xi + c + 24), a3);
        }
        yp[i * n + r] = at::BFloat16(hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) * sp[r]);
      }
    }
  });
}

void lowbit::int8_dequant_rows(const int8_t* w, const float* scale, int64_t k, int64_t r0, int64_t r1,
                               at::BFloat16* out) {
  for (int64_t r = r0; r < r1; ++r) {  // bf16(scale * code): the reference rounding
    const __m256 s = _mm256_set1_ps(scale[r]);
    for (int64_t c = 0; c < k; c += 16)
      store_bf16(out + (r - r0) * k + c, _mm256_mul_ps(int8x8(w + r * k + c), s),
                 _mm256_mul_ps(int8x8(w + r * k + c + 8), s));
  }
}

// No int8-activation GEMVs here (no VNNI in this build's ISA): every call refuses.
bool lowbit::has_int8_act() { return false; }
void lowbit::int4_gemm_a8(const at::BFloat16*, int64_t, int64_t, const uint8_t*, const void*, bool, const void*, int64_t,
                          float, int64_t, int64_t, at::BFloat16*) {
  check_act_int8(true);
}
void lowbit::int8_gemm_a8(const at::BFloat16*, int64_t, int64_t, const int8_t*, const float*, int64_t, at::BFloat16*) {
  check_act_int8(true);
}
