"""Predicates choose which modules get an activation quantizer.

A predicate is any callable ``(qualified_name, module) -> bool``. :class:`Predicate` wraps one so that
predicates compose with ``&``, ``|`` and ``~``; :func:`by_type` and :func:`by_name` build the common ones, and
:data:`PRESETS` names the targets people ask for (``conv2d``, ``batchnorm``, ``linear``, ``vit``,
``all-leaf``).

A :class:`Target` is what a preset really describes: the modules whose *output* is quantized, the modules whose
*input* is quantized (a tensor that no module produces, such as the attention output entering ``attn.proj``),
and whether fused attention must be switched off so that the softmax output passes through a module.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Union

from torch import nn

__all__ = [
    "Predicate",
    "Target",
    "PRESETS",
    "by_type",
    "by_name",
    "leaf",
    "nothing",
    "get_target",
]

PredicateFn = Callable[[str, nn.Module], bool]


class Predicate:
    """A composable ``(qualified_name, module) -> bool`` with a readable description."""

    def __init__(self, fn: PredicateFn, description: str = "predicate"):
        self._fn = fn
        self.description = description

    def __call__(self, name: str, module: nn.Module) -> bool:
        return bool(self._fn(name, module))

    def __and__(self, other: PredicateFn) -> "Predicate":
        other = _wrap(other)
        return Predicate(lambda n, m: self(n, m) and other(n, m), f"({self.description} & {other.description})")

    def __or__(self, other: PredicateFn) -> "Predicate":
        other = _wrap(other)
        return Predicate(lambda n, m: self(n, m) or other(n, m), f"({self.description} | {other.description})")

    def __invert__(self) -> "Predicate":
        return Predicate(lambda n, m: not self(n, m), f"~{self.description}")

    def __repr__(self) -> str:
        return f"Predicate({self.description})"


def _wrap(fn: PredicateFn) -> Predicate:
    return fn if isinstance(fn, Predicate) else Predicate(fn, getattr(fn, "__name__", "predicate"))


def by_type(*types: type) -> Predicate:
    """Modules that are instances of any of ``types``."""
    return Predicate(lambda _n, m: isinstance(m, types), "|".join(t.__name__ for t in types))


def by_name(*patterns: str) -> Predicate:
    """Modules whose qualified name matches any of the glob ``patterns`` (``blocks.*.mlp.fc1``)."""
    return Predicate(lambda n, _m: any(fnmatch.fnmatchcase(n, p) for p in patterns), " or ".join(patterns))


def leaf() -> Predicate:
    """Modules without children (the root of a one-module model excluded: its output is the model's)."""
    return Predicate(lambda n, m: bool(n) and next(m.children(), None) is None, "leaf")


def nothing() -> Predicate:
    return Predicate(lambda _n, _m: False, "nothing")


@dataclass(frozen=True)
class Target:
    """Where quantizers go: after ``outputs`` modules, before ``inputs`` modules."""

    outputs: Predicate
    inputs: Predicate = nothing()
    unfuse_attention: bool = False
    description: str = ""


def _vit_target() -> Target:
    # Attention probabilities pass through ``attn_drop`` (identity at eval) once fused attention is off; the
    # attention output (probabilities @ V) is produced by no module, so it is caught at the input of ``proj``.
    outputs = (by_type(nn.Linear, nn.GELU, nn.LayerNorm, nn.Conv2d)
               | (by_type(nn.Dropout) & by_name("*attn_drop")))
    inputs = by_type(nn.Linear) & by_name("*attn.proj")
    return Target(outputs, inputs, unfuse_attention=True,
                  description="Linear/Conv2d/GELU/LayerNorm outputs, attention probabilities, attention output")


PRESETS: dict[str, Callable[[], Target]] = {
    "conv2d": lambda: Target(by_type(nn.Conv2d), description="Conv2d outputs"),
    # after each BatchNorm2d (timm's BatchNormAct2d includes the activation): the tensors that an integer model,
    # with BatchNorm folded into its convolutions, quantizes; pre-BatchNorm conv outputs of depthwise networks
    # (MobileNet, EfficientNet) spread over channels so unevenly that one per-tensor range loses most of them
    "batchnorm": lambda: Target(by_type(nn.BatchNorm2d), description="BatchNorm2d (+ activation) outputs"),
    "linear": lambda: Target(by_type(nn.Linear), description="Linear outputs"),
    "vit": _vit_target,
    "all-leaf": lambda: Target(leaf() & ~by_type(nn.Dropout, nn.Identity), description="every leaf module's output"),
}

PredicateLike = Union[str, PredicateFn, Target]


def get_target(spec: PredicateLike) -> Target:
    """A :class:`Target` from a preset name, a predicate (outputs only) or a Target."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown predicate preset {spec!r}; choose from {', '.join(PRESETS)}")
        return PRESETS[spec]()
    if callable(spec):
        return Target(_wrap(spec), description=_wrap(spec).description)
    raise TypeError(f"a predicate must be a preset name, a callable or a Target, not {type(spec).__name__}")
