"""Quantization: the quantized model, its fake quantizers, the predicates that place them, and calibration."""
