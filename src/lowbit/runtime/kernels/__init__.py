"""Fast paths for QuantLinear: each converts a QuantizedTensor once into what a
packed kernel reads, then multiplies without materialising the float weight.

Every kernel here is a dispatch choice held to the reference path
(dequantize-then-matmul) by tests; `select()` picks the first that supports the
weight, the activation dtype and the device: lowbit's own AVX-512 kernels (bf16
activations, where they compiled), then PyTorch's packed kernels.
"""
from __future__ import annotations

import torch

from lowbit.core.tensor import QuantizedTensor
from lowbit.runtime.kernels import native
from lowbit.runtime.kernels.cpu import TORCH_KERNELS, Kernel

KERNELS = (
    Kernel("lowbit-int4", native.int4_supports, native.int4_prepare, native.int4_run),
    Kernel("lowbit-int8", native.int8_supports, native.int8_prepare, native.int8_run),
) + TORCH_KERNELS


def select(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device,
           allowed: tuple[str, ...] | None = None) -> Kernel | None:
    for k in KERNELS:
        if (allowed is None or k.name in allowed) and k.supports(qt, dtype, device):
            return k
    return None


__all__ = ["KERNELS", "Kernel", "select"]
