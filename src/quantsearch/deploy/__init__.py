"""Deployment: the bit-config format that re-applies a configuration, and exports of the quantized model."""
