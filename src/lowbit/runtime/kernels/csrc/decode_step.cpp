// One decoded token through every decoder layer of a Llama-family model, and its final norm
// and head, in C++.
//
// At batch 1 a 4-bit model's matmuls take a few milliseconds per token; the Python decode
// loop around them issued ~3000 ATen calls per token (norms, rotary, cache writes,
// attention, residuals), each a few microseconds of dispatch on data of a few KB, which
// cost as much again. Here each layer is plain loops over the same numbers, and the
// projections call the packed kernels (lowbit_cpu.h) through raw pointers.
//
// The numerics are decode.py's, rounding for rounding: RMSNorm in fp32, rounded to bf16,
// then times its bf16 weight; projections with bf16 outputs (+ bf16 bias); rotary,
// scores, softmax and the weighted sum in fp32 against the fp32 KV cache; SiLU, the gate
// product and the residual adds each rounded to bf16. Only fp32 summation order differs (and
// e^x, by at most one ulp before its bf16 rounding).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "lowbit_cpu.h"

namespace {

using bf16 = at::BFloat16;
using lowbit::detail::TILE;

// 8 bf16 <-> fp32 at a time (AVX2, both builds): a bf16 is the top half of a float, rounded as
// c10::BFloat16 rounds (to nearest even, NaN to 0x7FC0). One value at a time, the conversions
// were most of the ~10 us a layer spent on norms, residual adds and SiLU at hidden size 576.
inline __m256 load8(const bf16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline __m256i bf16_bits(__m256 x) {  // in the low half of each lane
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}
inline __m256 round8(__m256 x) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x), 16)); }
inline void store8(bf16* p, __m256 x) {
  const __m256i b = bf16_bits(x);  // lanes <= 0xFFFF: the unsigned saturating pack is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

// x[i] = bf16(x[i] + y[i]): residual adds, biases
void add_into(bf16* x, const bf16* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(x + i, _mm256_add_ps(load8(x + i), load8(y + i)));
  for (; i < n; ++i) x[i] = bf16(static_cast<float>(x[i]) + static_cast<float>(y[i]));
}

enum ProjKind { PROJ_INT4 = 0, PROJ_INT8 = 1, PROJ_DENSE = 2 };

// One projection as the step runs it: lowbit's int4 or int8 kernel, or a dense bf16 weight.
struct Proj {
  int64_t kind = PROJ_DENSE, n = 0, k = 0, group = 0, zero_mode = 0;
  double zconst = 0;
  bool act_int8 = false;  // int4/int8: activations rounded to int8 blocks (lowbit_cpu.h: *_gemm_a8)
  torch::Tensor codes, scale, zero, weight, bias;  // int4: codes/scale/zero; int8: weight/scale; dense: weight
  // int8 on bf16 activations, where defined: PyTorch's int8pack on these bf16 scales, as
  // QuantLinear dispatches rows wider than lowbit's int8 GEMV is fast on (native.int8_prepare)
  torch::Tensor scale_act;

  std::string kernel() const {
    if (kind == PROJ_INT4) return act_int8 ? "lowbit-int4 a8" : "lowbit-int4";
    if (kind == PROJ_INT8) return act_int8 ? "lowbit-int8 a8" : scale_act.defined() ? "int8pack" : "lowbit-int8";
    return "dense";
  }

  // Rows [r0, r1) of y = W x (r0 a multiple of the int4 tile; r1 too, or n): the kernels on the
  // rows' slice of W, called from inside a parallel region, so they run on the calling thread.
  // xp: x as lowbit::int8_prepare_x lays it out, for the int8 kernel on bf16 activations. No
  // bias (run_all adds it).
  void run_rows(const bf16* x, bf16* y, const float* xp, int64_t r0, int64_t r1) const {
    if (r0 >= r1) return;
    if (kind == PROJ_INT4) {
      const int64_t G = k / group, esize = scale.scalar_type() == at::kHalf ? 2 : 4;
      const auto* sp = static_cast<const char*>(scale.data_ptr()) + r0 * G * esize;
      const void* zp = zero_mode == 0 ? nullptr
                       : static_cast<const char*>(zero.data_ptr()) + r0 * G * (zero_mode == 1 ? 1 : esize);
      (act_int8 ? lowbit::int4_gemm_a8 : lowbit::int4_gemm)(
          x, 1, k, codes.data_ptr<uint8_t>() + r0 * k / 2, sp, esize == 2, zp, zero_mode, static_cast<float>(zconst),
          r1 - r0, group, y + r0);
    } else if (kind == PROJ_INT8 && act_int8) {
      lowbit::int8_gemm_a8(x, 1, k, weight.data_ptr<int8_t>() + r0 * k, scale.data_ptr<float>() + r0, r1 - r0, y + r0);
    } else if (kind == PROJ_INT8) {
      lowbit::int8_gemm(xp, 1, k, weight.data_ptr<int8_t>() + r0 * k, scale.data_ptr<float>() + r0, r1 - r0, y + r0);
    } else {
      auto xt = torch::from_blob(const_cast<bf16*>(x), {1, k}, torch::kBFloat16);
      auto out = torch::from_blob(y + r0, {1, r1 - r0}, torch::kBFloat16);
      at::matmul_out(out, xt, weight.narrow(0, r0, r1 - r0).t());
    }
  }
  // int8pack: the call QuantLinear makes, on the whole weight (it splits the rows over the
  // threads itself). x is copied into a tensor of PyTorch's own, as its kernel loads x with
  // aligned 32-byte moves (the step's buffers are 16-byte aligned: a segfault).
  bool packed() const { return kind == PROJ_INT8 && scale_act.defined(); }
  void run_packed(const bf16* x, bf16* y) const {
    auto xt = torch::from_blob(const_cast<bf16*>(x), {1, k}, torch::kBFloat16).clone();
    std::memcpy(y, at::_weight_int8pack_mm(xt, weight, scale_act).data_ptr<bf16>(), n * sizeof(bf16));
  }
  void add_bias(bf16* y) const {
    if (!bias.defined()) return;
    add_into(y, bias.data_ptr<bf16>(), n);
  }
};

// Projections of one input (q/k/v; gate/up; or one alone) as one parallel region over their
// rows laid end to end, in tiles of 4 rows: one fork and join where there were three, each a few
// microseconds beside GEMVs of 10-30 us at the embedded model's size.
void run_all(std::initializer_list<std::pair<const Proj*, bf16*>> all, const bf16* x, float* xp) {
  TORCH_CHECK(all.size() <= 3, "run_all: at most three projections of one input");
  std::pair<const Proj*, bf16*> projs[3];  // all but the packed ones
  int np = 0;
  int64_t tiles = 0, k = 0;
  bool int8_x = false;
  for (const auto& [p, y] : all) {
    if (p->packed()) {
      p->run_packed(x, y);
      continue;
    }
    projs[np++] = {p, y};
    tiles += (p->n + TILE - 1) / TILE;
    k = p->k;
    int8_x |= p->kind == PROJ_INT8 && !p->act_int8;
  }
  if (int8_x) lowbit::int8_prepare_x(x, 1, k, xp);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    int64_t first = 0;  // the first tile of the current projection
    for (int i = 0; i < np; ++i) {
      const auto& [p, y] = projs[i];
      const int64_t n_tiles = (p->n + TILE - 1) / TILE;
      const int64_t a = std::max(t0, first) - first, b = std::min(t1, first + n_tiles) - first;
      if (a < b) p->run_rows(x, y, xp, TILE * a, std::min(TILE * b, p->n));
      first += n_tiles;
    }
  });
  for (const auto& [p, y] : all) p->add_bias(y);
}

torch::Tensor bf16_bias(const c10::optional<torch::Tensor>& bias) {
  return bias ? bias->to(torch::kBFloat16).contiguous() : torch::Tensor();
}

Proj make_int4(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, int64_t n, int64_t k, int64_t group,
               int64_t zero_mode, double zconst, c10::optional<torch::Tensor> bias, bool act_int8) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && scale.is_contiguous(), "int4: packed codes");
  TORCH_CHECK(k % 64 == 0 && k % group == 0 && group % 32 == 0, "int4: k a multiple of 64 and of the group size");
  lowbit::check_act_int8(act_int8);
  Proj p;
  p.kind = PROJ_INT4, p.codes = codes, p.scale = scale, p.zero = zero, p.n = n, p.k = k, p.group = group;
  p.zero_mode = zero_mode, p.zconst = zconst, p.act_int8 = act_int8;
  p.bias = bf16_bias(bias);
  return p;
}

Proj make_int8(torch::Tensor weight, torch::Tensor scale, c10::optional<torch::Tensor> bias, bool act_int8,
               c10::optional<torch::Tensor> scale_act) {
  TORCH_CHECK(weight.dtype() == torch::kInt8 && weight.is_contiguous() && scale.dtype() == torch::kFloat, "int8 weight");
  TORCH_CHECK(!scale_act || scale_act->dtype() == torch::kBFloat16, "int8pack scales: bf16");
  lowbit::check_act_int8(act_int8);
  Proj p;
  p.kind = PROJ_INT8, p.weight = weight, p.scale = scale, p.n = weight.size(0), p.k = weight.size(1);
  p.act_int8 = act_int8;
  if (scale_act && !act_int8) p.scale_act = scale_act->contiguous();
  p.bias = bf16_bias(bias);
  return p;
}

Proj make_dense(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.dtype() == torch::kBFloat16 && weight.dim() == 2, "dense: a bf16 [n, k] weight");
  Proj p;
  p.kind = PROJ_DENSE, p.weight = weight, p.n = weight.size(0), p.k = weight.size(1);
  p.bias = bf16_bias(bias);
  return p;
}

struct Norm {
  torch::Tensor weight;  // bf16 [d]; undefined: no norm
  double eps = 0;
};

struct Layer {
  Norm norm1, norm2, q_norm, k_norm;
  Proj q, k, v, o, gate, up, down;
};

// transformers' Llama RMSNorm over each d-vector of x (count of them): fp32, round to bf16, times the bf16 weight
void rms_norm(const bf16* x, bf16* y, int64_t d, int64_t count, const Norm& nm) {
  const bf16* w = nm.weight.data_ptr<bf16>();
  for (int64_t c = 0; c < count; ++c, x += d, y += d) {
    __m256 ss8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) ss8 = _mm256_fmadd_ps(load8(x + i), load8(x + i), ss8);
    float part[8], ss = 0.f;
    _mm256_storeu_ps(part, ss8);
    for (; i < d; ++i) ss += static_cast<float>(x[i]) * static_cast<float>(x[i]);
    for (float v : part) ss += v;
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(nm.eps));
    for (i = 0; i + 8 <= d; i += 8)
      store8(y + i, _mm256_mul_ps(load8(w + i), round8(_mm256_mul_ps(load8(x + i), _mm256_set1_ps(r)))));
    for (; i < d; ++i)
      y[i] = bf16(static_cast<float>(w[i]) * static_cast<float>(bf16(static_cast<float>(x[i]) * r)));
  }
}

// x * cos + rotate_half(x) * sin for each head-vector (fp32 in, fp32 out)
void rotate(const bf16* x, float* y, int64_t d, int64_t heads, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h, x += d, y += d)
    for (int64_t i = 0; i < d; ++i) {
      const float xi = static_cast<float>(x[i]);
      const float r = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
      y[i] = xi * cos[i] + r * sin[i];
    }
}

// a . b over d floats in 16 independent partial sums, which the compiler vectorizes without
// reassociating (one chain of d dependent adds made the scores ~8% of a 4-bit decode step),
// added pairwise at the end: a chain of 4 adds, not 16
inline float dot(const float* a, const float* b, int64_t d) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  float sum = 0.f;
  for (; i < d; ++i) sum += a[i] * b[i];
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return sum + part[0];
}

// e^x for 8 floats: Cephes' expf (x = n ln2 + r, a degree-7 polynomial in r, times 2^n), within
// 1 ulp of std::exp (checked over [-100, 100]); +inf above 88.72, 0 below -87.33 (std::exp gives
// denormals there), NaN kept: SiLU and the softmax 8 values at a time.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.72283f), lo = _mm256_set1_ps(-87.33654f);
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);  // ln2 in two parts: r exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n as two factors: n reaches 128 at the top of the range, one past a float's exponent
  const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(n2));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// e^x over n floats in place; returns their sum
float exp_inplace(float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = exp8(_mm256_loadu_ps(x + i));
    _mm256_storeu_ps(x + i, y);
    acc = _mm256_add_ps(acc, y);
  }
  float part[8], sum = 0.f;
  _mm256_storeu_ps(part, acc);
  if (i < n) {  // the tail through a padded block
    float t[8] = {};
    std::copy(x + i, x + n, t);
    _mm256_storeu_ps(t, exp8(_mm256_loadu_ps(t)));
    for (int64_t j = 0; j < n - i; ++j) sum += (x[i + j] = t[j]);
  }
  for (float v : part) sum += v;
  return sum;
}

// out[c] = bf16(sum_p w[p] * V[p, c]) for columns c0 .. c0 + 8 NB (V's row stride d): NB
// independent chains in registers (summed in memory, each position's add waited on the last
// one's store: ~40% of the attention's time)
template <int NB>
void weighted_cols(const float* w, const float* V, int64_t rows, int64_t d, int64_t c0, bf16* out) {
  __m256 acc[NB];
  for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < rows; ++p) {
    const __m256 wp = _mm256_set1_ps(w[p]);
    for (int j = 0; j < NB; ++j) acc[j] = _mm256_fmadd_ps(wp, _mm256_loadu_ps(V + p * d + c0 + 8 * j), acc[j]);
  }
  for (int j = 0; j < NB; ++j) store8(out + c0 + 8 * j, acc[j]);
}

// out = bf16(w @ V) for V fp32 [rows, d]: 64 columns at a time, then what is left
void weighted_sum(const float* w, const float* V, int64_t rows, int64_t d, bf16* out) {
  int64_t c0 = 0;
  for (; c0 + 8 <= d; c0 += 64)
    lowbit::detail::with_count<8>(static_cast<int>(std::min<int64_t>(8, (d - c0) / 8)),
                                  [&](auto nb) { weighted_cols<decltype(nb)::value>(w, V, rows, d, c0, out); });
  for (c0 = d / 8 * 8; c0 < d; ++c0) {
    float a = 0.f;
    for (int64_t p = 0; p < rows; ++p) a += w[p] * V[p * d + c0];
    out[c0] = bf16(a);
  }
}

// silu(gate) * up, each rounded to bf16 as torch rounds them, in place in gate
void silu_mul(bf16* gate, const bf16* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = load8(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
    store8(gate + i, _mm256_mul_ps(round8(_mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), e))), load8(up + i)));
  }
  for (; i < n; ++i) {
    const float a = static_cast<float>(gate[i]);
    gate[i] = bf16(static_cast<float>(bf16(a / (1.f + std::exp(-a)))) * static_cast<float>(up[i]));
  }
}

class DecodeStep {
 public:
  DecodeStep(int64_t hidden, int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t max_len)
      : hidden_(hidden), n_heads_(n_heads), n_kv_(n_kv), d_(head_dim), max_len_(max_len) {
    TORCH_CHECK(n_heads % n_kv == 0 && head_dim % 2 == 0, "heads must group evenly onto KV heads");
  }

  void add_layer(Norm norm1, Norm norm2, Norm q_norm, Norm k_norm, std::vector<Proj> p) {
    TORCH_CHECK(p.size() == 7, "projections q, k, v, o, gate, up, down");
    Layer l{norm1, norm2, q_norm, k_norm, p[0], p[1], p[2], p[3], p[4], p[5], p[6]};
    TORCH_CHECK(l.q.k == hidden_ && l.q.n == n_heads_ * d_ && l.k.n == n_kv_ * d_ && l.v.n == n_kv_ * d_ &&
                l.o.k == n_heads_ * d_ && l.o.n == hidden_ && l.gate.k == hidden_ && l.up.n == l.gate.n &&
                l.down.k == l.gate.n && l.down.n == hidden_, "projection shapes do not match the config");
    inter_ = std::max(inter_, l.gate.n);
    layers_.push_back(std::move(l));
  }

  // The model's final norm and head: run() then returns logits, not the last layer's output
  // (in Python they were ~0.2 ms of ATen calls per token beside a head GEMV of ~1 ms).
  void set_head(Norm norm, Proj head) {
    TORCH_CHECK(head.k == hidden_, "head: hidden-wide rows");
    final_norm_ = std::move(norm);
    head_ = std::move(head);
    has_head_ = true;
  }

  // x: bf16 [hidden], the embedded token at position pos; returns the last layer's output, or
  // with a head set, the logits (bf16 [vocab]).
  // Rotary rows: q_cos/q_sin (softmax scaling folded in) and cos/sin, fp32 [max_len, head_dim].
  // Caches: fp32 [layers, n_kv, max_len, head_dim], written at pos.
  torch::Tensor run(torch::Tensor x, int64_t pos, torch::Tensor q_cos, torch::Tensor q_sin, torch::Tensor cos,
                    torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache) {
    TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.numel() == hidden_ && x.is_contiguous(), "x: bf16 [hidden]");
    TORCH_CHECK(pos >= 0 && pos < max_len_, "position past the KV cache");
    const int64_t L = static_cast<int64_t>(layers_.size()), cache_len = k_cache.size(2);
    TORCH_CHECK(k_cache.dtype() == torch::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                k_cache.numel() == L * n_kv_ * cache_len * d_ && v_cache.sizes() == k_cache.sizes() && pos < cache_len,
                "caches: contiguous fp32 [layers, n_kv, max_len, head_dim]");
    for (const auto* t : {&q_cos, &q_sin, &cos, &sin})
      TORCH_CHECK(t->dtype() == torch::kFloat && t->is_contiguous() && t->numel() >= (pos + 1) * d_, "rotary tables");
    const int64_t qd = n_heads_ * d_, kvd = n_kv_ * d_, g = n_heads_ / n_kv_;
    auto out = x.clone();
    bf16* h = buf16(hidden_, 0);
    bf16 *q = buf16(qd, 1), *kk = buf16(kvd, 2), *vv = buf16(kvd, 3), *att = buf16(qd, 4), *o = buf16(hidden_, 5);
    bf16 *gt = buf16(inter_, 6), *up = buf16(inter_, 7);
    std::vector<float> xp(lowbit::int8_x_floats(std::max(inter_, std::max(hidden_, qd))));  // int8_prepare_x's
    std::vector<float> qf(qd), kf(kvd), scores(n_heads_ * (pos + 1));
    bf16* xs = out.data_ptr<bf16>();
    const float *qc = q_cos.data_ptr<float>() + pos * d_, *qs = q_sin.data_ptr<float>() + pos * d_;
    const float *kc = cos.data_ptr<float>() + pos * d_, *ks = sin.data_ptr<float>() + pos * d_;
    for (int64_t li = 0; li < L; ++li) {
      const Layer& l = layers_[li];
      float* kcache = k_cache.data_ptr<float>() + li * n_kv_ * cache_len * d_;
      float* vcache = v_cache.data_ptr<float>() + li * n_kv_ * cache_len * d_;
      rms_norm(xs, h, hidden_, 1, l.norm1);
      proj({{&l.q, q}, {&l.k, kk}, {&l.v, vv}}, h, xp.data());
      if (l.q_norm.weight.defined()) {  // Qwen3: per-head RMSNorm of q and k before rotary
        rms_norm(q, q, d_, n_heads_, l.q_norm);
        rms_norm(kk, kk, d_, n_kv_, l.k_norm);
      }
      rotate(q, qf.data(), d_, n_heads_, qc, qs);
      rotate(kk, kf.data(), d_, n_kv_, kc, ks);
      for (int64_t j = 0; j < n_kv_; ++j)
        for (int64_t i = 0; i < d_; ++i) {
          kcache[(j * cache_len + pos) * d_ + i] = kf[j * d_ + i];
          vcache[(j * cache_len + pos) * d_ + i] = static_cast<float>(vv[j * d_ + i]);
        }
      // query head hq reads KV head hq / g; positions 0..pos
      at::parallel_for(0, n_heads_, 1, [&](int64_t h0, int64_t h1) {
        for (int64_t hq = h0; hq < h1; ++hq) {
          const float* qv = qf.data() + hq * d_;
          const float* K = kcache + (hq / g) * cache_len * d_;
          const float* V = vcache + (hq / g) * cache_len * d_;
          float* s = scores.data() + hq * (pos + 1);
          float mx = -INFINITY;
          for (int64_t p = 0; p <= pos; ++p) {
            s[p] = dot(qv, K + p * d_, d_);
            mx = std::max(mx, s[p]);
          }
          for (int64_t p = 0; p <= pos; ++p) s[p] -= mx;
          const float sum = exp_inplace(s, pos + 1);
          for (int64_t p = 0; p <= pos; ++p) s[p] /= sum;  // the probabilities, as softmax gives them
          weighted_sum(s, V, pos + 1, d_, att + hq * d_);
        }
      });
      proj({{&l.o, o}}, att, xp.data());
      add_into(xs, o, hidden_);
      rms_norm(xs, h, hidden_, 1, l.norm2);
      proj({{&l.gate, gt}, {&l.up, up}}, h, xp.data());
      silu_mul(gt, up, l.gate.n);
      proj({{&l.down, o}}, gt, xp.data());
      add_into(xs, o, hidden_);
    }
    if (!has_head_) return out;
    auto logits = torch::empty({head_.n}, out.options());
    rms_norm(xs, h, hidden_, 1, final_norm_);
    proj({{&head_, logits.data_ptr<bf16>()}}, h, xp.data());
    return logits;
  }

  double linear_seconds = 0;  // time inside projections, accumulated while `timed`
  bool timed = false;

 private:
  void proj(std::initializer_list<std::pair<const Proj*, bf16*>> projs, const bf16* x, float* xp) {
    if (!timed) return run_all(projs, x, xp);
    const auto t0 = std::chrono::steady_clock::now();
    run_all(projs, x, xp);
    linear_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  bf16* buf16(int64_t n, int slot) {
    if (static_cast<int64_t>(bufs_[slot].size()) < n) bufs_[slot].resize(n);
    return bufs_[slot].data();
  }

  int64_t hidden_, n_heads_, n_kv_, d_, max_len_, inter_ = 0;
  std::vector<Layer> layers_;
  Norm final_norm_;
  Proj head_;
  bool has_head_ = false;
  std::vector<bf16> bufs_[8];
};

// torch.argmax of bf16 logits took ~180 us per token at a 49152-word vocabulary; this ~5 us.
// bf16 bits as an int16 that orders as the numbers do (-0 == +0; NaNs apart), so both passes
// are integer loops the compiler vectorizes (a float max or a branch per value kept it from it).
inline int16_t order_key(uint16_t b) {
  const auto s = static_cast<int16_t>(b);
  return s >= 0 ? s : static_cast<int16_t>((s ^ 0x7FFF) + 1);
}
inline int is_nan(uint16_t b) { return (b & 0x7FFF) > 0x7F80; }

// The first index of the largest value of a 1-D bf16 tensor, NaN counting as largest: torch.argmax.
int64_t argmax(const torch::Tensor& t) {
  TORCH_CHECK(t.dtype() == torch::kBFloat16 && t.dim() == 1 && t.numel() > 0 && t.is_contiguous(),
              "argmax: a non-empty 1-D bf16 tensor");
  const auto* v = reinterpret_cast<const uint16_t*>(t.data_ptr<bf16>());
  const int64_t n = t.numel();
  int16_t mx = INT16_MIN;
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    mx = std::max(mx, order_key(v[i]));
    nan |= is_nan(v[i]);
  }
  auto hit = [&](int64_t i) { return nan ? is_nan(v[i]) : static_cast<int>(order_key(v[i]) == mx); };
  constexpr int64_t B = 64;  // a block tested whole, without branches, before it is searched
  for (int64_t i0 = 0; i0 < n; i0 += B) {
    const int64_t i1 = std::min(n, i0 + B);
    int any = 0;
    for (int64_t i = i0; i < i1; ++i) any |= hit(i);
    if (any)
      for (int64_t i = i0; i < i1; ++i)
        if (hit(i)) return i;
  }
  return 0;
}

}  // namespace

void lowbit_register_decode(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Proj>(m, "Proj").def_property_readonly("kernel", &Proj::kernel);
  py::class_<Norm>(m, "Norm").def(py::init([](c10::optional<torch::Tensor> w, double eps) {
    Norm n;
    if (w) {
      TORCH_CHECK(w->dtype() == torch::kBFloat16, "norm weight: bf16");
      n.weight = w->contiguous();
    }
    n.eps = eps;
    return n;
  }));
  m.def("argmax", &argmax, "the first index of the largest value of a 1-D bf16 tensor (NaN largest), as torch.argmax");
  m.def("proj_int4", &make_int4, "an int4 projection (lowbit layout) for the decode step");
  m.def("proj_int8", &make_int8, "an int8 per-channel projection for the decode step");
  m.def("proj_dense", &make_dense, "a dense bf16 projection for the decode step");
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("set_head", &DecodeStep::set_head)
      .def("run", &DecodeStep::run, py::call_guard<py::gil_scoped_release>())
      .def_readwrite("linear_seconds", &DecodeStep::linear_seconds)
      .def_readwrite("timed", &DecodeStep::timed);
}
