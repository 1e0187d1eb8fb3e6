"""PyTorch's own packed CPU kernels, with lossless conversions into their layouts.

int4pack (`_weight_int4pack_mm_for_cpu`) computes w = (q4 - 8) * scale + zero per
group of G in {32, 64, 128, 256} dividing in_features. Any 2-, 3- or 4-bit integer
scheme maps onto it exactly: a b-bit code fits a 4-bit container, a symmetric code
is re-centred on 8, and an affine zero point z becomes zero = scale * (8 - z) (a
float zero point m, as in GGUF Q4_1, becomes m + 8 * scale). A
group size the kernel cannot take (per-channel, or 128 on 576 columns, whose last
group is short) becomes the largest supported size dividing both, with scales
repeated: the same numbers. What is *not* exact is the dtype the kernel computes
in: scales and zeros are cast to the activation dtype (bf16 rounds them to 8
significant bits), as any bf16 kernel would.

int8pack (`_weight_int8pack_mm`) takes symmetric per-channel int8 weights as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.core.tensor import QuantizedTensor

INT4_GROUPS = (256, 128, 64, 32)


@dataclass(frozen=True)
class Kernel:
    name: str
    supports: Callable[[QuantizedTensor, torch.dtype, torch.device], bool]
    prepare: Callable[[QuantizedTensor, torch.dtype], dict]
    run: Callable[[torch.Tensor, dict], torch.Tensor]


def _int4_group(qt: QuantizedTensor) -> int | None:
    """A kernel group size that tiles the scheme's groups exactly, or None."""
    s = qt.scheme
    k = qt.shape[-1]
    g = s.group_size if s.granularity == "group" else k
    for cand in INT4_GROUPS:
        # every scheme group boundary must be a kernel group boundary
        if k % cand == 0 and (g % cand == 0 or g >= k):
            return cand
    return None


def _int4_supports(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> bool:
    s = qt.scheme
    return (device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and s.number_format.kind == "int" and s.bits <= 4 and s.granularity in ("group", "channel")
            and len(qt.shape) == 2 and qt.shape[0] % 16 == 0 and _int4_group(qt) is not None
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def _int4_prepare(qt: QuantizedTensor, dtype: torch.dtype) -> dict:
    n, k = qt.shape
    s = qt.scheme
    kg = _int4_group(qt)
    codes = qt.unpacked_codes().to(torch.int32)
    if s.symmetric:
        codes = codes - (1 << (s.bits - 1)) + 8  # signed value v stored as v + 8
    scale = qt.scales()  # [n, groups]
    z = qt.zero_points()
    if z is None:
        zero = torch.zeros_like(scale)
    elif s.float_zero:  # w = scale * q + z  ==  (q - 8) * scale + (z + 8 * scale)
        zero = z + 8 * scale
    else:
        zero = scale * (8 - z)
    g = s.group_size if s.granularity == "group" else k
    # expand scheme groups onto kernel groups: kernel group j lies in scheme group (j*kg)//g
    idx = (torch.arange(k // kg) * kg) // g
    scale, zero = scale[:, idx], zero[:, idx]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # [k/kg, n, 2]
    return {"packed": packed, "group": kg, "scale_zero": sz, "n": n}


def _int4_run(x: torch.Tensor, st: dict) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, st["packed"], st["group"], st["scale_zero"])
    return y.reshape(*x.shape[:-1], st["n"])


def _int8_supports(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> bool:
    s = qt.scheme
    return (s.format == "int8" and s.symmetric and s.granularity == "channel" and len(qt.shape) == 2
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def int8_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Symmetric int8 codes (stored as v + 128) as signed int8 [n, k]."""
    return (qt.unpacked_codes().to(torch.int16) - 128).to(torch.int8).contiguous()


def _int8_prepare(qt: QuantizedTensor, dtype: torch.dtype) -> dict:
    return {"w": int8_codes(qt), "scale": qt.scales()[:, 0].to(dtype).contiguous(), "n": qt.shape[0]}


def _int8_run(x: torch.Tensor, st: dict) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return torch._weight_int8pack_mm(x2, st["w"], st["scale"]).reshape(*x.shape[:-1], st["n"])


TORCH_KERNELS = (
    Kernel("int4pack", _int4_supports, _int4_prepare, _int4_run),
    Kernel("int8pack", _int8_supports, _int8_prepare, _int8_run),
)

