"""lowbit: quantize LLMs and measure what it buys and costs."""
from .scheme import PRESETS, Recipe, Scheme, SchemeError
from .tensor import QuantizedTensor, quantize_tensor

__version__ = "0.1.0"
__all__ = ["PRESETS", "QuantizedTensor", "Recipe", "Scheme", "SchemeError", "quantize_tensor", "__version__"]
