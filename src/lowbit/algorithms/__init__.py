"""Algorithms decide codes, scales, zero points and layer extras; each ends in QuantizedTensors."""
