"""QuantizedLayer: everything one quantized Linear is, besides its bias.

The weight's QuantizedTensor, and what some methods add around it: the calibrated
scale of a static activation scheme, an input transform applied at run time (QuaRot's
online Hadamard; the stored weight is rotated to match), and input channels kept in
float (LLM.int8-style outlier split: their weight columns are zero in the codes and
live in `float_weight`). Algorithms produce it, QuantLinear runs it, the lowbit
directory stores it, exports ask it what they would have to drop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.tensor import QuantizedTensor
from lowbit.core.transforms import INPUT_TRANSFORMS


@dataclass
class QuantizedLayer:
    weight: QuantizedTensor
    act_scale: torch.Tensor | None = None  # [1] float32: static activation schemes only
    input_transform: str | None = None  # a name in core.transforms.INPUT_TRANSFORMS
    float_cols: torch.Tensor | None = None  # int64 input channel indices kept in float
    float_weight: torch.Tensor | None = None  # [out_features, len(float_cols)]

    def __post_init__(self):
        # act_scale may come later (it is calibrated on the quantized block's outputs); QuantLinear insists on it
        if self.input_transform is not None and self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"unknown input transform {self.input_transform!r}")
        if (self.float_cols is None) != (self.float_weight is None):
            raise ValueError("float_cols and float_weight come together")

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def weight_only(self) -> bool:
        """Nothing beyond the weight's codes: what weight-only kernels and formats serve."""
        return not self.beyond_weight_codes()

    def beyond_weight_codes(self) -> list[str]:
        """What this layer computes that weight codes alone cannot say (for exports to refuse)."""
        out = []
        if self.input_transform is not None:
            out.append(f"rotates its input ({self.input_transform}, online)")
        if self.float_cols is not None:
            out.append(f"keeps {self.float_cols.numel()} outlier input channels in float")
        if self.weight.scheme.activations is not None:
            out.append(f"quantizes its activations ({self.weight.scheme.activations.name})")
        return out

    @property
    def float_input_channels(self) -> int:
        return int(self.float_cols.numel()) if self.float_cols is not None else 0

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight this layer multiplies: the dequantized codes, with the float
        columns put back (what the next block sees during calibration)."""
        w = self.weight.dequantize(dtype)
        if self.float_cols is not None:
            w[:, self.float_cols] = self.float_weight.to(dtype)
        return w

    def extras_meta(self) -> dict:
        """lowbit.json's description of the extras (their tensors are stored beside the codes)."""
        out = {}
        if self.act_scale is not None:
            out["act_scale"] = True
        if self.input_transform:
            out["input_transform"] = self.input_transform
        if self.float_cols is not None:
            out["float_cols"] = self.float_input_channels
        return out

    def meta(self) -> dict:
        extras = self.extras_meta()
        return {**self.weight.meta(), **({"extras": extras} if extras else {})}

    @classmethod
    def placeholder(cls, weight: QuantizedTensor, extras: dict) -> "QuantizedLayer":
        """A layer with room for the extras `extras_meta()` listed (a state_dict load fills them)."""
        k = int(extras.get("float_cols", 0))
        return cls(weight, act_scale=torch.ones(1) if extras.get("act_scale") else None,
                   input_transform=extras.get("input_transform"),
                   float_cols=torch.zeros(k, dtype=torch.long) if k else None,
                   float_weight=torch.zeros(weight.shape[0], k) if k else None)
