"""lowbit: quantize LLMs and measure what it buys and costs."""
from lowbit.api import load, quantize
from lowbit.core.scheme import PRESETS, Recipe, Scheme, SchemeError
from lowbit.core.tensor import QuantizedTensor, quantize_tensor

__version__ = "0.1.0"
__all__ = ["load", "quantize", "PRESETS", "QuantizedTensor", "Recipe", "Scheme", "SchemeError", "quantize_tensor", "__version__"]
