// lowbit's own CPU kernels (AVX-512 + AVX512-BF16): weight-only GEMV / small GEMM that
// unpack codes in registers, next to the multiply, and never write a float weight. The raw
// entry points of lowbit_cpu.h; ops.cpp checks the tensors, avx2.cpp is the fallback build.
//
// int4 layout (made by kernels/native.py): rows in tiles of 4, each tile one contiguous
// run of 4 * k/2 bytes, so a thread streams through memory in order (four separate
// short row streams starve the hardware prefetcher). Inside a tile, per 128-column
// chunk, each row has 64 bytes = 32 words, word l holding columns l, l+32, l+64, l+96
// in its four nibbles; a trailing 64-column chunk (k % 128 == 64) has 32 bytes per row,
// byte j holding columns j and j+32. A nibble q OR-ed into 0x4300 is the bf16 number
// 128 + q exactly, so one logic op turns 32 codes into bf16 and vdpbf16ps multiplies
// them with bf16 activations into fp32. Per group: acc += scale * sum((128 + q) * x);
// per row: y = sum(acc) + sum_g zero_term_g * sum_{k in g} x_k, where the zero term
// holds -scale * zero_point (integer zero points, or a symmetric grid's centre) or the
// float offset (w = scale * q + offset), minus the 128 * scale the bf16 trick added.
//
// Blocked region: where the group size divides 512, each row's first k / 512 * 512 columns
// are stored in 512-column blocks (int4_blocks) whose column pairs are transposed 16 x 16
// before the packing above: column 32 p + 2 t + e of a block sits at 32 t + 2 p + e, so the
// block's sub-chunk t (32 columns) holds columns 2t, 2t + 1 of each 32-column run p in lane
// p. x is stored the same way once per call; a dot-product chain per row then sums each run
// in its own lane over the whole block, and one multiply-add per 512 columns applies the 16
// runs' scales, where the plain layout needs one per 32 columns (q4_0) or per group. With
// the multiply-adds sharing vdpbf16ps's pipes on Zen 4, that was 1.3x the GEMV rate from L3
// (q4_0 3072 x 8192: 42 -> 55 GB/s). The rest of the row (k % 512) keeps the plain layout.
//
// int8 layout: int8 [n, k] and one fp32 scale per row; the GEMV splits each code into nibbles
// for vdpbf16ps (lowbit::int8_gemm, below).
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "common.h"
#include "lowbit_cpu.h"
#include "transpose16.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace lowbit::detail;

constexpr int MAX_M = 2;  // activation rows sharing one pass over the weights

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// 32 bf16 activations (unaligned load)
inline __m512bh ldx(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }

#define LB_INLINE inline __attribute__((always_inline))

// the first min(cnt, 16) of 16 lanes
LB_INLINE __mmask16 lanes16(int64_t cnt) { return cnt >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cnt) - 1); }

// 16 scales (or float offsets) from fp16 / fp32 storage, lanes past `cnt` zero.
LB_INLINE __m512 load16(const at::Half* p, int64_t cnt) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes16(cnt), p)); }
LB_INLINE __m512 load16(const float* p, int64_t cnt) { return _mm512_maskz_loadu_ps(lanes16(cnt), p); }

// One row's scales as fp32 (sbuf) and, where zbuf is given, its zero terms, 16 groups at a
// time; and the row's zero-term contribution sum_g z[g] * sx[i][g] for each activation row i,
// left as 16 partial sums in zd[i]: the GEMVs start their accumulators there, so one
// reduction per row gives both. `bias` is what the kernel adds to every code before the scale
// (128 for the bf16 trick, 0 for integer products), taken out again through the zero term.
// With groups of 32 and int8 activations, `sblk` gets scale_w * scale_x per block (xs: the
// activations' block scales) from the scales still in registers.
template <int M, typename S, int ZMODE>
LB_INLINE void row_prologue(const S* scale, const void* zp, float zconst, int64_t r, int64_t G, const float* sx,
                            float* sbuf, float* zbuf, __m512* zd, float bias = 128.f, const float* xs = nullptr,
                            float* sblk = nullptr) {
  for (int i = 0; i < M; ++i) zd[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < G; j += 16) {
    const int64_t cnt = G - j;
    const __mmask16 m = lanes16(cnt);
    const __m512 sv = load16(scale + r * G + j, cnt);
    __m512 z;  // zero term (see the top of the file), minus the bias * scale the kernel adds
    if (ZMODE == ZERO_CONST) {
      z = _mm512_mul_ps(sv, _mm512_set1_ps(-(zconst + bias)));
    } else if (ZMODE == ZERO_INT) {
      const __m128i zq = _mm_maskz_loadu_epi8(m, static_cast<const uint8_t*>(zp) + r * G + j);
      const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zq));
      z = _mm512_mul_ps(sv, _mm512_sub_ps(_mm512_set1_ps(-bias), zf));
    } else {
      z = _mm512_fnmadd_ps(sv, _mm512_set1_ps(bias), load16(static_cast<const S*>(zp) + r * G + j, cnt));
    }
    if (sbuf) _mm512_mask_storeu_ps(sbuf + j, m, sv);
    if (zbuf) _mm512_mask_storeu_ps(zbuf + j, m, z);
    if (sblk)
      for (int i = 0; i < M; ++i)
        _mm512_mask_storeu_ps(sblk + i * G + j, m, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(m, xs + i * G + j)));
    for (int i = 0; i < M; ++i) zd[i] = _mm512_fmadd_ps(z, _mm512_maskz_loadu_ps(m, sx + i * G + j), zd[i]);
  }
}

// The int4 GEMVs' weight prefetch for rows of k columns. Past 4096 columns a tile (2 bytes per
// column) and x (2 more; int8 x: 1) no longer fit in the 32 KiB L1D together, so x missed L1 on
// every tile, and those misses took the line-fill slots the weight stream needed: there the
// weights go into L2 only, twice as far ahead. Cold int4-g32 3072x8192 / 1536x16384 /
// 4096x14336: 26.6 / 24.5 / 23.5 -> 31.9 / 33.6 / 32.7 GB/s on bf16 activations, 23.5 / 29.2 /
// 27.3 -> 25.3 / 37.3 / 36.7 on int8 ones (Zen 4); narrower rows lost ~10% so (x stays in L1).
LB_INLINE void prefetch_weights(const uint8_t* p, int64_t k) {
  if (k > 4096) prefetch_ahead_l2(p);
  else prefetch_ahead(p);
}

// The blocked region (the top of the file): lowbit::int4_blocks(k, g) blocks of BLOCK columns.
constexpr int64_t BLOCK = 512;

// Lane l: the index, among block b's groups, of the group of run first + l / per.
LB_INLINE __m512i run_groups(int64_t g, int first, int per) {
  const __m512i runs = _mm512_add_epi32(_mm512_set1_epi32(first),
                                        _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), per / 2));
  return _mm512_srl_epi32(runs, _mm_cvtsi32_si128(__builtin_ctzll(g / 32)));
}
// Per-group values v (scales, zero terms) of block b, by run_groups's lanes.
LB_INLINE __m512 by_run(const float* v, int64_t g, int64_t b, __m512i idx) {
  const int64_t gpb = BLOCK / g;
  return _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(lanes16(gpb), v + gpb * b));
}

// x [m, k] in the codes' column order: each block's 16 x 16 column pairs transposed.
void block_order(const at::BFloat16* x, int64_t m, int64_t k, int64_t nb, at::BFloat16* out) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      __m512i r[16];
      for (int p = 0; p < 16; ++p) r[p] = _mm512_loadu_si512(x + i * k + BLOCK * b + 32 * p);
      transpose16(r);
      for (int t = 0; t < 16; ++t) _mm512_storeu_si512(out + i * k + BLOCK * b + 32 * t, r[t]);
    }
    std::copy(x + i * k + BLOCK * nb, x + (i + 1) * k, out + i * k + BLOCK * nb);
  }
}

// 128-column chunk c of a tile's rows (64 bytes each), its rows' prefetches issued
LB_INLINE void load_chunk(const uint8_t* tile, int64_t c, int64_t k, __m512i* wv) {
  for (int rr = 0; rr < TILE; ++rr) {
    prefetch_weights(tile + (c * TILE + rr) * 64, k);
    wv[rr] = _mm512_loadu_si512(tile + (c * TILE + rr) * 64);
  }
}

// (v & 0xF) | 0x4300 per 16-bit lane: bf16 (128 + nibble).
LB_INLINE __m512bh nibbles(__m512i v, __m512i low4, __m512i magic) {
  return (__m512bh)_mm512_ternarylogic_epi32(v, low4, magic, 0xEA);
}

// Sub-chunk s (32 columns) of a 128-column chunk held in wv, as bf16 (128 + q).
LB_INLINE __m512bh sub_chunk(__m512i wv, int s, __m512i low4, __m512i magic) {
  switch (s) {
    case 0: return nibbles(wv, low4, magic);
    case 1: return nibbles(_mm512_srli_epi16(wv, 4), low4, magic);
    case 2: return nibbles(_mm512_srli_epi16(wv, 8), low4, magic);
    default: return (__m512bh)_mm512_or_si512(_mm512_srli_epi16(wv, 12), magic);
  }
}

// Accumulator state of one tile: CH dot-product chains per (weight row, activation row),
// enough vdpbf16ps in flight to hide its latency; at each group end they are scaled into acc.
// OFF (a constant zero point: symmetric grids, GGUF's Q4_0): each group's first chain starts
// with -(zconst + 128) sum_g x / 16 in every lane, so a group's sum is already
// sum (q - zconst) x and rows need no zero term, whose per-row multiply-adds cost 15-25% of the
// GEMV on Zen 4, where these kernels are bound by the FP pipes. (Offsets lane by lane, 16
// floats per group, made the GEMV 5-10% slower on weights cold from DRAM: 16x the L1 traffic.)
template <int M, bool OFF>
struct TileAcc {
  static constexpr int CH = M == 1 ? 2 : 1;
  __m512 acc[TILE][M], e[TILE][M][CH];
  int64_t left, j = 0;  // sub-chunks left in group j
  const float* xoff = nullptr;  // OFF: one float per (activation row, group), rows G groups apart
  int64_t G = 0;

  // where activation row i's chains start in group j
  LB_INLINE __m512 start(int i) const {
    if constexpr (OFF) return _mm512_set1_ps(xoff[i * G + j]);
    else return _mm512_setzero_ps();
  }
  // every chain at its start: first(i) for activation row i's first chain, zero for the others
  template <typename F>
  LB_INLINE void set_chains(F first) {
    for (int rr = 0; rr < TILE; ++rr)
      for (int i = 0; i < M; ++i) {
        e[rr][i][0] = first(i);
        for (int h = 1; h < CH; ++h) e[rr][i][h] = _mm512_setzero_ps();
      }
  }
  LB_INLINE void zero() {
    for (int rr = 0; rr < TILE; ++rr)
      for (int i = 0; i < M; ++i) acc[rr][i] = _mm512_setzero_ps();
    set_chains([&](int i) { return start(i); });
  }
  // the chains' sums into acc, scaled by scale_of(rr) (one float per lane)
  template <typename F>
  LB_INLINE void fold(F scale_of) {
    for (int rr = 0; rr < TILE; ++rr) {
      const __m512 sv = scale_of(rr);
      for (int i = 0; i < M; ++i) {
        __m512 t = e[rr][i][0];
        for (int h = 1; h < CH; ++h) t = _mm512_add_ps(t, e[rr][i][h]);
        acc[rr][i] = _mm512_fmadd_ps(t, sv, acc[rr][i]);
      }
    }
  }
  // sub-chunk s of every row of the tile, against 32 columns of each activation row at x + col
  LB_INLINE void dot(const __m512i* wv, int s, const at::BFloat16* x, int64_t k, int64_t col, __m512i low4,
                     __m512i magic) {
    __m512bh xs[M];
    for (int i = 0; i < M; ++i) xs[i] = ldx(x + i * k + col);
    for (int rr = 0; rr < TILE; ++rr) {
      const __m512bh v = sub_chunk(wv[rr], s, low4, magic);
      for (int i = 0; i < M; ++i) e[rr][i][s % CH] = _mm512_dpbf16_ps(e[rr][i][s % CH], v, xs[i]);
    }
  }
  // the same for groups of 32 (one group per sub-chunk: GGUF's block-32 types): each product
  // sum goes straight into acc with its scale, no chain to merge and clear (same numbers as
  // dot + step, where the other chain is zero), ~40% fewer vector ops per weight byte
  LB_INLINE void dot_group32(const __m512i* wv, int s, const at::BFloat16* x, int64_t k, int64_t col, __m512i low4,
                             __m512i magic, const float* sbuf, int64_t G) {
    __m512bh xs[M];
    for (int i = 0; i < M; ++i) xs[i] = ldx(x + i * k + col);
    for (int rr = 0; rr < TILE; ++rr) {
      const __m512bh v = sub_chunk(wv[rr], s, low4, magic);
      const __m512 sv = _mm512_set1_ps(sbuf[rr * G + j]);
      for (int i = 0; i < M; ++i)
        acc[rr][i] = _mm512_fmadd_ps(_mm512_dpbf16_ps(start(i), v, xs[i]), sv, acc[rr][i]);
    }
    ++j;
  }
  // The blocked region (the top of the file): per 512-column block, the chains' lane p sums
  // the block's 32-column run p over all 16 sub-chunks, then one multiply-add by the runs'
  // scales; OFF chains start at the runs' offsets (xoff32). Then the tail's chains start.
  LB_INLINE void blocks(const uint8_t* tile, int64_t nb, const at::BFloat16* x, int64_t k, int64_t g,
                        const float* xoff32, const float* sbuf, __m512i low4, __m512i magic) {
    const __m512i idx = run_groups(g, 0, 1);
    for (int64_t b = 0; b < nb; ++b) {
      set_chains([&](int i) { return OFF ? _mm512_loadu_ps(xoff32 + i * (k / 32) + 16 * b) : _mm512_setzero_ps(); });
      for (int64_t c = 4 * b; c < 4 * b + 4; ++c) {
        __m512i wv[TILE];
        load_chunk(tile, c, k, wv);
        for (int s = 0; s < 4; ++s) dot(wv, s, x, k, 128 * c + 32 * s, low4, magic);
      }
      fold([&](int rr) { return by_run(sbuf + rr * G, g, b, idx); });
    }
    if (nb) set_chains([&](int i) { return start(i); });
  }
  LB_INLINE void step(const float* sbuf, int64_t G, int64_t subs_per_group) {
    if (--left) return;
    fold([&](int rr) { return _mm512_set1_ps(sbuf[rr * G + j]); });
    ++j;  // past the last group, start() reads sx's padding float
    set_chains([&](int i) { return start(i); });
    left = subs_per_group;
  }
};

// One tile (TILE weight rows) against M activation rows. sx: the activations' group sums, or
// with a constant zero point the chains' start (int4_gemm).
template <int M, typename S, int ZMODE>
void int4_tile(const uint8_t* tile, const S* scale, const void* zp, float zconst, const at::BFloat16* x,
               const float* sx, const float* xoff32, at::BFloat16* y, int64_t n, int64_t k, int64_t g, int64_t r,
               float* sbuf) {
  const int64_t G = k / g, nc = k / 128, spg = g / 32, nb = lowbit::int4_blocks(k, g);
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  constexpr bool OFF = ZMODE == ZERO_CONST;
  TileAcc<M, OFF> t;
  t.xoff = sx;
  t.G = G;
  t.j = nb * BLOCK / g;  // the first group past the blocks
  t.zero();
  for (int rr = 0; rr < TILE; ++rr)
    if constexpr (OFF)  // the scales alone
      for (int64_t j = 0; j < G; j += 16)
        _mm512_mask_storeu_ps(sbuf + rr * G + j, lanes16(G - j), load16(scale + (r + rr) * G + j, G - j));
    else  // the accumulators start at the zero terms
      row_prologue<M, S, ZMODE>(scale, zp, zconst, r + rr, G, sx, sbuf + rr * G, nullptr, t.acc[rr]);
  t.blocks(tile, nb, x, k, g, xoff32, sbuf, low4, magic);
  t.left = spg;
  for (int64_t c = 4 * nb; c < nc; ++c) {
    __m512i wv[TILE];
    load_chunk(tile, c, k, wv);
    if (spg == 1) {
      for (int s = 0; s < 4; ++s) t.dot_group32(wv, s, x, k, 128 * c + 32 * s, low4, magic, sbuf, G);
      continue;
    }
    t.dot(wv, 0, x, k, 128 * c, low4, magic);
    t.step(sbuf, G, spg);
    t.dot(wv, 1, x, k, 128 * c + 32, low4, magic);
    t.step(sbuf, G, spg);
    t.dot(wv, 2, x, k, 128 * c + 64, low4, magic);
    t.step(sbuf, G, spg);
    t.dot(wv, 3, x, k, 128 * c + 96, low4, magic);
    t.step(sbuf, G, spg);
  }
  if (k % 128) {  // trailing 64 columns: bytes widened to words give sub-chunks 0 and 1
    __m512i wv[TILE];
    for (int rr = 0; rr < TILE; ++rr)
      wv[rr] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + nc * TILE * 64 + rr * 32)));
    for (int s = 0; s < 2; ++s)
      if (spg == 1) {  // as the chunks above (the chains were never started past group 0)
        t.dot_group32(wv, s, x, k, 128 * nc + 32 * s, low4, magic, sbuf, G);
      } else {
        t.dot(wv, s, x, k, 128 * nc + 32 * s, low4, magic);
        t.step(sbuf, G, spg);
      }
  }
  for (int rr = 0; rr < TILE && r + rr < n; ++rr)
    for (int i = 0; i < M; ++i) y[i * n + r + rr] = at::BFloat16(hsum(t.acc[rr][i]));
}

template <typename S, int ZMODE>
void int4_tiles(int64_t m, const uint8_t* codes, const S* scale, const void* zp, float zconst,
                const at::BFloat16* x, const float* sx, const float* xoff32, at::BFloat16* y, int64_t n, int64_t k,
                int64_t g, int64_t t0, int64_t t1) {
  const int64_t G = k / g;
  std::vector<float> sbuf(TILE * G);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = codes + t * TILE * (k / 2);
    for (int64_t i0 = 0; i0 < m; i0 += MAX_M) {  // activation rows in pairs: each pair rereads the tile from L1/L2
      const at::BFloat16* xb = x + i0 * k;
      const float* sxb = sx + i0 * G;
      const float* xob = xoff32 + i0 * (k / 32);
      at::BFloat16* yb = y + i0 * n;
      if (m - i0 >= 2)
        int4_tile<2, S, ZMODE>(tile, scale, zp, zconst, xb, sxb, xob, yb, n, k, g, t * TILE, sbuf.data());
      else
        int4_tile<1, S, ZMODE>(tile, scale, zp, zconst, xb, sxb, xob, yb, n, k, g, t * TILE, sbuf.data());
    }
  }
}

// ---- int8 activations (llama.cpp's numerics; opt-in, kernels/native.py) -------------------
// vpdpbusd (AVX512-VNNI) multiplies unsigned bytes by signed bytes and sums each 4 into an
// int32 lane: 64 exact products per instruction, where vdpbf16ps gives 32 and costs about
// twice as much on the Xeon host. So x is rounded to int8 in blocks of 32 columns (scale
// amax / 127, to nearest even), each block's integer sum is scaled by scale_w * scale_x in
// fp32, and the zero term uses the rounded activations: the result is dequant(W) @ x_hat.
//
// Per 128-column chunk a row's 64 bytes give lo = bytes & 0xF (byte 2l: column l, byte 2l+1:
// column l+64) and hi = (bytes >> 4) & 0xF (columns l+32, l+96). A byte shuffle moves each
// 16-byte lane's even bytes before its odd ones, so every dword holds 4 columns of one block:
// in lane t, dwords 0-1 are columns 8t..8t+7 and dwords 2-3 columns 64+8t..64+8t+7 (+32 for
// hi), i.e. lo's dwords hold blocks (0, 0, 2, 2) of the chunk per lane and hi's (1, 1, 3, 3).
// The activations are stored in that order once per call. A trailing 64-column chunk's byte
// j is columns j and j+32: lo and hi side by side are columns 0..63 in order.

}  // namespace

int64_t lowbit::int4_blocks(int64_t k, int64_t group_size) { return BLOCK % group_size == 0 ? k / BLOCK : 0; }

// lowbit_cpu.h; also the int8-activation prefill's (vnni_gemm.cpp), in column order
void lowbit::detail::quantize_x(const at::BFloat16* x, int64_t m, int64_t k, int64_t g, bool int4_order, int8_t* xq,
                                float* xs, float* sx) {
  const int64_t B = k / 32, G = k / g, nb = int4_order ? lowbit::int4_blocks(k, g) : 0;
  // the blocked region (int4_tile_a8): a run's 8 columns per chunk, 8 c + (0, 4, 1, 5) into the
  // low nibbles' dword and 8 c + (2, 6, 3, 7) into the high ones'; per 16 columns (chunks a, a + 1)
  // this shuffle gives the dwords (a low, a + 1 low, a high, a + 1 high)
  const __m128i run_order = _mm_setr_epi8(0, 4, 1, 5, 8, 12, 9, 13, 2, 6, 3, 7, 10, 14, 11, 15);
  const __m512i lo_idx = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), hi_idx = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  alignas(64) int8_t nat[128];
  for (int64_t i = 0; i < m; ++i) {
    std::fill(sx + i * G, sx + (i + 1) * G, 0.f);
    for (int64_t b = 0; b < B; ++b) {
      const __m512i raw = _mm512_loadu_si512(x + i * k + 32 * b);
      const __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
      const __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f;
      const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
      xs[i * B + b] = d;
      sx[i * G + 32 * b / g] += d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
      if (b < 16 * nb) {  // run b % 16 of block b / 16
        int8_t* blk = xq + i * k + BLOCK * (b / 16) + 4 * (b % 16);
        for (int h = 0; h < 2; ++h) {  // columns 16 h .. 16 h + 15: chunks 2 h, 2 h + 1
          alignas(16) int32_t dw[4];
          _mm_store_si128(reinterpret_cast<__m128i*>(dw), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(h ? q1 : q0), run_order));
          for (int u = 0; u < 4; ++u)  // chunk 2 h + u % 2, nibbles u / 2
            std::memcpy(blk + 128 * (2 * h + u % 2) + 64 * (u / 2), dw + u, 4);
        }
        continue;
      }
      _mm_store_si128(reinterpret_cast<__m128i*>(nat + 32 * (b % 4)), _mm512_cvtepi32_epi8(q0));
      _mm_store_si128(reinterpret_cast<__m128i*>(nat + 32 * (b % 4) + 16), _mm512_cvtepi32_epi8(q1));
      int8_t* out = xq + i * k + 32 * (b - b % 4);
      if (b % 4 == 3 && int4_order) {  // a whole chunk: into the int4 kernel's order
        const __m512i a = _mm512_load_si512(nat), c = _mm512_load_si512(nat + 64);
        _mm512_storeu_si512(out, _mm512_permutex2var_epi64(a, lo_idx, c));
        _mm512_storeu_si512(out + 64, _mm512_permutex2var_epi64(a, hi_idx, c));
      } else if (b % 4 == 3 || b == B - 1) {  // in column order (as is a trailing 64-column chunk)
        std::copy(nat, nat + 32 * (b % 4 + 1), out);
      }
    }
  }
}

namespace {

// One tile (TILE weight rows) against M int8 activation rows; sblk holds TILE * M * k/32 scratch.
template <int M, typename S, int ZMODE>
void int4_tile_a8(const uint8_t* tile, const S* scale, const void* zp, float zconst, const int8_t* xq,
                  const float* xs, const float* sx, at::BFloat16* y, int64_t n, int64_t k, int64_t g, int64_t r,
                  float* sbuf, float* sblk) {
  const int64_t G = k / g, B = k / 32, nc = k / 128;
  __m512 acc[TILE][M];  // starting at the zero terms
  for (int rr = 0; rr < TILE; ++rr) {
    if (g == 32) {  // scale_w * scale_x per block of 32 columns, straight from the prologue
      row_prologue<M, S, ZMODE>(scale, zp, zconst, r + rr, G, sx, nullptr, nullptr, acc[rr], 0.f, xs, sblk + rr * M * B);
      continue;
    }
    row_prologue<M, S, ZMODE>(scale, zp, zconst, r + rr, G, sx, sbuf + rr * G, nullptr, acc[rr], 0.f);
    for (int i = 0; i < M; ++i) {
      float* out = sblk + (rr * M + i) * B;
      const float* sw = sbuf + rr * G;
      for (int64_t j = 0, b = 0; j < G; ++j)
        for (int64_t u = 0; u < g / 32; ++u, ++b) out[b] = sw[j] * xs[i * B + b];
    }
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // The blocked region: a row's dword p of a chunk's low (high) nibbles holds 4 columns of run
  // p (quantize_x puts x's there), so integer chains per lane sum whole runs over a block, and
  // one conversion and multiply-add per block scales them.
  constexpr int CH = M == 1 ? 2 : 1;  // M == 1: low and high nibbles in two chains, for latency
  const int64_t nb = lowbit::int4_blocks(k, g);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i d[TILE][M][CH];
    for (int rr = 0; rr < TILE; ++rr)
      for (int i = 0; i < M; ++i)
        for (int h = 0; h < CH; ++h) d[rr][i][h] = _mm512_setzero_si512();
    for (int64_t c = 4 * b; c < 4 * b + 4; ++c) {
      __m512i xlo[M], xhi[M];
      for (int i = 0; i < M; ++i) {
        xlo[i] = _mm512_loadu_si512(xq + i * k + 128 * c);
        xhi[i] = _mm512_loadu_si512(xq + i * k + 128 * c + 64);
      }
      for (int rr = 0; rr < TILE; ++rr) {
        const uint8_t* p = tile + (c * TILE + rr) * 64;
        prefetch_weights(p, k);
        const __m512i wv = _mm512_loadu_si512(p);
        const __m512i lo = _mm512_and_si512(wv, low4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
        for (int i = 0; i < M; ++i) {
          d[rr][i][0] = _mm512_dpbusd_epi32(d[rr][i][0], lo, xlo[i]);
          d[rr][i][CH - 1] = _mm512_dpbusd_epi32(d[rr][i][CH - 1], hi, xhi[i]);
        }
      }
    }
    for (int rr = 0; rr < TILE; ++rr)
      for (int i = 0; i < M; ++i) {
        __m512i t = d[rr][i][0];
        if constexpr (CH == 2) t = _mm512_add_epi32(t, d[rr][i][1]);
        acc[rr][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_loadu_ps(sblk + (rr * M + i) * B + 16 * b), acc[rr][i]);
      }
  }
  const __m512i evens_first = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  for (int64_t c = 4 * nb; c < nc; ++c) {
    __m512i xlo[M], xhi[M];
    for (int i = 0; i < M; ++i) {
      xlo[i] = _mm512_loadu_si512(xq + i * k + 128 * c);
      xhi[i] = _mm512_loadu_si512(xq + i * k + 128 * c + 64);
    }
#pragma GCC unroll 4  // the accumulators stay in registers only if every index is a constant
    for (int rr = 0; rr < TILE; ++rr) {
      const uint8_t* p = tile + (c * TILE + rr) * 64;
      prefetch_weights(p, k);
      const __m512i wv = _mm512_loadu_si512(p);
      const __m512i lo = _mm512_shuffle_epi8(_mm512_and_si512(wv, low4), evens_first);
      const __m512i hi = _mm512_shuffle_epi8(_mm512_and_si512(_mm512_srli_epi16(wv, 4), low4), evens_first);
#pragma GCC unroll 2
      for (int i = 0; i < M; ++i) {
        const __m512 s4 = _mm512_broadcast_f32x4(_mm_loadu_ps(sblk + (rr * M + i) * B + 4 * c));
        const __m512i dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[i]);
        const __m512i dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi[i]);
        acc[rr][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dlo), _mm512_permute_ps(s4, 0xA0), acc[rr][i]);
        acc[rr][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dhi), _mm512_permute_ps(s4, 0xF5), acc[rr][i]);
      }
    }
  }
  if (k % 128) {  // trailing 64 columns: blocks B-2 (lower half) and B-1 (upper half)
    const __m256i low4h = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 4
    for (int rr = 0; rr < TILE; ++rr) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + nc * TILE * 64 + rr * 32));
      const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4h)),
                                            _mm256_and_si256(_mm256_srli_epi16(b, 4), low4h), 1);
#pragma GCC unroll 2
      for (int i = 0; i < M; ++i) {
        const float* sb = sblk + (rr * M + i) * B + B - 2;
        const __m512 s2 = _mm512_castpd_ps(
            _mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(sb[0])), _mm256_castps_pd(_mm256_set1_ps(sb[1])), 1));
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xq + i * k + 128 * nc));
        acc[rr][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s2, acc[rr][i]);
      }
    }
  }
  for (int rr = 0; rr < TILE && r + rr < n; ++rr)
    for (int i = 0; i < M; ++i) y[i * n + r + rr] = at::BFloat16(hsum(acc[rr][i]));
}

template <typename S, int ZMODE>
void int4_tiles_a8(int64_t m, const uint8_t* codes, const S* scale, const void* zp, float zconst, const int8_t* xq,
                   const float* xs, const float* sx, at::BFloat16* y, int64_t n, int64_t k, int64_t g, int64_t t0,
                   int64_t t1) {
  const int64_t G = k / g, B = k / 32;
  std::vector<float> sbuf(g == 32 ? 0 : TILE * G), sblk(TILE * MAX_M * B);  // groups of 32: no sbuf (the prologue)
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = codes + t * TILE * (k / 2);
    for (int64_t i0 = 0; i0 < m; i0 += MAX_M) {
      auto args = [&](auto tile_fn) {
        tile_fn(tile, scale, zp, zconst, xq + i0 * k, xs + i0 * B, sx + i0 * G, y + i0 * n, n, k, g, t * TILE,
                sbuf.data(), sblk.data());
      };
      if (m - i0 >= 2) args(int4_tile_a8<2, S, ZMODE>);
      else args(int4_tile_a8<1, S, ZMODE>);
    }
  }
}

// Rows [t0*TILE, t1*TILE) of W as bf16 (for prefill: dequantize a block that stays in
// cache, then a bf16 GEMM; at batch 1 the GEMV above never materializes W).
template <typename S, int ZMODE>
void int4_dequant_tiles(const uint8_t* codes, const S* scale, const void* zp, float zconst, int64_t k, int64_t g,
                        int64_t t0, int64_t t1, at::BFloat16* out) {
  const int64_t G = k / g, nc = k / 128, nb = lowbit::int4_blocks(k, g);
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  const __m512i lo_runs = run_groups(g, 0, 2), hi_runs = run_groups(g, 8, 2);  // a sub-chunk's fp32 halves' runs
  // w = scale * (128 + q) + zero_term for 32 columns: the lower 16 by (sl, zl), the upper by (sh, zh)
  auto weights = [](__m512bh v, __m512 sl, __m512 zl, __m512 sh, __m512 zh) {
    const __m512 lo = _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256((__m512i)v));
    const __m512 hi = _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64((__m512i)v, 1));
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, sh, zh), _mm512_fmadd_ps(lo, sl, zl));
  };
  std::vector<float> sbuf(G), zbuf(G);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = codes + t * TILE * (k / 2);
    for (int rr = 0; rr < TILE; ++rr) {
      const int64_t r = t * TILE + rr;
      row_prologue<0, S, ZMODE>(scale, zp, zconst, r, G, nullptr, sbuf.data(), zbuf.data(), nullptr);  // no activations
      at::BFloat16* o = out + (r - t0 * TILE) * k;
      for (int64_t b = 0; b < nb; ++b) {  // a block's 16 sub-chunks, then its 16 x 16 pairs transposed back
        const __m512 sl = by_run(sbuf.data(), g, b, lo_runs), zl = by_run(zbuf.data(), g, b, lo_runs);
        const __m512 sh = by_run(sbuf.data(), g, b, hi_runs), zh = by_run(zbuf.data(), g, b, hi_runs);
        __m512i v[16];
        for (int c = 0; c < 4; ++c) {
          const __m512i wv = _mm512_loadu_si512(tile + ((4 * b + c) * TILE + rr) * 64);
          for (int sc = 0; sc < 4; ++sc) v[4 * c + sc] = weights(sub_chunk(wv, sc, low4, magic), sl, zl, sh, zh);
        }
        transpose16(v);
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(o + BLOCK * b + 32 * p, v[p]);
      }
      int64_t j = nb * BLOCK / g, left = g / 32;  // group of the next 32 columns, sub-chunks left in it (no division per chunk)
      auto emit = [&](__m512bh v, int64_t col) {
        const __m512 s = _mm512_set1_ps(sbuf[j]), z = _mm512_set1_ps(zbuf[j]);
        if (--left == 0) ++j, left = g / 32;
        _mm512_storeu_si512(o + col, weights(v, s, z, s, z));
      };
      for (int64_t c = 4 * nb; c < nc; ++c) {
        const __m512i wv = _mm512_loadu_si512(tile + (c * TILE + rr) * 64);
        for (int sc = 0; sc < 4; ++sc) emit(sub_chunk(wv, sc, low4, magic), 128 * c + 32 * sc);
      }
      if (k % 128) {
        const __m512i wv = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + nc * TILE * 64 + rr * 32)));
        for (int sc = 0; sc < 2; ++sc) emit(sub_chunk(wv, sc, low4, magic), 128 * nc + 32 * sc);
      }
    }
  }
}

}  // namespace

void lowbit::int4_gemm(const at::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale,
                       bool half_scale, const void* zero, int64_t zero_mode, float zconst, int64_t n,
                       int64_t group_size, at::BFloat16* y) {
  const int64_t G = k / group_size, n_tiles = (n + TILE - 1) / TILE, nb = lowbit::int4_blocks(k, group_size);
  // per-call scratch, kept per thread (the decode step calls this per projection and thread)
  thread_local std::vector<float> sx, xoff32;
  thread_local std::vector<at::BFloat16> xb;
  sx.assign(m * G + 1, 0.f);  // group sums; with a constant zero point, the chains' start
  if (nb) {  // each 32-column run's sum (the blocks' chains start at its offset), group sums from them
    xoff32.resize(m * k / 32);
    group_sums(x, m, k, 32, xoff32.data());
    for (int64_t r = 0; r < m * k / 32; ++r) sx[r / (group_size / 32)] += xoff32[r];
    if (zero_mode == ZERO_CONST)
      for (float& v : xoff32) v *= -(zconst + 128.f);
    xb.resize(m * k);  // x in the codes' column order
    block_order(x, m, k, nb, xb.data());
    x = xb.data();
  } else {
    group_sums(x, m, k, group_size, sx.data());
  }
  if (zero_mode == ZERO_CONST)  // (TileAcc; the padding float: the start past the last group)
    for (int64_t j = 0; j < m * G; ++j) sx[j] *= -(zconst + 128.f) / 16.f;
  const float *sxp = sx.data(), *xop = xoff32.data();  // (the caller's: thread_local names are per thread)
  at::parallel_for(0, n_tiles, 4, [&](int64_t t0, int64_t t1) {
    dispatch(half_scale, zero_mode, [&](auto s, auto z) {
      using S = decltype(s);
      int4_tiles<S, decltype(z)::value>(m, codes, static_cast<const S*>(scale), zero, zconst, x, sxp, xop, y, n, k,
                                        group_size, t0, t1);
    });
  });
}

void lowbit::int4_gemm_a8(const at::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale,
                          bool half_scale, const void* zero, int64_t zero_mode, float zconst, int64_t n,
                          int64_t group_size, at::BFloat16* y) {
  const int64_t G = k / group_size, B = k / 32, n_tiles = (n + TILE - 1) / TILE;
  std::vector<int8_t> xq(m * k);
  std::vector<float> xs(m * B), sx(m * G);
  quantize_x(x, m, k, group_size, true, xq.data(), xs.data(), sx.data());
  at::parallel_for(0, n_tiles, 4, [&](int64_t t0, int64_t t1) {
    dispatch(half_scale, zero_mode, [&](auto s, auto z) {
      using S = decltype(s);
      int4_tiles_a8<S, decltype(z)::value>(m, codes, static_cast<const S*>(scale), zero, zconst, xq.data(), xs.data(),
                                           sx.data(), y, n, k, group_size, t0, t1);
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

// int8 weights on bf16 activations, exactly (no rounding of x): a code q read as the unsigned
// byte u = q + 128 (its top bit flipped) is 16h + l, and OR-ing l into 0x4300 and h into 0x4500
// gives the bf16 numbers 128 + l and 2048 + 16h (bf16 steps by 16 in [2048, 4096)), so
// vdpbf16ps takes 32 codes' low or high halves per instruction and
//   sum_k x_k q_k = sum_k x_k (128 + l_k) + sum_k x_k (2048 + 16 h_k) - 2304 sum_k x_k.
// A 64-byte load's word j holds columns 2j and 2j+1; its four nibbles are 32 columns each of
// (even, low), (odd, low), (even, high), (odd, high), so x is stored once per call with each
// 64-column chunk's even columns before its odd ones. The 2304 x_k terms are taken off per
// 512 columns, lane by lane (offsets stored after x): left to the end of a long row, their
// fp32 sum's rounding cost up to 2% of a result on activations with a large common mean.
// Against sign-extending the codes to fp32 for an FMA (the avx2 build's way), 1.4-1.5x on the
// embedded model's 49152x576 head and on 4096x4096 (Zen 4, weights cold).
constexpr int64_t INT8_SPAN = 512;  // columns per offset

int64_t lowbit::int8_x_floats(int64_t k) { return k / 2 + 16 * ((k + INT8_SPAN - 1) / INT8_SPAN); }

void lowbit::int8_prepare_x(const at::BFloat16* x, int64_t m, int64_t k, float* xp) {
  for (int64_t i = 0; i < m; ++i) {
    const at::BFloat16* xi = x + i * k;
    float* xr = xp + i * int8_x_floats(k);
    auto* xe = reinterpret_cast<at::BFloat16*>(xr);
    float* off = xr + k / 2;
    for (int64_t c = 0; c < k; c += 64) {
      float* o = off + 16 * (c / INT8_SPAN);
      if (c % INT8_SPAN == 0) std::fill(o, o + 16, 0.f);
      for (int j = 0; j < 32; ++j) {
        xe[c + j] = xi[c + 2 * j];
        xe[c + 32 + j] = xi[c + 2 * j + 1];
      }
      for (int j = 0; j < 16; ++j)  // lane j's four activations in this chunk: even 2j, 2j+1; odd 2j, 2j+1
        o[j] += 2304.f * (static_cast<float>(xe[c + 2 * j]) + static_cast<float>(xe[c + 2 * j + 1]) +
                          static_cast<float>(xe[c + 32 + 2 * j]) + static_cast<float>(xe[c + 33 + 2 * j]));
    }
  }
}

// R weight rows against one activation row; two chains per row hide the vdpbf16ps latency.
template <int R>
LB_INLINE void int8_rows(const int8_t* wr, int64_t k, const float* xp, const float* sp, at::BFloat16* y) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), lo = _mm512_set1_epi16(0x4300), hi = _mm512_set1_epi16(0x4508);
  const auto* xe = reinterpret_cast<const at::BFloat16*>(xp);
  const float* off = xp + k / 2;
  __m512 acc[R], a0[R], a1[R];
  for (int i = 0; i < R; ++i) acc[i] = a0[i] = a1[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 64) {
    const __m512bh even = ldx(xe + c), odd = ldx(xe + c + 32);
    for (int i = 0; i < R; ++i) {
      prefetch_ahead(wr + i * k + c);
      const __m512i w = _mm512_loadu_si512(wr + i * k + c);
      // 0xEA: (w & low4) | lo; 0x6A: (w & low4) ^ 0x4508, which also flips the sign bit's nibble
      a0[i] = _mm512_dpbf16_ps(a0[i], (__m512bh)_mm512_ternarylogic_epi32(w, low4, lo, 0xEA), even);
      a1[i] = _mm512_dpbf16_ps(a1[i], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), low4, lo, 0xEA), odd);
      a0[i] = _mm512_dpbf16_ps(a0[i], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low4, hi, 0x6A), even);
      a1[i] = _mm512_dpbf16_ps(a1[i], (__m512bh)_mm512_xor_si512(_mm512_srli_epi16(w, 12), hi), odd);
    }
    if ((c + 64) % INT8_SPAN == 0 || c + 64 == k) {
      const __m512 o = _mm512_loadu_ps(off + 16 * (c / INT8_SPAN));
      for (int i = 0; i < R; ++i) {
        acc[i] = _mm512_add_ps(acc[i], _mm512_sub_ps(_mm512_add_ps(a0[i], a1[i]), o));
        a0[i] = a1[i] = _mm512_setzero_ps();
      }
    }
  }
  for (int i = 0; i < R; ++i) y[i] = at::BFloat16(hsum(acc[i]) * sp[i]);
}

// Rows in order: one at a time up to 4096 columns (one memory stream per thread; two rows
// interleaved ran 1.2-1.6x slower there), two at a time beyond (the activations reread half as
// often: 4096 x 14336 1.15x faster so; Zen 4, weights cold).
void lowbit::int8_gemm(const float* xp, int64_t m, int64_t k, const int8_t* wp, const float* sp, int64_t n,
                       at::BFloat16* yp) {
  const int64_t stride = int8_x_floats(k);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1;) {
      const bool pair = k > 4096 && r + 1 < r1;
      for (int64_t i = 0; i < m; ++i)  // m > 1 rereads the rows from L1
        (pair ? int8_rows<2> : int8_rows<1>)(wp + r * k, k, xp + i * stride, sp + r, yp + i * n + r);
      r += pair ? 2 : 1;
    }
  });
}

// The same on activations rounded to int8 in blocks of 32 (as int4_gemm_a8). vpdpbusd takes
// unsigned bytes: x + 128, whose extra 128 * sum(w) a second vpdpbusd against 128s takes off.
// Columns stay in order, so in 64 columns lanes 0-7 hold one block and lanes 8-15 the next.
void lowbit::int8_gemm_a8(const at::BFloat16* x, int64_t m, int64_t k, const int8_t* wp, const float* sp, int64_t n,
                          at::BFloat16* yp) {
  const int64_t B = k / 32, C = k / 64;
  std::vector<int8_t> xq(m * k);
  std::vector<float> xs(m * B), sx(m);
  quantize_x(x, m, k, k, false, xq.data(), xs.data(), sx.data());
  for (int64_t j = 0; j < m * k; j += 64)  // in place: x + 128 as unsigned bytes
    _mm512_storeu_si512(xq.data() + j, _mm512_xor_si512(_mm512_loadu_si512(xq.data() + j), _mm512_set1_epi8(-128)));
  std::vector<float> sv(m * C * 16);  // per 64 columns: block 2c's scale in lanes 0-7, 2c+1's in 8-15
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < C; ++c)
      for (int l = 0; l < 16; ++l) sv[(i * C + c) * 16 + l] = xs[i * B + 2 * c + l / 8];
  const __m512i u128 = _mm512_set1_epi8(-128);  // 0x80: 128 as an unsigned byte
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* wr = wp + r * k;
      for (int64_t i = 0; i < m; ++i) {
        const uint8_t* xi = reinterpret_cast<const uint8_t*>(xq.data()) + i * k;
        const float* si = sv.data() + i * C * 16;
        auto step = [&](int64_t c, __m512& acc) {  // 64 columns: two blocks' integer sums, each scaled
          prefetch_ahead(wr + 64 * c);
          const __m512i w = _mm512_loadu_si512(wr + 64 * c);
          const __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xi + 64 * c), w),
                                             _mm512_dpbusd_epi32(_mm512_setzero_si512(), u128, w));
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(si + 16 * c), acc);
        };
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;  // two chains hide the FMA latency
        for (int64_t c = 0; c + 1 < C; c += 2) {
          step(c, a0);
          step(c + 1, a1);
        }
        if (C % 2) step(C - 1, a0);
        yp[i * n + r] = at::BFloat16(hsum(_mm512_add_ps(a0, a1)) * sp[r]);
      }
    }
  });
}

bool lowbit::has_int8_act() { return true; }

void lowbit::int8_dequant_rows(const int8_t* w, const float* scale, int64_t k, int64_t r0, int64_t r1,
                               at::BFloat16* out) {
  for (int64_t r = r0; r < r1; ++r) {  // bf16(scale * code): the reference rounding
    const __m512 s = _mm512_set1_ps(scale[r]);
    for (int64_t c = 0; c < k; c += 16) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k + c))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r - r0) * k + c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, s)));
    }
  }
}

