"""Number grids and their encode/decode.

Every format maps *already scaled* values (x / scale) onto unsigned storage codes
(uint8, one code per element before packing) and back. Integer grids are exact
ranges; floating-point grids are small value tables (FP8 uses torch's own casts,
which round to nearest even and are the same numerics a kernel has).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.errors import UserError

# The 16 NormalFloat levels of QLoRA (quantiles of N(0,1) rescaled to [-1, 1]),
# as bitsandbytes stores them.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# llama.cpp's IQ4_NL / IQ4_XS levels (a non-uniform, slightly asymmetric int8 grid),
# the values ggml's kvalues_iq4nl table gives them.
IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# FP4 E2M1 magnitudes for codes 0..7; bit 3 is the sign (OCP MX spec).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class NumberFormat:
    """One grid. `kind` is 'int' (uniform integers) or 'float' (a value table)."""

    name: str
    bits: int
    kind: str
    # For float grids: the largest finite magnitude and, for MX, the exponent of
    # that magnitude's leading power of two (emax_elem in the OCP MX spec).
    max_value: float = 0.0
    emax: int = 0

    # ---- integer grids -------------------------------------------------
    def int_range(self, symmetric: bool) -> tuple[int, int]:
        """(qmin, qmax): signed two's-complement range, or unsigned for affine."""
        if symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    # ---- encode / decode -----------------------------------------------
    def encode(self, y: torch.Tensor, symmetric: bool = True, zero_point: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled values -> uint8 storage codes (saturating)."""
        if self.kind == "int":
            qmin, qmax = self.int_range(symmetric)
            q = torch.round(y)
            if zero_point is not None:
                q = q + zero_point
            q = q.clamp(qmin, qmax)
            if symmetric:
                q = q - qmin  # store signed codes with an offset so they fit unsigned bits
            return q.to(torch.uint8)
        return _FLOAT_ENCODERS[self.name](y)

    def decode(self, codes: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
        """uint8 storage codes -> grid values as float32 (before scale / zero point)."""
        if self.kind == "int":
            q = codes.to(torch.float32)
            if symmetric:
                q = q - (1 << (self.bits - 1))
            return q
        return value_table(self.name)[codes.long()]

    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """Scaled values -> the grid values they encode to (encode then decode, for float grids)."""
        if self.name in _FP8:
            dtype, top = _FP8[self.name]
            return y.clamp(-top, top).to(dtype).to(torch.float32)
        lut = _integer_lut(self.name)
        if lut is None:
            return self.decode(self.encode(y))
        lo, codes = lut
        values = value_table(self.name)[codes.long()]
        return values[torch.ceil(2 * y.to(torch.float32).nan_to_num(0.0).clamp(values[0].item(), values[-1].item())).long() - lo]

    def grid_range(self, symmetric: bool = True) -> tuple[float, float]:
        """(most negative, most positive) grid value: -8, 7 for int4; -127, 113 for IQ4_NL."""
        return _grid_range(self, symmetric)

    def grid(self, symmetric: bool = True) -> torch.Tensor:
        """Every representable (finite) grid value, sorted."""
        if self.kind == "int":
            qmin, qmax = self.int_range(symmetric)
            return torch.arange(qmin, qmax + 1, dtype=torch.float32)
        t = value_table(self.name)
        return torch.unique(t[torch.isfinite(t)])


@functools.cache
def _grid_range(fmt: NumberFormat, symmetric: bool) -> tuple[float, float]:
    g = fmt.grid(symmetric)
    return float(g[0]), float(g[-1])


def _fp8_encoder(dtype: torch.dtype, max_value: float):
    def encode(y: torch.Tensor) -> torch.Tensor:
        # torch's cast does not saturate (out of range -> NaN/Inf), so clamp first.
        return y.clamp(-max_value, max_value).to(dtype).view(torch.uint8)

    return encode


def _table_encoder(name: str):
    def encode(y: torch.Tensor) -> torch.Tensor:
        levels, codes = _sorted_levels(name)
        lut = _integer_lut(name)
        if lut is not None:  # integer levels: every midpoint is a multiple of 1/2, so a 1/2-wide LUT is exact
            lo, table = lut
            y = y.to(torch.float32).nan_to_num(0.0).clamp(levels[0].item(), levels[-1].item())
            return table[torch.ceil(2 * y).long() - lo]
        mids = (levels[1:] + levels[:-1]) / 2
        idx = torch.bucketize(y.to(torch.float32).contiguous(), mids)
        return codes[idx]

    return encode


@functools.cache
def _integer_lut(name: str):
    """(offset, codes) with codes[ceil(2y) - offset] the nearest level to y, ties to the lower
    one as bucketize gives them; None unless the levels are integers (IQ4_NL)."""
    levels, codes = _sorted_levels(name)
    if not torch.equal(levels, levels.round()):
        return None
    lo, hi = int(levels[0]) * 2, int(levels[-1]) * 2
    tops = torch.arange(lo, hi + 1, dtype=torch.float32) / 2  # each half-wide bin's inclusive top
    return lo, codes[torch.bucketize(tops, (levels[1:] + levels[:-1]) / 2)]


_TABLE_CACHE: dict[str, torch.Tensor] = {}


def value_table(name: str) -> torch.Tensor:
    """code -> value lookup table (float32, indexed by the uint8 code)."""
    if name not in _TABLE_CACHE:
        if name == "fp8_e4m3":
            t = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
        elif name == "fp8_e5m2":
            t = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2).float()
        elif name == "fp4_e2m1":
            mag = torch.tensor(E2M1_MAGNITUDES)
            t = torch.cat([mag, -mag])
        elif name == "nf4":
            t = torch.tensor(NF4_LEVELS)
        elif name == "iq4nl":
            t = torch.tensor(IQ4NL_LEVELS, dtype=torch.float32)
        else:
            raise KeyError(name)
        _TABLE_CACHE[name] = t
    return _TABLE_CACHE[name]


@functools.cache
def _sorted_levels(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = value_table(name)
    finite = torch.isfinite(t)
    values, codes = t[finite], torch.arange(t.numel())[finite]
    # -0.0 and +0.0 collapse to one level: keep the first (positive) code.
    order = torch.argsort(values, stable=True)
    values, codes = values[order], codes[order]
    keep = torch.ones_like(values, dtype=torch.bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep], codes[keep].to(torch.uint8)


_FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}
_FLOAT_ENCODERS = {
    "fp8_e4m3": _fp8_encoder(*_FP8["fp8_e4m3"]),
    "fp8_e5m2": _fp8_encoder(*_FP8["fp8_e5m2"]),
    "fp4_e2m1": _table_encoder("fp4_e2m1"),
    "nf4": _table_encoder("nf4"),
    "iq4nl": _table_encoder("iq4nl"),
}

FORMATS: dict[str, NumberFormat] = {
    **{f"int{b}": NumberFormat(f"int{b}", b, "int") for b in range(2, 9)},
    "fp8_e4m3": NumberFormat("fp8_e4m3", 8, "float", 448.0, 8),
    "fp8_e5m2": NumberFormat("fp8_e5m2", 8, "float", 57344.0, 15),
    "fp4_e2m1": NumberFormat("fp4_e2m1", 4, "float", 6.0, 2),
    "nf4": NumberFormat("nf4", 4, "float", 1.0, 0),
    "iq4nl": NumberFormat("iq4nl", 4, "float", 127.0, 0),
}


def get_format(name: str) -> NumberFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown number format {name!r}; known: {', '.join(FORMATS)}") from None
