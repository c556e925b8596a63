"""Where integer operators go in a model: timm ViTs' softmax (in ``Attention``), residual adds (in ``Block``),
``nn.GELU`` and ``nn.LayerNorm``; each chosen one replaces its module's forward (the instance attribute, so the
module keeps its class, its hooks and its name, and :meth:`IntegerOps.remove` restores it).

Operator names: ``<attention>.softmax``, ``<gelu>``, ``<layernorm>``, ``<block>.residual0`` (the stream entering
the block), ``<block>.residual1`` (after attention) and ``<block>.residual2`` (after the MLP). A model whose softmax
sits where no module exposes it (``nn.MultiheadAttention``, an unknown attention class) cannot be made integer-only:
asking for it is refused by name.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ..limits import INTEGER_KINDS, INTEGER_PRESETS
from .operators import IntegerGELU, IntegerLayerNorm, IntegerOperator, IntegerSoftmax, ResidualGrid

__all__ = ["IntegerOpsError", "IntegerOps", "find_operators", "float_operators"]

_NONLINEAR = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LayerNorm, nn.MultiheadAttention, nn.Hardswish,
              nn.Hardsigmoid, nn.Mish, nn.ELU, nn.GroupNorm)  # float operators an integer-only model may not keep


class IntegerOpsError(ValueError):
    """An integer operator that cannot be placed; the message names it."""


def _is_timm(module: nn.Module, cls: str) -> bool:
    return type(module).__name__ == cls and type(module).__module__.startswith("timm.")


def _is_attention(module: nn.Module) -> bool:
    return _is_timm(module, "Attention") and all(hasattr(module, a) for a in ("qkv", "num_heads", "head_dim",
                                                                                 "scale", "attn_drop", "proj"))


def _is_block(module: nn.Module) -> bool:
    return _is_timm(module, "Block") and all(hasattr(module, a) for a in ("norm1", "attn", "ls1", "drop_path1",
                                                                             "norm2", "mlp", "ls2", "drop_path2"))


def _is_layernorm(module: nn.Module) -> bool:
    # over the last dimension: nn.LayerNorm's own forward (timm's LayerNorm2d permutes channels first: not this)
    return isinstance(module, nn.LayerNorm) and type(module).__name__ != "LayerNorm2d"


def find_operators(model: nn.Module) -> "OrderedDict[str, tuple[str, nn.Module]]":
    """``{operator name: (kind, module)}`` of every nonlinear operator an integer one can replace, in model order."""
    found: "OrderedDict[str, tuple[str, nn.Module]]" = OrderedDict()
    for name, module in model.named_modules():
        if _is_attention(module):
            found[f"{name}.softmax"] = ("softmax", module)
        elif _is_block(module):
            for i in range(3):
                found[f"{name}.residual{i}"] = ("add", module)
        elif isinstance(module, nn.GELU):
            found[name] = ("gelu", module)
        elif _is_layernorm(module):
            found[name] = ("layernorm", module)
    return found


def float_operators(model: nn.Module, integer: Mapping[str, str]) -> list[str]:
    """Names of the nonlinear operators that stay in float with these implementations (empty: integer-only)."""
    found = find_operators(model)
    left = [n for n in found if integer.get(n, "float") == "float"]
    covered = {id(m) for _, m in found.values()}
    for name, module in model.named_modules():
        if isinstance(module, _NONLINEAR) and id(module) not in covered:
            left.append(name)
    return left


def resolve(model: nn.Module, spec: str | Mapping[str, str] | None) -> "OrderedDict[str, str]":
    """``{operator name: implementation}`` for every operator found (float where nothing chose another); one line
    for a glob that matches nothing, an implementation an operator does not have, or a model with none."""
    found = find_operators(model)
    chosen: "OrderedDict[str, str]" = OrderedDict((n, "float") for n in found)
    if spec is None:
        return chosen
    if isinstance(spec, str):
        preset = INTEGER_PRESETS[spec]
        if spec != "float" and not found:
            raise IntegerOpsError(f"integer-ops {spec!r}: the model has no operator that quantsearch puts on "
                                  "integers (timm Attention softmax, Block residual adds, nn.GELU, nn.LayerNorm)")
        for name, (kind, _) in found.items():
            chosen[name] = preset[kind]
        if spec != "float":
            _refuse_unplaceable(model)
        return chosen
    matched = set()
    for name, (kind, _) in found.items():
        glob = next((g for g in spec if fnmatch.fnmatchcase(name, g)), None)
        if glob is None:
            continue
        matched.add(glob)
        impl = spec[glob]
        if impl not in INTEGER_KINDS[kind]:
            raise IntegerOpsError(f"integer-ops[{glob!r}]: operator {name!r} is a {kind}, which has no {impl!r} "
                                  f"implementation; choose from {', '.join(INTEGER_KINDS[kind])}")
        chosen[name] = impl
    unused = next((g for g in spec if g not in matched), None)
    if unused is not None:
        raise IntegerOpsError(f"integer-ops[{unused!r}] matches no operator of the model "
                              f"({', '.join(list(found)[:4]) or 'it has none'}{', ...' if len(found) > 4 else ''})")
    return chosen


def _refuse_unplaceable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or (type(module).__name__.endswith("Attention")
                                                          and hasattr(module, "qkv") and not _is_attention(module)):
            raise IntegerOpsError(f"integer-ops: the softmax of {name!r} ({type(module).__name__}) runs inside "
                                  "its module, where quantsearch cannot replace it; integer softmax needs timm's "
                                  "Attention")


class IntegerOps:
    """The integer operators placed in a model, and the forwards they replaced."""

    def __init__(self, model: nn.Module, spec: str | Mapping[str, str] | None = None,
                 add_bits: int = 16, output_bits: Callable[[nn.Module], Callable[[], int]] | None = None):
        self.choices = resolve(model, spec)
        self.add_bits = int(add_bits)
        self.operators: "OrderedDict[str, IntegerOperator]" = OrderedDict()
        self._patched: dict[nn.Module, object] = {}
        found = find_operators(model)
        for name, impl in self.choices.items():
            if impl == "float":
                continue
            kind, module = found[name]
            if kind == "softmax":
                bits = output_bits(module.attn_drop) if output_bits else (lambda: 8)
                self.operators[name] = IntegerSoftmax(name, impl, bits)
            elif kind == "gelu":
                self.operators[name] = IntegerGELU(name, impl, module)
            elif kind == "layernorm":
                self.operators[name] = IntegerLayerNorm(name, impl, module)
            else:
                self.operators[name] = ResidualGrid(name, impl, self.add_bits)
        for name, (kind, module) in found.items():
            if module not in self._patched and any(n in self.operators for n in self._names_of(name, kind)):
                self._patch(module, kind, self._names_of(name, kind))

    @staticmethod
    def _names_of(name: str, kind: str) -> list[str]:
        if kind != "add":
            return [name]
        block = name.rsplit(".", 1)[0]
        return [f"{block}.residual{i}" for i in range(3)]

    def _patch(self, module: nn.Module, kind: str, names: list[str]) -> None:
        ops = [self.operators.get(n) for n in names]
        self._patched[module] = module.__dict__.get("forward")
        if kind == "softmax":
            forward = _attention_forward(module, ops[0])
        elif kind == "add":
            forward = _block_forward(module, *ops)
        else:
            def forward(x: torch.Tensor, op: IntegerOperator = ops[0]) -> torch.Tensor:
                return op(x)
        # a plain function in the instance's __dict__ (a Module assigned here would become a child instead)
        object.__setattr__(module, "forward", forward)

    def remove(self) -> None:
        for module, previous in self._patched.items():
            module.__dict__.pop("forward", None)
            if previous is not None:
                object.__setattr__(module, "forward", previous)
        self._patched.clear()

    def __iter__(self) -> Iterator[IntegerOperator]:
        return iter(self.operators.values())

    def __len__(self) -> int:
        return len(self.operators)


def _attention_forward(attn: nn.Module, softmax: IntegerOperator):
    """timm's ``Attention.forward`` (the unfused path) with ``softmax`` in place of the float one."""
    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or getattr(attn, "gate", None) is not None:
            raise IntegerOpsError(f"integer softmax in {softmax.name!r}: masks and gates are not supported")
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        x = attn.attn_drop(softmax(scores)) @ v
        x = x.transpose(1, 2).reshape(B, N, getattr(attn, "attn_dim", C))
        x = getattr(attn, "norm", nn.Identity())(x)
        return attn.proj_drop(attn.proj(x))
    return forward


def _block_forward(block: nn.Module, entry, after_attention, after_mlp):
    """timm's ``Block.forward`` with each residual add on its integer grid (``None``: a float add)."""
    def add(grid, x, branch):
        return x + branch if grid is None else grid(x, branch)

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        kwargs = {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}
        if entry is not None:
            x = entry(x)
        x = add(after_attention, x, block.drop_path1(block.ls1(block.attn(block.norm1(x), **kwargs))))
        return add(after_mlp, x, block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))
    return forward
