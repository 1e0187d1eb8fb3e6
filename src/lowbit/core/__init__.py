"""Number formats, schemes and recipes, scale/zero-point choice, QuantizedTensor, the typed quantized layer, run-time transforms."""
