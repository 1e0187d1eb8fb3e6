// One decoded token through every decoder layer of a Llama-family model, in C++.
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
// product and the residual adds each rounded to bf16. Only fp32 summation order differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "common.h"
#include "lowbit_cpu.h"

namespace {

using bf16 = at::BFloat16;
using lowbit::detail::TILE;

enum ProjKind { PROJ_INT4 = 0, PROJ_INT8 = 1, PROJ_DENSE = 2 };

// One projection as the step runs it: lowbit's int4 or int8 kernel, or a dense bf16 weight.
struct Proj {
  int64_t kind = PROJ_DENSE, n = 0, k = 0, group = 0, zero_mode = 0;
  double zconst = 0;
  bool act_int8 = false;  // int4/int8: activations rounded to int8 blocks (lowbit_cpu.h: *_gemm_a8)
  torch::Tensor codes, scale, zero, weight, bias;  // int4: codes/scale/zero; int8: weight/scale; dense: weight

  // Rows [r0, r1) of y = W x (r0 a multiple of the int4 tile; r1 too, or n): the kernels on the
  // rows' slice of W, called from inside a parallel region, so they run on the calling thread.
  // xf: x as fp32, for the int8 kernel on bf16 activations. No bias (run_all adds it).
  void run_rows(const bf16* x, bf16* y, const float* xf, int64_t r0, int64_t r1) const {
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
      lowbit::int8_gemm(xf, 1, k, weight.data_ptr<int8_t>() + r0 * k, scale.data_ptr<float>() + r0, r1 - r0, y + r0);
    } else {
      auto xt = torch::from_blob(const_cast<bf16*>(x), {1, k}, torch::kBFloat16);
      auto out = torch::from_blob(y + r0, {1, r1 - r0}, torch::kBFloat16);
      at::matmul_out(out, xt, weight.narrow(0, r0, r1 - r0).t());
    }
  }
  void add_bias(bf16* y) const {
    if (!bias.defined()) return;
    const bf16* b = bias.data_ptr<bf16>();
    for (int64_t i = 0; i < n; ++i) y[i] = bf16(static_cast<float>(y[i]) + static_cast<float>(b[i]));
  }
};

// Projections of one input (q/k/v; gate/up; or one alone) as one parallel region over their
// rows laid end to end, in tiles of 4 rows: one fork and join where there were three, each a few
// microseconds beside GEMVs of 10-30 us at the embedded model's size.
void run_all(std::initializer_list<std::pair<const Proj*, bf16*>> projs, const bf16* x, float* xf) {
  int64_t tiles = 0, k = 0;
  bool fp32_x = false;
  for (const auto& [p, y] : projs) {
    tiles += (p->n + TILE - 1) / TILE;
    k = p->k;
    fp32_x |= p->kind == PROJ_INT8 && !p->act_int8;
  }
  if (fp32_x)
    for (int64_t i = 0; i < k; ++i) xf[i] = static_cast<float>(x[i]);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    int64_t first = 0;  // the first tile of the current projection
    for (const auto& [p, y] : projs) {
      const int64_t n_tiles = (p->n + TILE - 1) / TILE;
      const int64_t a = std::max(t0, first) - first, b = std::min(t1, first + n_tiles) - first;
      if (a < b) p->run_rows(x, y, xf, TILE * a, std::min(TILE * b, p->n));
      first += n_tiles;
    }
  });
  for (const auto& [p, y] : projs) p->add_bias(y);
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

Proj make_int8(torch::Tensor weight, torch::Tensor scale, c10::optional<torch::Tensor> bias, bool act_int8) {
  TORCH_CHECK(weight.dtype() == torch::kInt8 && weight.is_contiguous() && scale.dtype() == torch::kFloat, "int8 weight");
  lowbit::check_act_int8(act_int8);
  Proj p;
  p.kind = PROJ_INT8, p.weight = weight, p.scale = scale, p.n = weight.size(0), p.k = weight.size(1);
  p.act_int8 = act_int8;
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
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<float>(x[i]) * static_cast<float>(x[i]);
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(nm.eps));
    for (int64_t i = 0; i < d; ++i)
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
// reassociating (one chain of d dependent adds made the scores ~8% of a 4-bit decode step)
inline float dot(const float* a, const float* b, int64_t d) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  float sum = 0.f;
  for (; i < d; ++i) sum += a[i] * b[i];
  for (int j = 0; j < 16; ++j) sum += part[j];
  return sum;
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

  // x: bf16 [hidden], the embedded token at position pos; returns the last layer's output.
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
    std::vector<float> xf(std::max(inter_, std::max(hidden_, qd))), qf(qd), kf(kvd), scores(n_heads_ * (pos + 1)), acc(qd);
    bf16* xs = out.data_ptr<bf16>();
    const float *qc = q_cos.data_ptr<float>() + pos * d_, *qs = q_sin.data_ptr<float>() + pos * d_;
    const float *kc = cos.data_ptr<float>() + pos * d_, *ks = sin.data_ptr<float>() + pos * d_;
    for (int64_t li = 0; li < L; ++li) {
      const Layer& l = layers_[li];
      float* kcache = k_cache.data_ptr<float>() + li * n_kv_ * cache_len * d_;
      float* vcache = v_cache.data_ptr<float>() + li * n_kv_ * cache_len * d_;
      rms_norm(xs, h, hidden_, 1, l.norm1);
      proj({{&l.q, q}, {&l.k, kk}, {&l.v, vv}}, h, xf.data());
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
          float sum = 0.f;
          for (int64_t p = 0; p <= pos; ++p) sum += (s[p] = std::exp(s[p] - mx));
          float* a = acc.data() + hq * d_;
          std::fill(a, a + d_, 0.f);
          for (int64_t p = 0; p <= pos; ++p) {
            const float pr = s[p] / sum;
            for (int64_t i = 0; i < d_; ++i) a[i] += pr * V[p * d_ + i];
          }
          for (int64_t i = 0; i < d_; ++i) att[hq * d_ + i] = bf16(a[i]);
        }
      });
      proj({{&l.o, o}}, att, xf.data());
      for (int64_t i = 0; i < hidden_; ++i) xs[i] = bf16(static_cast<float>(xs[i]) + static_cast<float>(o[i]));
      rms_norm(xs, h, hidden_, 1, l.norm2);
      proj({{&l.gate, gt}, {&l.up, up}}, h, xf.data());
      const int64_t ni = l.gate.n;
      for (int64_t i = 0; i < ni; ++i) {
        const float a = static_cast<float>(gt[i]);
        gt[i] = bf16(static_cast<float>(bf16(a / (1.f + std::exp(-a)))) * static_cast<float>(up[i]));
      }
      proj({{&l.down, o}}, gt, xf.data());
      for (int64_t i = 0; i < hidden_; ++i) xs[i] = bf16(static_cast<float>(xs[i]) + static_cast<float>(o[i]));
    }
    return out;
  }

  double linear_seconds = 0;  // time inside projections, accumulated while `timed`
  bool timed = false;

 private:
  void proj(std::initializer_list<std::pair<const Proj*, bf16*>> projs, const bf16* x, float* xf) {
    if (!timed) return run_all(projs, x, xf);
    const auto t0 = std::chrono::steady_clock::now();
    run_all(projs, x, xf);
    linear_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  bf16* buf16(int64_t n, int slot) {
    if (static_cast<int64_t>(bufs_[slot].size()) < n) bufs_[slot].resize(n);
    return bufs_[slot].data();
  }

  int64_t hidden_, n_heads_, n_kv_, d_, max_len_, inter_ = 0;
  std::vector<Layer> layers_;
  std::vector<bf16> bufs_[8];
};

}  // namespace

void lowbit_register_decode(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Proj>(m, "Proj");
  py::class_<Norm>(m, "Norm").def(py::init([](c10::optional<torch::Tensor> w, double eps) {
    Norm n;
    if (w) {
      TORCH_CHECK(w->dtype() == torch::kBFloat16, "norm weight: bf16");
      n.weight = w->contiguous();
    }
    n.eps = eps;
    return n;
  }));
  m.def("proj_int4", &make_int4, "an int4 projection (lowbit layout) for the decode step");
  m.def("proj_int8", &make_int8, "an int8 per-channel projection for the decode step");
  m.def("proj_dense", &make_dense, "a dense bf16 projection for the decode step");
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("run", &DecodeStep::run, py::call_guard<py::gil_scoped_release>())
      .def_readwrite("linear_seconds", &DecodeStep::linear_seconds)
      .def_readwrite("timed", &DecodeStep::timed);
}
