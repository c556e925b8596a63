"""Deployment targets: the formats a runtime runs as integer kernels, one module per runtime.

A target turns each searchable layer's gene into one of its formats (an index into the target's ``FORMATS``),
simulates each format in PyTorch as the runtime computes it, writes the runtime's own graph, and measures what
each format costs on this machine. Only :mod:`.onnxruntime` exists so far.
"""
TARGETS = ("onnxruntime-cpu",)

__all__ = ["TARGETS"]
