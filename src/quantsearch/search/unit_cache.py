"""Shared computation across candidates: a block's output, reused by every later configuration that quantizes
everything up to that block the same way.

Two configurations that agree on the width of every quantizer that runs before a block ends compute the same
output there, bit for bit, on the same batch. A search meets that often: a sensitivity measurement lowers one
quantizer from the top, a greedy step moves one gene, an ILP solution keeps the early blocks at the top. The
cache keeps each block's output per configuration prefix and batch, within a byte budget; over it, the oldest
entry never answered from goes first (a segmented LRU: the top configuration's early blocks, which every
single-gene step from the top reuses, outlive a stream of one-off configurations). When a forward pass starts,
the deepest block it holds for the pass's batch and widths answers from the cache, and every block before it is
skipped (each returns zeros of its output's shape, which only the cheap glue between blocks reads). Outputs are
copied in and out, so that no in-place operation downstream can change a kept one.

The blocks are the smallest numbered items (``blocks.3``, ``layer2.1``) holding two or more Linear or Conv
layers, run once per pass: the units block reconstruction uses (:mod:`quantsearch.quantize.refine.blocks`). The
cache answers only under ``torch.inference_mode`` (evaluation), and it is active only inside :meth:`active`.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["UnitOutputCache"]


class UnitOutputCache:
    """Block outputs of ``qmodel`` (a :class:`QuantizedActivationsModel`) per batch and per widths of the
    quantizers that run before the block ends; ``budget_bytes`` bounds what it holds."""

    def __init__(self, qmodel, example: torch.Tensor, budget_bytes: int):
        from ..quantize.refine.blocks import block_modules

        self.qmodel, self.budget = qmodel, int(budget_bytes)
        self.blocks = block_modules(qmodel, example[:1])
        self.prefixes = self._prefixes(example[:1])
        self.quantizers = list(qmodel.named_quantizers())
        self.entries: OrderedDict = OrderedDict()  # (block index, widths, batch id) -> (output, batch)
        self.fresh: OrderedDict = OrderedDict()  # the entries never answered from, oldest first: evicted first
        self.shapes: dict[int, tuple] = {}  # each block's output shape past the batch, once it has run
        self.bytes = 0
        self.calls, self.hits, self.skipped = 0, 0, 0
        self._pass: dict | None = None

    def _prefixes(self, example: torch.Tensor) -> list[list[int]]:
        """For each block, the indices of the quantizers whose module starts before the block ends (the model's
        input quantizer first): what its output depends on."""
        started: dict[int, int] = {}
        ended: list[int] = []
        counter = [0]
        modules = dict(self.qmodel.model.named_modules())

        def before(module, _args):
            counter[0] += 1
            started.setdefault(id(module), counter[0])

        def after(_module, _args, _out):
            counter[0] += 1
            ended.append(counter[0])

        handles = [m.register_forward_pre_hook(before) for m in modules.values()]
        handles += [m.register_forward_hook(after) for _, m in self.blocks]
        try:
            with torch.inference_mode():
                self.qmodel(example)
        finally:
            for handle in handles:
                handle.remove()
        owners = []
        for name in self.qmodel.quantizer_names:
            path = name.split(":", 1)[0]
            owners.append(0 if name == "input" else started.get(id(modules.get(path)), None))
        return [[i for i, start in enumerate(owners) if start is None or start < end] for end in ended]

    def _key(self, index: int) -> tuple:
        return tuple((self.quantizers[i][1].num_bits, self.quantizers[i][1]._disabled) for i in self.prefixes[index])

    @contextmanager
    def active(self) -> Iterator["UnitOutputCache"]:
        """Inside the block the model answers from the cache; everything is put back (and the cache emptied)
        after."""
        saved = [(m, m.__dict__.get("forward")) for _, m in self.blocks]
        handle = self.qmodel.register_forward_pre_hook(self._start)
        try:
            for index, (_, module) in enumerate(self.blocks):
                object.__setattr__(module, "forward", self._wrapped(index, module.forward))
            yield self
        finally:
            handle.remove()
            for module, forward in saved:
                if forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    object.__setattr__(module, "forward", forward)
            self.entries.clear()
            self.fresh.clear()
            self.bytes, self._pass = 0, None

    def _start(self, _module, args) -> None:
        """A forward pass begins: find the deepest block the cache holds for this batch and these widths."""
        self._pass = None
        if not torch.is_inference_mode_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return
        batch = args[0]
        keys = [(i, self._key(i), id(batch)) for i in range(len(self.blocks))]
        deepest = max((i for i, key in enumerate(keys) if key in self.entries), default=-1)
        self._pass = {"batch": batch, "keys": keys, "deepest": deepest}

    def _wrapped(self, index: int, forward):
        def run(*args, **kwargs):
            state = self._pass
            if state is None:
                return forward(*args, **kwargs)
            self.calls += 1
            key = state["keys"][index]
            if index < state["deepest"] and index in self.shapes:  # a later block answers: this one is not read
                self.skipped += 1
                x = args[0]
                return torch.zeros((x.shape[0], *self.shapes[index]), dtype=x.dtype, device=x.device)
            if index == state["deepest"]:
                self.hits += 1
                self.entries.move_to_end(key)
                self.fresh.pop(key, None)
                return self.entries[key][0].clone()
            output = forward(*args, **kwargs)
            self._store(key, output, state["batch"])
            return output
        return run

    def _store(self, key: tuple, output, batch: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            return
        self.shapes.setdefault(key[0], tuple(output.shape[1:]))
        size = output.numel() * output.element_size()
        if size > self.budget or key in self.entries:
            return
        self.entries[key] = (output.clone(), batch)  # the batch is held so that its id stays its own
        self.fresh[key] = None
        self.bytes += size
        while self.bytes > self.budget:
            if self.fresh:  # the oldest entry never answered from, else the least recently answered one
                victim = self.fresh.popitem(last=False)[0]
                old, _ = self.entries.pop(victim)
            else:
                old, _ = self.entries.popitem(last=False)[1]
            self.bytes -= old.numel() * old.element_size()

    def stats(self) -> dict:
        """Block calls answered from the cache (``hits``), skipped because a later block was (``skipped``), and
        all block calls, since the cache was made."""
        return {"block_calls": self.calls, "hits": self.hits, "skipped": self.skipped,
                "hit_rate": (self.hits + self.skipped) / self.calls if self.calls else 0.0,
                "budget_mb": self.budget / 2 ** 20}
