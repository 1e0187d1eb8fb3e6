// The raw-pointer entry points of lowbit's CPU kernels, one implementation per ISA
// (avx512.cpp, avx2.cpp; the build compiles one of them), shared by the torch-facing ops
// (ops.cpp), the decode step (decode_step.cpp) and the AMX prefill (amx_gemm.cpp), which
// call them without a tensor or Python in between.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <functional>

namespace lowbit {

// How many 512-column blocks at the start of each row this build's int4 layout stores with
// their column pairs transposed (avx512.cpp: the top of the file; the avx2 build: none).
int64_t int4_blocks(int64_t k, int64_t group_size);

// y[m, n] = x[m, k] @ W^T, W as 4-bit codes in the tiled layout; scale fp16 (half_scale) or fp32;
// zero_mode 0: a constant centre (zconst), 1: uint8 zero points, 2: float offsets of the scale's type.
void int4_gemm(const c10::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale, bool half_scale,
               const void* zero, int64_t zero_mode, float zconst, int64_t n, int64_t group_size, c10::BFloat16* y);

// The same with x rounded to int8 in blocks of 32 columns (llama.cpp's numerics): exact int32
// products (AVX512-VNNI), y = dequant(W) @ x_hat. Only the avx512 build has them
// (has_int8_act()); the avx2 build's refuse, as check_act_int8 below.
void int4_gemm_a8(const c10::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale, bool half_scale,
                  const void* zero, int64_t zero_mode, float zconst, int64_t n, int64_t group_size, c10::BFloat16* y);

// int8 weights on bf16 activations: x is laid out once per call as this build's GEMV reads it
// (int8_x_floats(k) floats per row: fp32 copies in the avx2 build, avx512.cpp's column order
// and sum in the avx512 build), then any slice of W's rows multiplies it:
// y[m, n] = x[m, k] @ (scale[n] * W[n, k] (int8))^T, fp32 sums.
int64_t int8_x_floats(int64_t k);
void int8_prepare_x(const c10::BFloat16* x, int64_t m, int64_t k, float* xp);
void int8_gemm(const float* xp, int64_t m, int64_t k, const int8_t* w, const float* scale, int64_t n, c10::BFloat16* y);
// The same with x (bf16) rounded to int8 in blocks of 32, as int4_gemm_a8.
void int8_gemm_a8(const c10::BFloat16* x, int64_t m, int64_t k, const int8_t* w, const float* scale, int64_t n,
                  c10::BFloat16* y);
bool has_int8_act();

// A one-line error where int8 activations are asked of a build without them.
inline void check_act_int8(bool act_int8) {
  TORCH_CHECK(!act_int8 || has_int8_act(), "int8 activations: this build of lowbit's kernels has no int8-activation GEMV");
}

// Weight rows [r0, r1) as bf16 into out (row stride k), on the calling thread. The 4-bit one
// writes whole 4-row tiles: rows up to r1 rounded up to 4 (padding rows come out zero).
void int4_dequant_rows(const uint8_t* codes, const void* scale, bool half_scale, const void* zero, int64_t zero_mode,
                       float zconst, int64_t k, int64_t group_size, int64_t r0, int64_t r1, c10::BFloat16* out);
void int8_dequant_rows(const int8_t* w, const float* scale, int64_t k, int64_t r0, int64_t r1, c10::BFloat16* out);

// The same for many activation rows (prefill) on int8 activations: vnni_gemm.cpp, avx512 build.
void int4_gemm_a8_many(const c10::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale,
                       bool half_scale, const void* zero, int64_t zero_mode, float zconst, int64_t n,
                       int64_t group_size, c10::BFloat16* y);
void int8_gemm_a8_many(const c10::BFloat16* x, int64_t m, int64_t k, const int8_t* w, const float* scale, int64_t n,
                       c10::BFloat16* y);

namespace detail {
// x [m, k] rounded to int8 in blocks of 32 columns (avx512.cpp): codes xq (in the int4 GEMV's
// order, or in column order), block scales xs [m, k/32], and x_hat's sums per group of g, sx [m, k/g].
void quantize_x(const c10::BFloat16* x, int64_t m, int64_t k, int64_t g, bool int4_order, int8_t* xq, float* xs,
                float* sx);
}  // namespace detail

// The avx512 build's prefill GEMMs. amx_gemm.cpp: whether this process may use the AMX tile
// state, and y[m, n] = x[m, k] @ W^T for many rows on AMX-BF16 tiles, dequant(r0, r1, out)
// writing weight rows [r0, r1) (r1 - r0 <= 32) as bf16 into out (row stride k). k % 32 == 0.
using Dequant = std::function<void(int64_t, int64_t, c10::BFloat16*)>;
bool amx_ready();
void amx_gemm(const c10::BFloat16* x, int64_t m, int64_t k, int64_t n, const Dequant& dequant, c10::BFloat16* y);
// The same on AVX512-BF16 alone (bf16_gemm.cpp), for CPUs without AMX; k % 32 == 0.
void bf16_gemm(const c10::BFloat16* x, int64_t m, int64_t k, int64_t n, const Dequant& dequant, c10::BFloat16* y);

}  // namespace lowbit
