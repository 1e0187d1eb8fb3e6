// The torch-facing side of lowbit's CPU kernels: each op checks its tensors once and calls
// the raw kernels of lowbit_cpu.h, which the build takes from avx512.cpp or avx2.cpp (the
// layouts are documented there and in kernels/native.py). LOWBIT_PREFILL (the avx512 build)
// adds the prefill GEMMs, on AMX tiles (amx_gemm.cpp) or AVX512-BF16 (bf16_gemm.cpp), behind
// the same checks.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common.h"
#include "lowbit_cpu.h"

namespace {

using namespace lowbit::detail;

constexpr int64_t n_padded(int64_t n) { return (n + TILE - 1) / TILE * TILE; }

// 4-bit codes in tiles for an [n, k] weight, with their scales and zero terms (mode 0: none).
void check_int4(int64_t k, const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                int64_t n, int64_t group_size, int64_t zero_mode) {
  TORCH_CHECK(k % 64 == 0 && group_size % 32 == 0 && k % group_size == 0,
              "k must be a multiple of 64 and of the group size (a multiple of 32)");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.numel() == n_padded(n) * k / 2,
              "codes: contiguous uint8, ceil(n/4)*4 rows of k/2 bytes");
  TORCH_CHECK((scale.dtype() == torch::kHalf || scale.dtype() == torch::kFloat) && scale.is_contiguous() &&
              scale.numel() == n_padded(n) * (k / group_size), "scale: contiguous fp16/fp32 [ceil(n/4)*4, k/group_size]");
  TORCH_CHECK(zero_mode == ZERO_CONST ||
              (zero_mode == ZERO_INT && zero.dtype() == torch::kUInt8 && zero.is_contiguous() && zero.numel() == scale.numel()) ||
              (zero_mode == ZERO_FLOAT && zero.dtype() == scale.dtype() && zero.is_contiguous() && zero.numel() == scale.numel()),
              "zero: one per scale (uint8 zero points, or offsets of the scale's dtype)");
}

void check_int8(int64_t k, const torch::Tensor& w, const torch::Tensor& scale) {
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 2 && w.is_contiguous() && w.size(1) == k && k % 64 == 0,
              "w: contiguous int8 [n, k], k a multiple of 64 and equal to x's");
  TORCH_CHECK(scale.dtype() == torch::kFloat && scale.is_contiguous() && scale.numel() == w.size(0), "scale: fp32 [n]");
}

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bf16 [m, k]");
}

// The 4-bit kernels' arguments after the checks, as lowbit_cpu.h takes them.
struct Int4 {
  const uint8_t* codes;
  const void* scale;
  bool half;
  const void* zero;
  int64_t zero_mode, k, group;
  float zconst;

  // checks first: a tensor of the wrong dtype must get check_int4's message, not data_ptr's
  Int4(int64_t k_, const torch::Tensor& c, const torch::Tensor& s, const torch::Tensor& z, int64_t n, int64_t g,
       int64_t mode, double zc)
      : codes((check_int4(k_, c, s, z, n, g, mode), c.data_ptr<uint8_t>())), scale(s.data_ptr()),
        half(s.dtype() == torch::kHalf), zero(mode == ZERO_CONST ? nullptr : z.data_ptr()), zero_mode(mode), k(k_),
        group(g), zconst(static_cast<float>(zc)) {}
  void dequant(int64_t r0, int64_t r1, at::BFloat16* out) const {
    lowbit::int4_dequant_rows(codes, scale, half, zero, zero_mode, zconst, k, group, r0, r1, out);
  }
};

// y[m, n] (bf16) = x[m, k] (bf16) @ W^T, W from 4-bit codes in tiles; zero_mode selects the zero term.
// act_int8: x rounded to int8 in blocks of 32 first (lowbit_cpu.h: int4_gemm_a8; avx512 build).
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                      int64_t n, int64_t group_size, int64_t zero_mode, double zero_const, bool act_int8) {
  check_x(x);
  const Int4 w(x.size(1), codes, scale, zero, n, group_size, zero_mode, zero_const);
  auto y = torch::empty({x.size(0), n}, x.options());
  lowbit::check_act_int8(act_int8);
  (act_int8 ? lowbit::int4_gemm_a8 : lowbit::int4_gemm)(x.data_ptr<at::BFloat16>(), x.size(0), w.k, w.codes, w.scale,
                                                        w.half, w.zero, w.zero_mode, w.zconst, n, w.group,
                                                        y.data_ptr<at::BFloat16>());
  return y;
}

// The first rows * k elements of `out` (a reused scratch: a fresh 2 MB tensor per call cost
// more in page faults than the dequantization itself), as a [rows, k] tensor.
torch::Tensor rows_of(torch::Tensor out, int64_t rows, int64_t k) {
  TORCH_CHECK(out.dtype() == torch::kBFloat16 && out.is_contiguous() && out.numel() >= rows * k, "out: bf16 scratch of rows * k");
  return out.view(-1).narrow(0, 0, rows * k).view({rows, k});
}

// W[row0:row1] as bf16 into scratch (row0, row1 multiples of 4, within the padded rows).
torch::Tensor int4_dequant(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t n, int64_t k,
                           int64_t group_size, int64_t zero_mode, double zero_const, int64_t row0, int64_t row1,
                           torch::Tensor scratch) {
  const Int4 w(k, codes, scale, zero, n, group_size, zero_mode, zero_const);
  TORCH_CHECK(row0 % TILE == 0 && row1 % TILE == 0 && 0 <= row0 && row0 <= row1 && row1 <= n_padded(n),
              "rows: a tile-aligned range of the padded rows");
  auto out = rows_of(scratch, row1 - row0, k);
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(row0 / TILE, row1 / TILE, 4, [&](int64_t t0, int64_t t1) {
    w.dequant(t0 * TILE, t1 * TILE, op + (t0 * TILE - row0) * k);
  });
  return out;
}

// y[m, n] (bf16) = x[m, k] (bf16) @ (scale[n] * W[n, k] (int8))^T, fp32 accumulation; act_int8 as int4_mm's.
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scale, bool act_int8) {
  check_x(x);
  check_int8(x.size(1), w, scale);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto y = torch::empty({m, n}, x.options());
  lowbit::check_act_int8(act_int8);
  if (act_int8) {
    lowbit::int8_gemm_a8(x.data_ptr<at::BFloat16>(), m, k, w.data_ptr<int8_t>(), scale.data_ptr<float>(), n,
                         y.data_ptr<at::BFloat16>());
    return y;
  }
  auto xp = torch::empty({m, lowbit::int8_x_floats(k)}, x.options().dtype(torch::kFloat));
  lowbit::int8_prepare_x(x.data_ptr<at::BFloat16>(), m, k, xp.data_ptr<float>());
  lowbit::int8_gemm(xp.data_ptr<float>(), m, k, w.data_ptr<int8_t>(), scale.data_ptr<float>(), n,
                    y.data_ptr<at::BFloat16>());
  return y;
}

// W[row0:row1] as bf16 into scratch (prefill, as int4_dequant).
torch::Tensor int8_dequant(torch::Tensor w, torch::Tensor scale, int64_t row0, int64_t row1, torch::Tensor scratch) {
  check_int8(w.size(1), w, scale);
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= w.size(0), "rows: a range of w");
  const int64_t k = w.size(1);
  auto out = rows_of(scratch, row1 - row0, k);
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(row0, row1, 16, [&](int64_t r0, int64_t r1) {
    lowbit::int8_dequant_rows(w.data_ptr<int8_t>(), scale.data_ptr<float>(), k, r0, r1, op + (r0 - row0) * k);
  });
  return out;
}

// A copy of t (at least 2 MiB of it) on memory aligned to 2 MiB and advised MADV_HUGEPAGE.
// A GEMV streams every weight byte once per token; on 4 KiB pages that stream misses the TLB
// every 4 KiB, and Linux's usual THP setting ("madvise") gives anonymous memory 2 MiB pages
// only where asked. A hint: where THP is off the copy keeps 4 KiB pages. Smaller tensors
// come back as they are.
torch::Tensor huge_page_copy(const torch::Tensor& t) {
  constexpr size_t HUGE = size_t{2} << 20;
  auto src = t.contiguous();
  const size_t n = src.nbytes();
#ifdef __linux__
  if (n < HUGE) return src;
  const size_t size = (n + HUGE - 1) / HUGE * HUGE;
  auto* raw = static_cast<char*>(mmap(nullptr, size + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  TORCH_CHECK(raw != MAP_FAILED, "huge_page_copy: cannot map ", size, " bytes");
  const size_t head = (HUGE - reinterpret_cast<uintptr_t>(raw) % HUGE) % HUGE;
  char* p = raw + head;  // give back the unaligned ends
  if (head) munmap(raw, head);
  munmap(p + size, HUGE - head);
  madvise(p, size, MADV_HUGEPAGE);
  std::memcpy(p, src.data_ptr(), n);  // the first touch: the pages fault in as 2 MiB ones
  return torch::from_blob(p, src.sizes(), [size](void* q) { munmap(q, size); }, src.options());
#else
  return src;
#endif
}

#ifdef LOWBIT_PREFILL
// y[m, n] for many rows, W dequantized 32 rows at a time into AMX tile products (amx) or the
// AVX512-BF16 microkernel (bf16_gemm.cpp).
torch::Tensor prefill_mm(const torch::Tensor& x, int64_t n, bool amx, const lowbit::Dequant& dequant) {
  TORCH_CHECK(!amx || lowbit::amx_ready(), "AMX tiles are not available to this process");
  auto y = torch::empty({x.size(0), n}, x.options());
  (amx ? lowbit::amx_gemm : lowbit::bf16_gemm)(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), n, dequant,
                                               y.data_ptr<at::BFloat16>());
  return y;
}

torch::Tensor int4_mm_prefill(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t n,
                              int64_t group_size, int64_t zero_mode, double zero_const, bool amx) {
  check_x(x);
  const Int4 w(x.size(1), codes, scale, zero, n, group_size, zero_mode, zero_const);
  return prefill_mm(x, n, amx, [&](int64_t r0, int64_t r1, at::BFloat16* out) { w.dequant(r0, r1, out); });
}

// The same on activations rounded to int8 in blocks of 32 (vnni_gemm.cpp), as int4_mm's act_int8
// (and int8_mm_prefill_a8 below for int8 weights).
torch::Tensor int4_mm_prefill_a8(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t n,
                                 int64_t group_size, int64_t zero_mode, double zero_const) {
  check_x(x);
  const Int4 w(x.size(1), codes, scale, zero, n, group_size, zero_mode, zero_const);
  auto y = torch::empty({x.size(0), n}, x.options());
  lowbit::int4_gemm_a8_many(x.data_ptr<at::BFloat16>(), x.size(0), w.k, w.codes, w.scale, w.half, w.zero, w.zero_mode,
                            w.zconst, n, w.group, y.data_ptr<at::BFloat16>());
  return y;
}

torch::Tensor int8_mm_prefill_a8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check_x(x);
  check_int8(x.size(1), w, scale);
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  lowbit::int8_gemm_a8_many(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), w.data_ptr<int8_t>(),
                            scale.data_ptr<float>(), w.size(0), y.data_ptr<at::BFloat16>());
  return y;
}

torch::Tensor int8_mm_prefill(torch::Tensor x, torch::Tensor w, torch::Tensor scale, bool amx) {
  check_x(x);
  check_int8(x.size(1), w, scale);
  const int64_t k = w.size(1);
  return prefill_mm(x, w.size(0), amx, [&](int64_t r0, int64_t r1, at::BFloat16* out) {
    lowbit::int8_dequant_rows(w.data_ptr<int8_t>(), scale.data_ptr<float>(), k, r0, r1, out);
  });
}
#endif

}  // namespace

void lowbit_register_decode(pybind11::module_& m);  // decode_step.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_blocks", &lowbit::int4_blocks, "how many leading 512-column blocks of a row the int4 layout transposes");
  m.def("int4_mm", &int4_mm, "4-bit weight-only matmul, bf16 activations (or rounded to int8 blocks)");
  m.def("int4_dequant", &int4_dequant, "rows of a 4-bit weight as bf16");
  m.def("int8_mm", &int8_mm, "int8 per-channel weight-only matmul, bf16 activations (or rounded to int8 blocks)");
  m.def("int8_dequant", &int8_dequant, "rows of an int8 per-channel weight as bf16");
  m.def("huge_page_copy", &huge_page_copy, "a copy of a tensor of 2 MiB or more on 2 MiB-aligned memory advised MADV_HUGEPAGE");
#ifdef LOWBIT_PREFILL
  m.def("amx_ready", &lowbit::amx_ready, "whether this CPU and kernel let the process use AMX tiles");
  m.def("int4_mm_prefill", &int4_mm_prefill, "4-bit weight-only matmul for many rows (AMX tiles or AVX512-BF16)");
  m.def("int4_mm_prefill_a8", &int4_mm_prefill_a8, "4-bit weight-only matmul for many rows on int8 activations (VNNI)");
  m.def("int8_mm_prefill_a8", &int8_mm_prefill_a8, "int8 per-channel weight-only matmul for many rows on int8 activations (VNNI)");
  m.def("int8_mm_prefill", &int8_mm_prefill, "int8 per-channel weight-only matmul for many rows (AMX tiles or AVX512-BF16)");
#endif
  lowbit_register_decode(m);
}
