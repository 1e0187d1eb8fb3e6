// The raw-pointer entry points of lowbit's CPU kernels (lowbit_cpu.cpp), shared with the
// decode step (decode_step.cpp), which calls them without a tensor or Python in between.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace lowbit {

// y[m, n] = x[m, k] @ W^T, W as 4-bit codes in the tiled layout; scale fp16 (half_scale) or fp32;
// zero_mode 0: a constant centre (zconst), 1: uint8 zero points, 2: float offsets of the scale's type.
void int4_gemm(const c10::BFloat16* x, int64_t m, int64_t k, const uint8_t* codes, const void* scale, bool half_scale,
               const void* zero, int64_t zero_mode, float zconst, int64_t n, int64_t group_size, c10::BFloat16* y);

// y[m, n] = x[m, k] (fp32, exact copies of bf16 activations) @ (scale[n] * W[n, k] (int8))^T
void int8_gemm(const float* x, int64_t m, int64_t k, const int8_t* w, const float* scale, int64_t n, c10::BFloat16* y);

}  // namespace lowbit
