"""Scale and zero-point selection.

Tensors are viewed as [rows, groups, group_len] (NaN-padded when the last group is
short, so a ragged last group is handled exactly: NaNs never enter a min, max,
percentile or error sum). Scales come out as [rows, groups] float32 already rounded
to the dtype they will be stored in, so what is searched is what is stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowbit.core.formats import NumberFormat
from lowbit.core.scheme import Scheme

# MSE clipping search: shrink factors 1.00, 0.99, ..., 0.21 of the absmax/minmax range.
MSE_GRID = tuple(1.0 - 0.01 * i for i in range(80))


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """Reduction runs along the last dim; everything before it is rows."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def num_groups(scheme: Scheme, rows: int, cols: int) -> tuple[int, int]:
    """(scale rows, scale columns) for a [rows, cols] tensor."""
    if scheme.granularity == "tensor":
        return 1, 1
    if scheme.granularity in ("channel", "token"):
        return rows, 1
    return rows, math.ceil(cols / scheme.group_size)


def group_view(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """[rows, cols] -> [scale rows, groups, group_len], NaN-padded at the end of each row."""
    rows, cols = x.shape
    if scheme.granularity == "tensor":
        return x.reshape(1, 1, rows * cols)
    if scheme.granularity in ("channel", "token"):
        return x.reshape(rows, 1, cols)
    g = scheme.group_size
    ng = math.ceil(cols / g)
    pad = ng * g - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=float("nan"))
    return x.reshape(rows, ng, g)


def ungroup(xg: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of group_view."""
    return xg.reshape(rows, -1)[:, :cols] if xg.shape[0] == rows else xg.reshape(rows, cols)


def round_scale(scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Round scales to what is stored: fp16/bf16/fp32, or a power of two (E8M0)."""
    if scheme.scale_dtype == "e8m0":
        return torch.exp2(e8m0_exponent(scale, scheme.number_format).float() - 127)
    dt = scheme.scale_storage_dtype
    tiny = torch.finfo(dt).tiny
    # a negative scale flips the grid (the signed-range search below uses it, as llama.cpp does)
    sign = torch.where(scale < 0, -1.0, 1.0)
    return sign * (scale.abs().clamp(min=tiny).to(dt).to(torch.float32))


def e8m0_exponent(amax_scale: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """OCP MX shared scale: 2^(floor(log2(amax)) - emax_elem), stored as a biased uint8.

    `amax_scale` is amax / max_value; we recover amax to follow the spec exactly.
    """
    amax = amax_scale * fmt.max_value
    e = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - fmt.emax
    return (e.clamp(-127, 127) + 127).to(torch.uint8)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme):
    """Scale (and zero point for affine) covering [lo, hi] exactly."""
    fmt = scheme.number_format
    if scheme.float_zero and scheme.super_block:  # K-quants store the zero as -dmin*m, m >= 0
        lo = lo.clamp(max=0)
    if scheme.float_zero:  # w = scale * code + zero: the range need not contain 0
        qmax = (1 << fmt.bits) - 1
        scale = (hi - lo) / qmax
        scale = round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), scheme)
        return scale, lo.to(scheme.scale_storage_dtype).to(torch.float32)
    if fmt.kind == "int" and not scheme.symmetric:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # keep 0 exactly representable
        qmax = (1 << fmt.bits) - 1
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = round_scale(scale, scheme)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        return scale, zero
    gmin, gmax = fmt.grid_range()
    if fmt.kind == "float" and gmin != -gmax:  # a lopsided table (IQ4_NL): the smallest scale that covers
        scale = torch.maximum(hi / gmax, lo / gmin)
        return round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), scheme), None
    amax = torch.maximum(lo.abs(), hi.abs())
    top = (1 << (fmt.bits - 1)) - 1 if fmt.kind == "int" else fmt.max_value
    scale = amax / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return round_scale(scale, scheme), None


def fake_quant_grouped(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Quantize-dequantize a grouped view with given per-group scales."""
    return fake_quant(xg, scale.unsqueeze(-1), zero.unsqueeze(-1) if zero is not None else None, scheme)


def fake_quant(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Quantize-dequantize with broadcastable scale / zero point. Integer grids take plain
    float math: the same numbers as encode then decode, without the uint8 round trip
    (the scale searches run this hundreds of times per tensor)."""
    fmt = scheme.number_format
    if fmt.kind != "int":  # symmetric value grids
        return fmt.nearest(x / s) * s
    qmin, qmax = fmt.int_range(scheme.symmetric)
    if z is None:
        return torch.clamp(torch.round(x / s), qmin, qmax) * s
    if scheme.float_zero:
        return torch.clamp(torch.round((x - z) / s), qmin, qmax) * s + z
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def encode_grouped(xg: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Grouped values -> uint8 codes, given broadcastable scale / zero point."""
    if scheme.float_zero:
        return scheme.number_format.encode((xg - z) / s, False, None)
    return scheme.number_format.encode(xg / s, scheme.symmetric, z)


def dequantize_grouped(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    q = scheme.number_format.decode(codes, scheme.symmetric)
    if scheme.float_zero:
        return q * s + z
    return (q - z) * s if z is not None else q * s


def group_range(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of a grouped view, ignoring the NaN padding."""
    return (torch.where(torch.isnan(xg), torch.inf, xg).amin(-1),
            torch.where(torch.isnan(xg), -torch.inf, xg).amax(-1))


def choose_qparams(x: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None = None,
                   hessian: torch.Tensor | None = None):
    """Scales [R, G] (float32, stored precision) and zero points (float32 integers) or None.

    `importance` [cols] weights each column's squared error in the MSE search (GPTQ
    passes the Hessian diagonal: an input channel that carries more energy costs more
    output error per unit of weight error). `hessian` [cols, cols] (the inputs' X^T X / n)
    makes the search minimise each group's *output* error e H e^T instead (AWQ's clipping
    search): it runs whatever the scheme's scale method, since asking for it is asking
    for a search.
    """
    x = as_2d(x.detach()).to(torch.float32)  # a Parameter would record every candidate for autograd
    scale, zero = _group_qparams(x, scheme, importance, hessian)
    if scheme.super_block:
        weight = importance if importance is not None or hessian is None else torch.diag(hessian.float())
        weight = None if weight is None else group_view(weight.to(torch.float32).reshape(1, -1), scheme)
        scale, zero = superblock_qparams(group_view(x, scheme), scale, zero, scheme, weight)
    return scale, zero


def _group_qparams(x, scheme, importance, hessian):
    xg = group_view(x, scheme)
    if hessian is not None:
        lo, hi = group_range(xg)
        return output_error_search(xg, lo, hi, scheme, hessian)
    if scheme.scale_method == "percentile":
        q = scheme.percentile / 100.0
        if scheme.symmetric:
            hi = torch.nanquantile(xg.abs(), q, dim=-1)
            lo = -hi
        else:
            hi = torch.nanquantile(xg, q, dim=-1)
            lo = torch.nanquantile(xg, 1.0 - q, dim=-1)
        return qparams_from_range(lo, hi, scheme)
    lo, hi = group_range(xg)
    if scheme.scale_method == "absmax":
        return qparams_from_range(lo, hi, scheme)
    w = None
    if importance is not None:
        if scheme.granularity == "tensor":
            raise ValueError("importance weighting needs per-channel or per-group parameters")
        w = group_view(importance.to(torch.float32).reshape(1, -1), scheme)
    return mse_search(xg, lo, hi, scheme, w)


def signed_range(scheme: Scheme) -> bool:
    """A symmetric grid whose ends differ (int4's -8..7, IQ4_NL's -127..113): a scale of either
    sign is worth trying, since the value of largest magnitude may go to either end."""
    gmin, gmax = scheme.number_format.grid_range()
    return scheme.symmetric and not scheme.is_mx and gmin != -gmax


def _candidates(lo: torch.Tensor, hi: torch.Tensor, grid, scheme: Scheme):
    """(scales [C, R, G], zero points [C, R, G] or None) for the clip ranges p*[lo, hi], p in
    `grid`: the range itself, and on a signed-range grid the whole grid either way round (there
    the range itself, absmax / 7 on int4, is coarser than both and is tried at p = 1 only, so
    the search never does worse)."""
    ps = torch.tensor(grid, dtype=torch.float32).view(-1, *([1] * lo.dim()))
    if scheme.has_zero_point:
        return _cat_candidates(qparams_from_range(lo * ps, hi * ps, scheme), _nested_candidates(lo, hi, scheme))
    if not signed_range(scheme):
        return qparams_from_range(lo * ps, hi * ps, scheme)
    gmin, gmax = scheme.number_format.grid_range()
    pos = torch.maximum(hi / gmax, lo / gmin) * ps  # the whole grid, either way round
    neg = torch.maximum(-lo / gmax, hi / -gmin) * ps
    s = torch.cat([pos, -neg])
    s = round_scale(torch.where(s != 0, s, torch.ones_like(s)), scheme)
    return torch.cat([qparams_from_range(lo, hi, scheme)[0].unsqueeze(0), s]), None


# An affine grid of 2^b - 1 steps also tries the group's range over this many steps fewer, from
# its minimum: weights that already lie on a coarser grid (a Q4_1 or QAT checkpoint: 15 steps)
# then land exactly on a finer one (31 - 1 = 2 x 15 for the 5-bit types). Shrinking the range,
# as the clip grid does, never finds that scale; llama.cpp's K-quant search spans the same +-1 step.
NESTED_STEPS = (1, 2)


def _nested_candidates(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme):
    qmax = (1 << scheme.number_format.bits) - 1
    stretch = torch.tensor([qmax / (qmax - j) for j in NESTED_STEPS if qmax > j], dtype=torch.float32)
    stretch = stretch.view(-1, *([1] * lo.dim()))
    return qparams_from_range(lo.expand_as(hi * stretch), lo + (hi - lo) * stretch, scheme)


def _cat_candidates(*candidates):
    return torch.cat([s for s, _ in candidates]), torch.cat([z for _, z in candidates])


# the candidates of a clip search are scored this many elements at a time (a tensor times its
# candidates at once would be ~600 MB for a 576 x 1536 weight; one at a time is Python-bound for
# GPTQ's [rows, 32] groups)
SEARCH_ELEMENTS = 1 << 23


def clip_search(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme, grid, group_error):
    """Per group, the clip range p*[lo, hi] (p in `grid`, and on signed-range grids both
    orientations of the whole grid) whose error group_error(w_hat - w) -> [..., R, G] is least
    (the first such candidate on ties). The grids start at p = 1 (absmax/minmax), so the result
    is never worse than that."""
    scales, zeros = _candidates(lo, hi, grid, scheme)
    best_err = torch.full(lo.shape, torch.inf)
    best = torch.zeros(lo.shape, dtype=torch.long)
    step = max(1, SEARCH_ELEMENTS // max(xg.numel(), 1))
    for a in range(0, scales.shape[0], step):
        s = scales[a:a + step].unsqueeze(-1)
        z = None if zeros is None else zeros[a:a + step].unsqueeze(-1)
        err = group_error(fake_quant(xg, s, z, scheme) - xg)
        e, i = err.min(0)  # first minimum within the chunk
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = torch.where(better, i + a, best)
    pick = best.unsqueeze(0)
    return (scales.gather(0, pick)[0], None if zeros is None else zeros.gather(0, pick)[0], best_err)


def refit(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, err: torch.Tensor, scheme: Scheme,
          weight: torch.Tensor | None, rounds: int = 2):
    """Least-squares refit of each group's scale (and float zero) to its chosen codes, then
    re-round; kept per group where the weighted error drops. Symmetric and float-zero grids."""
    if scheme.has_zero_point and not scheme.float_zero or scheme.is_mx:
        return scale, zero
    w = torch.ones_like(xg) if weight is None else weight.expand_as(xg)
    w = torch.where(torch.isnan(xg), 0.0, w)
    x = xg.nan_to_num(0.0)
    for _ in range(rounds):
        s, z = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        q = scheme.number_format.decode(encode_grouped(xg, s, z, scheme), scheme.symmetric)
        if zero is None:  # min sum w (x - s q)^2
            new_s, new_z = (w * x * q).sum(-1) / (w * q * q).sum(-1).clamp(min=1e-30), None
        else:  # min sum w (x - s q - z)^2: 2x2 normal equations
            sw, sq, sx = w.sum(-1), (w * q).sum(-1), (w * x).sum(-1)
            sqq, sqx = (w * q * q).sum(-1), (w * q * x).sum(-1)
            det = sw * sqq - sq * sq
            ok = det.abs() > 1e-30
            new_s = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, 1.0), scale)
            new_z = torch.where(ok, (sx - new_s * sq) / sw.clamp(min=1e-30), zero)
            if scheme.super_block:
                new_z = new_z.clamp(max=0)
            new_s = torch.where(new_s > 0, new_s, scale)
            new_z = new_z.to(scheme.scale_storage_dtype).to(torch.float32)
        new_s = round_scale(torch.where(new_s != 0, new_s, scale), scheme)
        e = ((fake_quant_grouped(xg, new_s, new_z, scheme) - xg).pow(2) * w).nansum(-1)
        better = e < err
        err = torch.where(better, e, err)
        scale = torch.where(better, new_s, scale)
        if zero is not None:
            zero = torch.where(better, new_z, zero)
    return scale, zero


def mse_search(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme,
               importance: torch.Tensor | None = None):
    """Per group, the clip range p*[lo, hi] (p in MSE_GRID) with the least (weighted) squared
    error, then refit by least squares to the codes it chose."""
    scale, zero, err = clip_search(xg, lo, hi, scheme, MSE_GRID,
                                   lambda e: (e.pow(2) if importance is None else e.pow(2) * importance).nansum(-1))
    return refit(xg, scale, zero, err, scheme, importance)


def superblock_qparams(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme,
                       weight: torch.Tensor | None = None):
    """K-quant two-level scales: each super-block's group scales become integers of
    `scale_bits` times one fp16 factor (signed for symmetric grids; unsigned scales and
    mins -dmin*m for float-zero ones). Returns the exact fp32 products.

    The factors start where the group scales themselves are nearest. Then, judged by the
    (weighted) error of the values `xg` re-rounded on the grid they give: each factor (the
    scales', then the mins') is searched again, each group taking whichever of its two
    neighbouring integers serves its values better, and finally each group tries its scale
    and min integers one step either way. A 6-bit integer is a coarse scale: rounded to
    nearest, it moves a group that held its values exactly (a Q4_1 checkpoint on a 5-bit
    grid) as far as one that did not."""
    rows, groups = scale.shape
    k = scheme.super_block // scheme.group_size
    pad = -groups % k

    def blocks(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(v, (0, pad)).reshape(rows, -1, k)

    xs = torch.nn.functional.pad(xg, (0, 0, 0, pad), value=torch.nan).reshape(rows, -1, k, xg.shape[-1])
    w = torch.ones_like(xs) if weight is None else torch.nn.functional.pad(
        weight.expand_as(xg), (0, 0, 0, pad)).reshape(xs.shape)
    w = torch.where(torch.isnan(xs), 0.0, w)
    # (factor [R, S, 1], integers [R, S, k]) of the scales, and of the mins -zero
    parts = {"scale": _ScaleIntegers(blocks(scale), scheme.scale_bits, scheme.symmetric, 1).fit()}
    if zero is not None:
        parts["min"] = _ScaleIntegers(blocks(-zero), scheme.scale_bits, False, 0).fit()

    def error(p: dict) -> torch.Tensor:  # per group [R, S, k]
        s = p["scale"].products.unsqueeze(-1)
        z = None if "min" not in p else -p["min"].products.unsqueeze(-1)
        return (w * (fake_quant(xs, s, z, scheme) - xs).pow(2)).nansum(-1)

    def keep(better: torch.Tensor, cand: dict, err_new: torch.Tensor):
        for key in parts:
            parts[key] = parts[key].where(better, cand[key])
        return torch.where(better, err_new, err)

    err = error(parts)
    for key in parts:  # a second round of scales, or all 13 steps, lowered the error < 1% for 2x the time
        vmax = parts[key].v.abs().amax(-1, keepdim=True)
        for steps in SUPER_STEPS[::2]:
            d = _fp16(vmax / (parts[key].top + steps))
            lo, hi = (parts[key].refactor(d, rnd) for rnd in (torch.floor, torch.ceil))
            e_lo, e_hi = error({**parts, key: lo}), error({**parts, key: hi})
            up = e_hi < e_lo  # per group: the better neighbour
            e = torch.where(up, e_hi, e_lo)
            better = (e.sum(-1, keepdim=True) < err.sum(-1, keepdim=True)).expand_as(e)  # per super-block
            err = keep(better, {**parts, key: lo.where(up, hi)}, e)
    steps = [(a, b) for a in (-1, 0, 1) for b in ((-1, 0, 1) if zero is not None else (0,)) if a or b]
    for a, b in steps:
        cand = {"scale": parts["scale"].step(a)}
        if zero is not None:
            cand["min"] = parts["min"].step(b)
        ok = cand["scale"].valid() & (cand["min"].valid() if zero is not None else True)
        e = torch.where(ok, error(cand), torch.inf)
        err = keep(e < err, cand, e)
    s = parts["scale"].products.reshape(rows, -1)[:, :groups]
    return s, None if zero is None else -parts["min"].products.reshape(rows, -1)[:, :groups]


@dataclass(frozen=True)
class _ScaleIntegers:
    """A super-block's sub-block scales (or mins) `v` [R, S, k] as integers `n` [R, S, k] of
    `bits` times one fp16 factor `d` [R, S, 1]."""
    v: torch.Tensor
    bits: int
    signed: bool
    floor: int  # 1 for scales: a scale never rounds to zero (its group would decode to a constant)
    d: torch.Tensor | None = None
    n: torch.Tensor | None = None

    @property
    def top(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def bottom(self) -> int:
        return -self.top - 1 if self.signed else 0

    @property
    def products(self) -> torch.Tensor:
        return self.d * self.n

    def refactor(self, d: torch.Tensor, rnd=torch.round) -> _ScaleIntegers:
        n = rnd(self.v / d).clamp(self.bottom, self.top)
        if self.floor:
            n = torch.where(n.abs() < self.floor, torch.where(self.v < 0, -1.0, 1.0) * self.floor, n)
        return replace(self, d=d, n=n)

    def step(self, a: int) -> _ScaleIntegers:
        return replace(self, n=self.n + a)

    def valid(self) -> torch.Tensor:
        return (self.n >= self.bottom) & (self.n <= self.top) & (self.n.abs() >= self.floor)

    def where(self, cond: torch.Tensor, other: _ScaleIntegers) -> _ScaleIntegers:
        """`other` where cond [R, S, k]; a condition that differs within a super-block only ever
        picks between integers of the same factor."""
        return replace(self, d=torch.where(cond[..., :1], other.d, self.d), n=torch.where(cond, other.n, self.n))

    def fit(self) -> _ScaleIntegers:
        """Per super-block, the factor whose products d * round(v / d) are nearest v: the
        largest value on the top integer, or a few steps past it, each then refit by least
        squares to its integers."""
        vmax = self.v.abs().amax(-1, keepdim=True)
        best, best_err = None, None
        for steps in SUPER_STEPS:
            c = self.refactor(_fp16(vmax / (self.top + steps)))
            c = c.refactor(_fp16((self.v * c.n).sum(-1, keepdim=True) / (c.n * c.n).sum(-1, keepdim=True).clamp(min=1e-30)))
            err = (c.products - self.v).pow(2).sum(-1, keepdim=True).expand_as(c.n)
            best, best_err = (c, err) if best is None else (best.where(err < best_err, c), torch.minimum(err, best_err))
        return best


# the super-block factors tried: the largest sub-block scale on the top integer and on a few
# fractional steps either side (llama.cpp's K-quants search the same neighbourhood)
SUPER_STEPS = tuple(0.25 * i for i in range(-4, 9))


def _fp16(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d > 0, d, torch.ones_like(d)).clamp(2.0**-24, 65504).to(torch.float16).to(torch.float32)


# AWQ's clipping grid: 20 shrink factors from 1.0 down to 0.525.
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(20))


def hessian_blocks(hessian: torch.Tensor, scheme: Scheme, cols: int) -> torch.Tensor:
    """[groups, g, g] diagonal blocks of H, one per group of columns (zero-padded for a short last group)."""
    if scheme.granularity in ("channel", "token"):
        return hessian.to(torch.float32).unsqueeze(0)
    if scheme.granularity == "tensor":
        raise ValueError("an output-error clipping search needs per-channel or per-group parameters")
    g = scheme.group_size
    ng = math.ceil(cols / g)
    h = torch.nn.functional.pad(hessian.to(torch.float32), (0, ng * g - cols, 0, ng * g - cols))
    idx = torch.arange(ng)
    return h.reshape(ng, g, ng, g)[idx, :, idx, :]


def output_error_search(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme,
                        hessian: torch.Tensor):
    """Per group, the clip p*[lo, hi] (p in CLIP_GRID) with the least e H_gg e^T, where e is
    the group's weight error and H_gg its block of the input Hessian: the squared output
    error that group adds on the calibration inputs."""
    hb = hessian_blocks(hessian, scheme, hessian.shape[0])
    scale, zero, _ = clip_search(xg, lo, hi, scheme, CLIP_GRID,
                                 lambda e: torch.einsum("...gi,gij,...gj->...g", e.nan_to_num(0.0), hb, e.nan_to_num(0.0)))
    return scale, zero


def quantize_activations(x: torch.Tensor, scheme: Scheme, scale: torch.Tensor | None = None) -> torch.Tensor:
    """What an A8/A4 kernel multiplies: `x` rounded onto the activation grid and decoded
    back, in x's dtype. Dynamic schemes take one scale per token (row) from its absmax;
    a static scheme uses the calibrated `scale` (per tensor)."""
    shape, dtype = x.shape, x.dtype
    x2 = as_2d(x).to(torch.float32)
    if scale is None:
        if not scheme.dynamic:
            raise ValueError(f"static activation scheme {scheme.name} needs a calibrated scale")
        return fake_quantize(x2, scheme).reshape(shape).to(dtype)
    s = scale.to(torch.float32).reshape(1, 1)
    xg = x2.reshape(1, 1, -1)
    return fake_quant_grouped(xg, s, None, scheme).reshape(shape).to(dtype)


def fake_quantize(x: torch.Tensor, scheme: Scheme, clip: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize `x` (reduction along its last dim) in float32: what the
    stored codes would decode to. `clip` < 1 shrinks every group's absmax/minmax range
    (the clipping study); the scheme's own scale method applies when clip is 1."""
    shape = x.shape
    x2 = as_2d(x.detach()).to(torch.float32)
    xg = group_view(x2, scheme)
    if clip == 1.0:
        scale, zero = choose_qparams(x2, scheme)
    else:
        lo, hi = group_range(xg)
        scale, zero = qparams_from_range(lo * clip, hi * clip, scheme)
    return ungroup(fake_quant_grouped(xg, scale, zero, scheme), *x2.shape).reshape(shape)
