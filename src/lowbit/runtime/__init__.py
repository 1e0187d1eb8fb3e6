"""Running quantized models: QuantLinear, kernels, decode loop, attention, KV cache, generation."""
