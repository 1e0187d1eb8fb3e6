"""Round-to-nearest: each weight onto the grid with the scheme's own scale choice."""
from lowbit.core.scheme import Scheme
from lowbit.core.tensor import QuantizedTensor, quantize_tensor


def rtn(weight, scheme: Scheme, name: str = "weight") -> QuantizedTensor:
    return quantize_tensor(weight, scheme, name=name)
