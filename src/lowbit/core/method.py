"""A method string parsed: the transforms that run before rounding, and the quantizer."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.core.scheme import Scheme
from lowbit.errors import UserError

TRANSFORMS = ("rotate", "smoothquant", "awq", "outlier-split")
QUANTIZERS = ("rtn", "gptq", "qat")
METHOD_FORMS = ("rtn, gptq, awq, smoothquant, outlier-split, rotate, qat, or a composition joined by '+' "
                "(e.g. awq+gptq, smoothquant+gptq, rotate+gptq, outlier-split+gptq, rotate+qat)")


@dataclass(frozen=True)
class Method:
    """A method string parsed: transforms that run before rounding, and the quantizer.

    'awq' alone rounds to nearest with AWQ's output-error clipping search; 'smoothquant',
    'rotate' and 'outlier-split' alone round to nearest; '+gptq' or '+qat' replaces the rounding.
    """

    rotate: bool = False
    smooth: str | None = None  # 'smoothquant' | 'awq'
    outlier_split: bool = False
    quantizer: str = "rtn"

    @classmethod
    def parse(cls, text: str) -> "Method":
        if not isinstance(text, str):
            raise UserError(f"method {text!r} is not a name; choose {METHOD_FORMS}")
        parts = [p.strip() for p in text.lower().split("+")]
        bad = [p for p in parts if p not in TRANSFORMS + QUANTIZERS]
        if not parts or bad or len(set(parts)) != len(parts):
            raise UserError(f"unknown method {text!r}; choose {METHOD_FORMS}")
        quantizers = [p for p in parts if p in QUANTIZERS]
        if len(quantizers) > 1:
            raise UserError(f"method {text!r} names two quantizers ({', '.join(quantizers)}); pick one")
        smooth = [p for p in parts if p in ("smoothquant", "awq")]
        if len(smooth) > 1:
            raise UserError("smoothquant and awq both fold per-channel scales; pick one")
        if "outlier-split" in parts and "qat" in parts:
            raise UserError("qat trains every input channel on the grid; it does not combine with outlier-split")
        if "rotate" in parts and smooth:
            raise UserError(f"rotate already spreads outliers across channels; combine it with rtn, gptq or qat, not {smooth[0]}")
        method = cls(rotate="rotate" in parts, smooth=smooth[0] if smooth else None,
                     outlier_split="outlier-split" in parts, quantizer=quantizers[0] if quantizers else "rtn")
        if [p for p in parts if p != "rtn" or len(parts) == 1] != method.name.split("+"):
            raise UserError(f"method {text!r}: transforms run first, then the quantizer; write it as {method.name!r}")
        return method

    @property
    def name(self) -> str:
        parts = (["rotate"] if self.rotate else []) + ([self.smooth] if self.smooth else []) \
            + (["outlier-split"] if self.outlier_split else [])
        if self.quantizer != "rtn" or not parts:
            parts.append(self.quantizer)
        return "+".join(parts)

    def needs_calibration(self, scheme: Scheme) -> bool:
        static_acts = scheme.activations is not None and not scheme.activations.dynamic
        return self.quantizer != "rtn" or self.smooth is not None or self.outlier_split or static_acts
