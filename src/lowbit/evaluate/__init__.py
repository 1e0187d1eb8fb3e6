"""Measuring quantized models: quality (perplexity, KL, agreement), comparisons, speed benchmarks."""
