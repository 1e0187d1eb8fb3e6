// Prefill where there are no AMX tiles (AVX512-BF16): y[m, n] = x[m, k] @ W^T for many
// activation rows. PyTorch's bf16 GEMM on a dequantized W pays for the dequantization, a
// write and a read of W at 16 bits, and oneDNN's repacking of W on every call; here each
// block of 32 weight rows is dequantized into a per-thread buffer, regrouped into bf16 pairs
// (the operand vdpbf16ps takes: in one register, the pair (2p, 2p+1) of 16 weight rows) and
// consumed at once by a register-blocked microkernel: MR activation rows x 32 weight rows of
// fp32 accumulators, each step one broadcast pair of x against two registers of W.
//
// Numerics are the reference path's: W rounded to bf16 after its scale, fp32 sums of exact
// bf16 products, a bf16 output.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "common.h"
#include "lowbit_cpu.h"
#include "transpose16.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using lowbit::detail::transpose16;
using lowbit::detail::with_count;

constexpr int64_t NR = 32;  // weight rows per block: two registers of 16 pairs
constexpr int MR = 12;      // activation rows per microkernel: 24 accumulators, 2 weight registers, 1 broadcast

// w: NR rows of k bf16 (row stride k) -> wp: for p = 0..k/2-1, the pairs (2p, 2p+1) of rows 0..NR-1.
void pack_pairs(const at::BFloat16* w, int64_t k, at::BFloat16* wp) {
  for (int64_t pb = 0; pb < k / 32; ++pb)
    for (int cb = 0; cb < NR / 16; ++cb) {
      __m512i r[16];  // r[j]: 16 pairs of row 16 cb + j
      for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(w + (16 * cb + j) * k + 32 * pb);
      transpose16(r);  // r[p]: pair 16 pb + p of rows 16 cb .. 16 cb + 15
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(wp + ((16 * pb + p) * NR + 16 * cb) * 2, r[p]);
    }
}

// One pass over columns [k0, k0 + kc) for rows [i0, i0 + R) against one packed block (x, row
// stride ld, and wp already at k0): fp32 sums start at zero on the first pass and continue from
// c (R x NR) on the others; the last pass writes y[i, n0 .. n0 + 32) as bf16 (columns past n
// left alone).
template <int R>
void micro(const at::BFloat16* x, int64_t ld, int64_t kc, const at::BFloat16* wp, float* c, bool first, bool last,
           at::BFloat16* y, int64_t n, int64_t n0) {
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < 2; ++h) acc[i][h] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * NR + 16 * h);
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);  // x as pairs
  for (int64_t p = 0; p < kc / 2; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + p * 2 * NR);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + p * 2 * NR + 32);
    for (int i = 0; i < R; ++i) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp[i * (ld / 2) + p]);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xb);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xb);
    }
  }
  if (!last) {
    for (int i = 0; i < R; ++i)
      for (int h = 0; h < 2; ++h) _mm512_storeu_ps(c + i * NR + 16 * h, acc[i][h]);
    return;
  }
  const __mmask32 keep = n - n0 >= NR ? ~0u : (1u << (n - n0)) - 1;
  for (int i = 0; i < R; ++i)
    _mm512_mask_storeu_epi16(y + i * n + n0, keep, (__m512i)_mm512_cvtne2ps_pbh(acc[i][1], acc[i][0]));
}

}  // namespace

void lowbit::bf16_gemm(const at::BFloat16* x, int64_t m, int64_t k, int64_t n, const Dequant& dequant,
                       at::BFloat16* y) {
  // x copied with its rows 64 bytes further apart: the MR rows a microkernel reads at once, 2 KB
  // or 4 KB apart (k = 1024, 2048, 4096 ...), all fell in one L1 set (k = 4096 ran 0.7x oneDNN)
  const int64_t ld = k + 32;
  thread_local std::vector<at::BFloat16> xbuf;  // the caller's; the workers see it through xs
  xbuf.resize(m * ld);
  at::BFloat16* xs = xbuf.data();
  at::parallel_for(0, m, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(xs + i * ld, x + i * k, k * 2);
  });
  // columns per pass, in equal multiples of 32: x's slice of all m rows (up to ~512 KB) stays in
  // L2 while every block reads it; passes spill the accumulators, so one where x fits
  const int64_t kc_max = std::max<int64_t>(1024, (1 << 18) / m), passes = (k + kc_max - 1) / kc_max;
  const int64_t kc = (k / passes + 31) / 32 * 32;
  at::parallel_for(0, (n + NR - 1) / NR, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<at::BFloat16> w, wp;  // reused: a fresh buffer per call costs page faults
    thread_local std::vector<float> c;
    w.resize(NR * k);
    wp.resize(NR * k);
    c.resize(m * NR);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * NR, r1 = std::min(n, r0 + NR);
      dequant(r0, r1, w.data());
      if (r1 - r0 < NR) std::memset(w.data() + (r1 - r0) * k, 0, (NR - (r1 - r0)) * k * 2);
      pack_pairs(w.data(), k, wp.data());
      for (int64_t k0 = 0; k0 < k; k0 += kc) {
        const int64_t len = std::min(kc, k - k0);
        for (int64_t i0 = 0; i0 < m; i0 += MR)
          with_count<MR>(static_cast<int>(std::min<int64_t>(MR, m - i0)), [&](auto rows) {
            micro<decltype(rows)::value>(xs + i0 * ld + k0, ld, len, wp.data() + k0 * NR, c.data() + i0 * NR,
                                         k0 == 0, k0 + len == k, y + i0 * n, n, r0);
          });
      }
    }
  });
}
