"""The one error of every export: its own module, so that exporters and runtime targets share it without importing
one another."""
from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(ValueError):
    """An export path of an unknown kind, an export file that cannot be read back, or a graph a runtime refuses."""
