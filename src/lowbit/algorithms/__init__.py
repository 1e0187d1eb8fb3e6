"""Algorithms decide codes, scales and zero points; each ends in QuantizedTensors."""
METHODS = ("rtn", "gptq")
