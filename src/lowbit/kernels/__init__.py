"""Fast paths for QuantLinear: each converts a QuantizedTensor once into what a
packed kernel reads, then multiplies without materialising the float weight.

Every kernel here is a dispatch choice held to the reference path
(dequantize-then-matmul) by tests; `select()` picks the first that supports the
weight, the activation dtype and the device.
"""
from .cpu import KERNELS, Kernel, select

__all__ = ["KERNELS", "Kernel", "select"]
