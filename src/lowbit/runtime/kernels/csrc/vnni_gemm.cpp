// Prefill on int8 activations (LOWBIT_GEMV_ACT=int8, avx512 build): y = dequant(W) @ x_hat for
// many rows, x_hat being x rounded to int8 in blocks of 32 columns as the int8-activation GEMVs
// round it (llama.cpp's numerics). vpdpbusd (AVX512-VNNI) takes 64 byte products per
// instruction where vdpbf16ps takes 32 bf16 ones, and the bf16 GEMM (bf16_gemm.cpp) runs near
// that peak, so on int8 activations a 4-bit weight's prefill can pass a bf16 weight's: 1.1-1.5x
// PyTorch's bf16 GEMM at 32-512 rows on the Zen 4 host (benchmarks/prefill.py), short of the 2x
// the instruction counts promise.
//
// int8 weights take the same path as unsigned codes w + 128 with a zero point of 128.
//
// The codes of 32 weight rows are unpacked into a panel: for each 4 consecutive columns, two
// registers of 16 rows x 4 unsigned bytes, which vpdpbusd multiplies with the 4 int8 activations
// of those columns broadcast to every lane. Per block of 32 columns the int32 sums are scaled
// by scale_w * scale_x into fp32; the zero terms (as the GEMVs': -scale * zero point, or the
// float offset) times x_hat's group sums are added at the end.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "common.h"
#include "lowbit_cpu.h"
#include "transpose16.h"

#include <algorithm>
#include <vector>

namespace {

using namespace lowbit::detail;

// A panel step is H registers of 16 rows; a microkernel MR activation rows: MR * H int32 and as
// many fp32 accumulators. 16 x 12, 32 x 6, 48 x 4 and 32 x 5 ran within 4% of each other on the
// Zen 4 host (vpdpbusd bound); 32 x 6 was the fastest by a little.
constexpr int H = 2;
constexpr int NR = 16 * H;  // weight rows per panel
constexpr int MR = 6;

struct Panel {
  std::vector<int32_t> codes;  // [k / 4][NR]: 4 columns' codes of each row
  std::vector<float> scale;     // [k / 32][NR]: each block's scale per row (its group's)
  std::vector<float> zero;      // [G][NR]: each group's zero term per row
};

// Weight rows 4 t0 .. 4 t0 + NR - 1 (whole tiles; rows past the last tile are zero) into p.
template <typename S, int ZMODE>
void build_panel(const uint8_t* codes, const S* scale, const void* zp, float zconst, int64_t k, int64_t g,
                 int64_t n_tiles, int64_t t0, Panel& p) {
  const int64_t G = k / g, nc = k / 128;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i evens_first = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  auto row = [&](int r) { return t0 + r / TILE < n_tiles ? codes + (t0 + r / TILE) * TILE * (k / 2) : nullptr; };
  // the blocked region (avx512.cpp): in chunk c (< 4) of a block, dword p of a row's low nibbles
  // holds columns 8 c + (0, 4, 1, 5) of the block's run p, the high nibbles' 8 c + (2, 6, 3, 7);
  // swapping each dword's middle bytes and interleaving the two's words gives the run's two
  // quads (4 columns in order) side by side
  const int64_t nb = lowbit::int4_blocks(k, g);
  const __m512i middle_swapped = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15));
  for (int h = 0; h < H; ++h) {  // rows 16 h .. 16 h + 15: register h of each step
    int32_t* out = p.codes.data() + 16 * h;
    for (int64_t c = 0; c < 4 * nb; ++c) {
      __m512i u[16], v[16];  // runs 4 l, 4 l + 1 (u) and 4 l + 2, 4 l + 3 (v) of 128-bit lane l, quads A B A B
      for (int r = 0; r < 16; ++r) {
        const uint8_t* t = row(16 * h + r);
        const __m512i wv = t ? _mm512_loadu_si512(t + (c * TILE + r % TILE) * 64) : _mm512_setzero_si512();
        const __m512i lo = _mm512_shuffle_epi8(_mm512_and_si512(wv, low4), middle_swapped);
        const __m512i hi = _mm512_shuffle_epi8(_mm512_and_si512(_mm512_srli_epi16(wv, 4), low4), middle_swapped);
        u[r] = _mm512_unpacklo_epi16(lo, hi);
        v[r] = _mm512_unpackhi_epi16(lo, hi);
      }
      transpose16(u);
      transpose16(v);
      for (int d = 0; d < 16; ++d) {
        const int64_t run = 4 * (d / 4) + (d % 4) / 2, quad = 128 * (c / 4) + 8 * run + 2 * (c % 4) + d % 2;
        _mm512_storeu_si512(out + quad * NR, u[d]);
        _mm512_storeu_si512(out + (quad + 16) * NR, v[d]);  // runs two further on: 16 quads on
      }
    }
    for (int64_t c = 4 * nb; c < nc; ++c) {
      // a row's 64 bytes (the layout: avx512.cpp): the low nibbles, even bytes first in each 16-byte
      // lane, hold in dword 4 l + j columns 8 l + 4 j (j < 2) or 64 + 8 l + 4 (j - 2); the high
      // nibbles the same columns + 32
      __m512i lo[16], hi[16];
      for (int r = 0; r < 16; ++r) {
        const uint8_t* t = row(16 * h + r);
        const __m512i wv = t ? _mm512_loadu_si512(t + (c * TILE + r % TILE) * 64) : _mm512_setzero_si512();
        lo[r] = _mm512_shuffle_epi8(_mm512_and_si512(wv, low4), evens_first);
        hi[r] = _mm512_shuffle_epi8(_mm512_and_si512(_mm512_srli_epi16(wv, 4), low4), evens_first);
      }
      transpose16(lo);  // lo[d]: dword d of every row
      transpose16(hi);
      for (int d = 0; d < 16; ++d) {
        const int l = d / 4, j = d % 4;
        const int64_t quad = 32 * c + (j < 2 ? 2 * l + j : 16 + 2 * l + j - 2);  // its first column / 4
        _mm512_storeu_si512(out + quad * NR, lo[d]);
        _mm512_storeu_si512(out + (quad + 8) * NR, hi[d]);
      }
    }
    if (k % 128) {  // a trailing 64-column chunk: byte j is columns j and j + 32
      const __m256i low4h = _mm256_set1_epi8(0x0F);
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        const uint8_t* t = row(16 * h + r);
        const __m256i b = t ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + nc * TILE * 64 + (r % TILE) * 32))
                            : _mm256_setzero_si256();
        v[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4h)),
                                  _mm256_and_si256(_mm256_srli_epi16(b, 4), low4h), 1);
      }
      transpose16(v);
      for (int d = 0; d < 16; ++d) _mm512_storeu_si512(out + (32 * nc + d) * NR, v[d]);
    }
  }
  for (int64_t j = 0; j < G; ++j)
    for (int r = 0; r < NR; ++r) {
      const int64_t w = t0 * TILE + r;  // scales and zero points are padded to whole tiles
      float s = 0.f, z = 0.f;
      if (w < n_tiles * TILE) {
        s = static_cast<float>(scale[w * G + j]);
        if (ZMODE == ZERO_CONST) z = -s * zconst;
        else if (ZMODE == ZERO_INT) z = -s * static_cast<float>(static_cast<const uint8_t*>(zp)[w * G + j]);
        else z = static_cast<float>(static_cast<const S*>(zp)[w * G + j]);
      }
      for (int64_t b = j * g / 32; b < (j + 1) * g / 32; ++b) p.scale[b * NR + r] = s;
      p.zero[j * NR + r] = z;
    }
}

// int8 weight rows r0 .. r0 + NR - 1 (rows past n are zero) into p, as unsigned codes w + 128
// with a constant zero point of 128 (w = scale * (u - 128)): the int4 panels' arithmetic.
void build_panel_int8(const int8_t* w, const float* scale, int64_t k, int64_t n, int64_t r0, Panel& p) {
  const __m512i flip = _mm512_set1_epi8(-128);
  for (int h = 0; h < H; ++h)
    for (int64_t c = 0; c < k / 64; ++c) {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t row = r0 + 16 * h + r;
        v[r] = row < n ? _mm512_xor_si512(_mm512_loadu_si512(w + row * k + 64 * c), flip) : _mm512_setzero_si512();
      }
      transpose16(v);  // v[d]: columns 64 c + 4 d .. + 3 of every row
      for (int d = 0; d < 16; ++d) _mm512_storeu_si512(p.codes.data() + (16 * c + d) * NR + 16 * h, v[d]);
    }
  for (int r = 0; r < NR; ++r) {
    const float s = r0 + r < n ? scale[r0 + r] : 0.f;
    for (int64_t b = 0; b < k / 32; ++b) p.scale[b * NR + r] = s;
    p.zero[r] = -128.f * s;  // one group: the whole row
  }
}

// R activation rows (x4: x_hat's int8 codes as 4-column dwords, row stride ld4; xs its block
// scales, sx its group sums) against one panel: y[i, r0 .. r0 + NR) as bf16 (columns past n left
// alone).
template <int R>
void micro(const int32_t* x4, int64_t ld4, const float* xs, const float* sx, const Panel& p, int64_t k, int64_t g,
           at::BFloat16* y, int64_t n, int64_t r0) {
  const int64_t B = k / 32, G = k / g;
  __m512 acc[R][H];
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < H; ++h) acc[i][h] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m512i s[R][H];
    const int32_t* w = p.codes.data() + b * 8 * NR;
    for (int i = 0; i < R; ++i)
      for (int h = 0; h < H; ++h) s[i][h] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      __m512i wv[H];
      for (int h = 0; h < H; ++h) wv[h] = _mm512_loadu_si512(w + u * NR + 16 * h);
      for (int i = 0; i < R; ++i) {
        const __m512i xb = _mm512_set1_epi32(x4[i * ld4 + 8 * b + u]);
        for (int h = 0; h < H; ++h) s[i][h] = _mm512_dpbusd_epi32(s[i][h], wv[h], xb);
      }
    }
    for (int h = 0; h < H; ++h) {
      const __m512 sw = _mm512_loadu_ps(p.scale.data() + b * NR + 16 * h);
      for (int i = 0; i < R; ++i)
        acc[i][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][h]), _mm512_mul_ps(sw, _mm512_set1_ps(xs[i * B + b])),
                                    acc[i][h]);
    }
  }
  for (int64_t j = 0; j < G; ++j)
    for (int h = 0; h < H; ++h) {
      const __m512 z = _mm512_loadu_ps(p.zero.data() + j * NR + 16 * h);
      for (int i = 0; i < R; ++i) acc[i][h] = _mm512_fmadd_ps(z, _mm512_set1_ps(sx[i * G + j]), acc[i][h]);
    }
  for (int h = 0; h < H; ++h) {
    const int64_t c0 = r0 + 16 * h;
    if (c0 >= n) break;
    const __mmask16 keep = n - c0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - c0)) - 1);
    for (int i = 0; i < R; ++i) _mm256_mask_storeu_epi16(y + i * n + c0, keep, (__m256i)_mm512_cvtneps_pbh(acc[i][h]));
  }
}

// y = dequant(W) @ x_hat: x rounded once, then per panel of NR weight rows (build(first row,
// panel) fills it) the microkernel over every MR activation rows. g: the group size of W's
// scales and zero points.
template <typename Build>
void gemm_a8(const at::BFloat16* x, int64_t m, int64_t k, int64_t g, int64_t n, at::BFloat16* y, Build&& build) {
  const int64_t B = k / 32, G = k / g;
  // x_hat in column order, rows 64 bytes further apart (rows 2 or 4 KB apart, k = 2048 or 4096,
  // fell in one L1 set), rounded on every thread (on one, it outlasted the GEMM of 192 weight
  // rows); in the caller's reused buffers (fresh ones cost page faults), which the workers see
  // through the pointers below, not by name (a thread_local name is each thread's own)
  const int64_t ld = k + 64;
  thread_local std::vector<int8_t> xbuf;
  thread_local std::vector<float> sbuf;
  xbuf.resize(m * ld);
  sbuf.resize(m * (B + G));
  int8_t* xp = xbuf.data();
  float *xs = sbuf.data(), *sx = xs + m * B;
  at::parallel_for(0, m, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) quantize_x(x + i * k, 1, k, g, false, xp + i * ld, xs + i * B, sx + i * G);
  });
  const auto* x4 = reinterpret_cast<const int32_t*>(xp);
  at::parallel_for(0, (n + NR - 1) / NR, 1, [&](int64_t p0, int64_t p1) {
    thread_local Panel pan;  // reused: NR * k bytes of codes
    pan.codes.resize(k / 4 * NR);
    pan.scale.resize(B * NR);
    pan.zero.resize(G * NR);
    for (int64_t pi = p0; pi < p1; ++pi) {
      build(pi * NR, pan);
      for (int64_t i0 = 0; i0 < m; i0 += MR)
        with_count<MR>(static_cast<int>(std::min<int64_t>(MR, m - i0)), [&](auto rows) {
          micro<decltype(rows)::value>(x4 + i0 * ld / 4, ld / 4, xs + i0 * B, sx + i0 * G, pan, k, g, y + i0 * n, n,
                                       pi * NR);
        });
    }
  });
}

}  // namespace

void lowbit::int4_gemm_a8_many(const at::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale,
                               bool half_scale, const void* zero, int64_t zero_mode, float zconst, int64_t n,
                               int64_t group_size, at::BFloat16* y) {
  const int64_t n_tiles = (n + TILE - 1) / TILE;
  gemm_a8(x, m, k, group_size, n, y, [&](int64_t r0, Panel& pan) {
    dispatch(half_scale, zero_mode, [&](auto s, auto z) {
      using S = decltype(s);
      build_panel<S, decltype(z)::value>(codes, static_cast<const S*>(scale), zero, zconst, k, group_size, n_tiles,
                                         r0 / TILE, pan);
    });
  });
}

void lowbit::int8_gemm_a8_many(const at::BFloat16* x, int64_t m, int64_t k, const int8_t* w, const float* scale,
                               int64_t n, at::BFloat16* y) {
  gemm_a8(x, m, k, k, n, y, [&](int64_t r0, Panel& pan) { build_panel_int8(w, scale, k, n, r0, pan); });
}
