"""The bit-widths a quantizer may take, importable without torch (settings are checked against them first).

pytorch-quantization's fake quantization is exact from 2 to 16 bits.
"""
__all__ = ["MIN_BITS", "MAX_BITS"]

MIN_BITS, MAX_BITS = 2, 16
