// Prefill with AMX tiles: y[m, n] = x[m, k] @ W^T for many activation rows, W dequantized
// 32 rows at a time into a per-thread, cache-resident bf16 buffer and consumed at once by
// TDPBF16PS, so W is never written out whole and there is no separate GEMM call to feed.
//
// The tile product computes C += A * B with A row-major (16 rows x 32 bf16) and B in pairs
// (row p = 16 pairs of bf16 along k). The dequantized W rows are A as they are; the
// activations are packed once per call into B tiles (x^T in pairs). So each C tile is a
// block of y^T (16 weight rows x 16 activation rows) and is transposed on its way out.
// Measured on the Xeon host (a 1536 x 576 weight, 128 rows): about two thirds of a call is
// tile loads and products (each TDPBF16PS with its loads ~40 ns there, ~14 ns from registers
// alone), a third the dequantization; a 2 x 2 block of accumulators is the most reuse of
// each loaded tile that eight tile registers allow.
//
// Used only where the CPU has AMX-BF16 and the kernel grants the tile state to the process
// (arch_prctl); `amx_ready()` says which, and the Python side falls back to dequantized
// blocks and PyTorch's bf16 GEMM otherwise.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lowbit_cpu.h"
#include "transpose16.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using lowbit::detail::transpose16;

constexpr int64_t WROWS = 32;  // weight rows per block: two A tiles
constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: tmm0-3 accumulators (2 weight blocks x 2 activation
// blocks), tmm4/5 the two weight blocks, tmm6/7 two activation blocks.
__attribute__((target("amx-tile"))) void configure_tiles() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = 16;
  asm volatile("" : : "r"(&c) : "memory");  // GCC 12 drops the stores above: it does not see ldtilecfg read them
  _tile_loadconfig(&c);
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// x [m, k] as B tiles: tile (mb, kb) holds, in row p, the pairs x[16 mb + j][32 kb + 2p .. +1]
// for j = 0..15 (rows past m are zero). A 32-column slice of a row is 16 pairs: a transpose.
void pack_activations(const at::BFloat16* x, int64_t m, int64_t k, at::BFloat16* xt) {
  const int64_t mblocks = (m + 15) / 16, kblocks = k / 32;
  at::parallel_for(0, mblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = b0; mb < b1; ++mb)
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        __m512i r[16];
        for (int j = 0; j < 16; ++j) {
          const int64_t row = mb * 16 + j;
          r[j] = row < m ? _mm512_loadu_si512(x + row * k + kb * 32) : _mm512_setzero_si512();
        }
        transpose16(r);
        at::BFloat16* tile = xt + (mb * kblocks + kb) * 512;
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(tile + p * 32, r[p]);
      }
  });
}

// One block of WROWS weight rows (in w, row stride k) against NM activation blocks from mb;
// writes y[16 mb .. , n0 .. n0 + WROWS) (columns past n and rows past m left alone).
template <int NM>
__attribute__((target("amx-tile,amx-bf16"))) void tile_block(const at::BFloat16* w, const at::BFloat16* xt,
                                                              int64_t kblocks, int64_t mb, int64_t m, int64_t n,
                                                              int64_t n0, at::BFloat16* y) {
  const int64_t k = kblocks * 32;
  _tile_zero(0);
  _tile_zero(1);
  if (NM == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _tile_loadd(4, w + kb * 32, k * 2);
    _tile_loadd(5, w + 16 * k + kb * 32, k * 2);
    _tile_loadd(6, xt + (mb * kblocks + kb) * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (NM == 2) {
      _tile_loadd(7, xt + ((mb + 1) * kblocks + kb) * 512, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float c[4][16][16];  // [accumulator][weight row][activation row]
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  if (NM == 2) {
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  }
  for (int t = 0; t < 2 * NM; ++t) {  // accumulator t: weight rows 16 (t % 2), activation block mb + t / 2
    const int64_t col = n0 + 16 * (t % 2), row0 = (mb + t / 2) * 16;
    if (col >= n) continue;
    const __mmask16 keep = n - col >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - col)) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c[t][i]);
    transpose16(r);
    for (int j = 0; j < 16 && row0 + j < m; ++j)
      _mm256_mask_storeu_epi16(y + (row0 + j) * n + col, keep,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[j])));
  }
}

}  // namespace

bool lowbit::amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

void lowbit::amx_gemm(const at::BFloat16* x, int64_t m, int64_t k, int64_t n, const Dequant& dequant,
                      at::BFloat16* y) {
  const int64_t mblocks = (m + 15) / 16, kblocks = k / 32;
  std::vector<at::BFloat16> xt(mblocks * kblocks * 512);
  pack_activations(x, m, k, xt.data());
  at::parallel_for(0, (n + WROWS - 1) / WROWS, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<at::BFloat16> w;  // reused: a fresh buffer per call costs page faults
    w.resize(WROWS * k);
    configure_tiles();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * WROWS, r1 = std::min(n, r0 + WROWS);
      dequant(r0, r1, w.data());
      if (r1 - r0 < WROWS) std::memset(w.data() + (r1 - r0) * k, 0, (WROWS - (r1 - r0)) * k * 2);
      for (int64_t mb = 0; mb < mblocks; mb += 2) {
        if (mblocks - mb >= 2) tile_block<2>(w.data(), xt.data(), kblocks, mb, m, n, r0, y);
        else tile_block<1>(w.data(), xt.data(), kblocks, mb, m, n, r0, y);
      }
    }
    release_tiles();
  });
}
