"""The additive model: a cost over the genes in closed form, and predicted accuracy from a sensitivity table.

:class:`GeneCosts` writes a cost model as ``constant + sum_g u_g(b_g) + sum_{g,h} c_gh * b_g * b_h``. That is exact
for every built-in cost: ``bits``, ``activation-memory`` and ``model-size`` are sums of one term per quantizer
(found by probing the cost model one gene at a time), and ``bops`` is a sum over multiplies of
``MACs x bits(operand 1) x bits(operand 2)``, read off its profile (a weight gene times its input's gene, or two
activation genes for an attention matmul). Any other cost model is probed like the separable ones, and
:attr:`GeneCosts.exact` says whether the result matched it on two test configurations.

:class:`AdditiveModel` adds the drops of a :class:`~quantsearch.sensitivity.Sensitivity` table (the accuracy the
greedy, ILP and guided searches optimise against) and evaluates costs and predictions of many genomes at once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .costs import BOPs, UNQUANTIZED_BITS

__all__ = ["GeneCosts", "AdditiveModel"]


class GeneCosts:
    """One cost of ``problem`` as unary and pairwise terms over its genes (see the module docstring)."""

    def __init__(self, problem, cost_index: int = 0):
        self.problem = problem
        self.cost = problem.costs[cost_index]
        # a cost that times some configurations whole offers its unary terms to probe (``additive``)
        self._probe = getattr(self.cost, "additive", self.cost)
        genes = problem.gene_names
        index = {g: i for i, g in enumerate(genes)}
        self.lo = np.array([problem.bit_ranges[g][0] for g in genes])
        self.hi = np.array([problem.bit_ranges[g][1] for g in genes])
        width = int(self.hi.max()) + 1
        self.unary = np.zeros((len(genes), width))  # unary[i, b]: u_i(b)
        pairs: dict[tuple[int, int], float] = {}
        self.constant = 0.0
        if isinstance(self.cost, BOPs):
            fixed = problem.fixed

            def operand(name):  # (gene index, None) or (None, constant width)
                if name is None:
                    return None, float(UNQUANTIZED_BITS)
                return (index[name], None) if name in index else (None, float(fixed[name]))

            bits = np.arange(width, dtype=float)
            for op in self.cost.ops:
                (i, a), (j, b) = operand(op.operands[0]), operand(op.operands[1])
                if i is None and j is None:
                    self.constant += op.macs * a * b
                elif i is not None and j is not None and i == j:
                    self.unary[i] += op.macs * bits * bits
                elif i is not None and j is not None:
                    key = (min(i, j), max(i, j))
                    pairs[key] = pairs.get(key, 0.0) + op.macs
                else:
                    gene, other = (i, b) if i is not None else (j, a)
                    self.unary[gene] += op.macs * bits * other
        else:  # separable: probe one gene at a time from the top
            top = [int(h) for h in self.hi]
            base = self._true(top)
            for i in range(len(genes)):
                for b in range(int(self.lo[i]), int(self.hi[i]) + 1):
                    genome = list(top)
                    genome[i] = b
                    self.unary[i, b] = self._true(genome) - base
            self.constant = base
        self.pair_i = np.array([k[0] for k in pairs], dtype=int)
        self.pair_j = np.array([k[1] for k in pairs], dtype=int)
        self.pair_c = np.array(list(pairs.values()), dtype=float)
        checks = [list(self.lo), [int((lo + hi) // 2) for lo, hi in zip(self.lo, self.hi)]]
        self.exact = all(np.isclose(self.value(g), self._true(g), rtol=1e-9, atol=1e-6) for g in checks)

    def _true(self, genome: Sequence[int]) -> float:
        key = self.problem.configuration(genome)
        return float(self._probe(dict(zip(self.problem.qmodel.quantizer_names, key))))

    @property
    def name(self) -> str:
        return self.cost.name

    @property
    def pairs(self) -> list[tuple[int, int, float]]:
        return list(zip(self.pair_i.tolist(), self.pair_j.tolist(), self.pair_c.tolist()))

    def value(self, genome: Sequence[int]) -> float:
        return float(self.values(np.asarray([genome]))[0])

    def values(self, genomes: np.ndarray) -> np.ndarray:
        """Costs of a ``(n, genes)`` array of genomes."""
        g = np.asarray(genomes, dtype=int)
        total = self.constant + self.unary[np.arange(g.shape[1]), g].sum(axis=1)
        if len(self.pair_c):
            total = total + (self.pair_c * g[:, self.pair_i] * g[:, self.pair_j]).sum(axis=1)
        return total

    def savings(self, genome: Sequence[int]) -> np.ndarray:
        """``savings[i, b]``: the cost saved by setting gene ``i`` alone to ``b`` in ``genome`` (negative: added)."""
        g = np.asarray(genome, dtype=int)
        n, width = self.unary.shape
        bits = np.arange(width)
        current = self.unary[np.arange(n), g]
        saved = current[:, None] - self.unary  # unary part
        partner = np.zeros((n, 1))
        if len(self.pair_c):  # d/d b_i of c_ij b_i b_j is c_ij b_j: linear in b_i
            np.add.at(partner[:, 0], self.pair_i, self.pair_c * g[self.pair_j])
            np.add.at(partner[:, 0], self.pair_j, self.pair_c * g[self.pair_i])
        saved = saved + partner * (g[:, None] - bits[None, :])
        return saved


class AdditiveModel:
    """Predicted accuracy (effective reference minus summed modelled drops) and exact cost of genomes."""

    def __init__(self, sensitivity, costs: GeneCosts):
        self.sensitivity, self.costs = sensitivity, costs
        drops = sensitivity.drops()
        width = costs.unary.shape[1]
        self.drops = np.full((len(sensitivity.genes), width), np.inf)
        for i, gene in enumerate(sensitivity.genes):
            for b, d in drops[gene].items():
                self.drops[i, b] = d
        self.reference = sensitivity.effective_reference
        self.sign = sensitivity.sign

    def predicted(self, genomes: np.ndarray) -> np.ndarray:
        g = np.asarray(genomes, dtype=int)
        return self.reference - self.sign * self.drops[np.arange(g.shape[1]), g].sum(axis=1)

    def refit(self, evaluations, problem, cap: float, strength: float = 1.0) -> "AdditiveModel":
        """This model with one weight per gene on its drops (and an offset), fitted to the measured drops of the
        ``ok`` evaluations in the search space whose drop is at most ``cap``.

        Ridge regression towards weight 1 and offset 0: a gene that few evaluations lowered keeps its estimate,
        one that many did gets the weight the measurements ask for (clipped to [0.1, 10]); the offset absorbs the
        reference's own luck. Solved in closed form; the sensitivity table itself is unchanged.
        """
        n = self.drops.shape[0]
        rows, y = [], []
        for e in evaluations:
            if e.status != "ok" or not problem.in_space(e.bits):
                continue
            drop = self.sign * (self.reference - e.accuracy)
            d = self.drops[np.arange(n), np.asarray(problem.genome(e.bits), dtype=int)]
            if drop <= cap and np.isfinite(d).all():
                rows.append(d)
                y.append(drop)
        if len(rows) < 3:
            return self
        D = np.column_stack([np.array(rows), np.ones(len(rows))])
        penalty = strength * max(float(np.mean(np.sum(D[:, :n] ** 2, axis=0))), 1e-12)
        prior = np.r_[np.ones(n), 0.0]
        w = np.linalg.solve(D.T @ D + penalty * np.eye(n + 1), D.T @ np.asarray(y) + penalty * prior)
        fitted = object.__new__(AdditiveModel)
        fitted.__dict__.update(self.__dict__)
        fitted.drops = self.drops * np.clip(w[:n], 0.1, 10.0)[:, None]
        fitted.reference = self.reference - self.sign * float(w[n])
        return fitted

    def total_drop(self, genomes: np.ndarray, known_only: bool = False) -> np.ndarray:
        """Summed modelled drop of each genome; ``known_only``: genes without a measurement add nothing (a lower
        bound, for screening) instead of making the sum infinite."""
        g = np.asarray(genomes, dtype=int)
        drops = self.drops[np.arange(g.shape[1]), g]
        if known_only:
            drops = np.where(np.isfinite(drops), drops, 0.0)
        return drops.sum(axis=1)

    @property
    def measured(self) -> np.ndarray:
        """Whether each gene has a modelled drop below its top (was measured at some width)."""
        hi = self.costs.hi.astype(int)
        return np.array([hi[i] <= self.costs.lo[i] or np.isfinite(self.drops[i, hi[i] - 1])
                         for i in range(len(hi))])
