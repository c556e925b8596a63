"""Histogram calibrators: the amax that percentile, entropy and mse pick from a histogram of |x|.

Pure functions of a histogram (counts and bin edges, as pytorch-quantization's ``HistogramCalibrator`` collects
them): percentile takes the edge below which a share of |x| lies; entropy (TensorRT's KL search) and mse are
pytorch-quantization's ``calib/histogram.py`` searches computed for every candidate range at once (its entropy
loops over bins in Python and its mse runs only on CUDA), and depend on the bit-width.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["START_BIN", "percentile_amax", "entropy_amax", "mse_amax"]

START_BIN = 128  # pytorch-quantization's default: amax is never below 1/16 of the absmax


def percentile_amax(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """The left edge of the bin where the cumulative fraction of |x| first reaches ``percentile`` %."""
    counts = np.asarray(counts, dtype=np.float64)
    cdf = np.cumsum(counts / counts.sum())
    return float(edges[np.searchsorted(cdf, percentile / 100)])


def entropy_amax(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool = False,
                 start_bin: int = START_BIN) -> float:
    """The amax (a bin edge ``edges[i]``, ``i >= start_bin``) minimising KL(P_i || Q_i), the last on a tie.

    P_i is the histogram cut at bin i with the tail folded into its last bin; Q_i spreads each of the
    ``2^(b-1)`` (unsigned ``2^b``) quantization levels' mass evenly over its non-empty bins. Bin 0 takes bin 1's
    count (zeros after ReLU would dominate). With S_k, C_k the count and non-empty bins of level k, T the total:
    KL = (sum_j p_j log p_j - sum_k S_k log(S_k / C_k) - tail * log q_last) / T - log T + log sum_{j<i} n_j,
    which prices every i at once; near-ties are settled with the reference's own formula (scipy's entropy).
    """
    bins = np.asarray(counts, dtype=np.int64).copy()
    bins[0] = bins[1]
    n, total = len(bins), int(bins.sum())
    levels = 1 << (num_bits - 1 + int(unsigned))
    cum = np.concatenate([[0], np.cumsum(bins)]).astype(np.float64)
    nonempty = np.concatenate([[0], np.cumsum(bins != 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogx = np.where(bins > 0, bins * np.log(np.maximum(bins, 1)), 0.0)
    cum_xlogx = np.concatenate([[0.0], np.cumsum(xlogx)])
    stops = np.arange(start_bin, n + 1)
    # sum_k S_k log(S_k / C_k) over the levels of cut i, and the mean count of the level holding bin i - 1; a cut
    # into no more bins than levels puts every bin in its own level (levels are narrower than a bin)
    within = cum_xlogx[stops].copy()
    q_last = bins[stops - 1].astype(np.float64)
    wide = np.flatnonzero(stops > levels)
    rows = max(1, (1 << 21) // (levels + 1))
    for first in range(0, len(wide), rows):
        k = wide[first: first + rows]
        i = stops[k]
        lo = np.ceil(np.linspace(0, i, levels + 1, axis=1)).astype(np.int64)  # first bin of each level
        s = cum[lo[:, 1:]] - cum[lo[:, :-1]]
        c = nonempty[lo[:, 1:]] - nonempty[lo[:, :-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            within[k] = np.where(c > 0, s * np.log(np.where(s > 0, s, 1) / np.maximum(c, 1)), 0.0).sum(1)
        last_level = (lo[:, :-1] <= (i - 1)[:, None]).sum(1) - 1
        r = np.arange(len(i))
        q_last[k] = s[r, last_level] / np.maximum(c[r, last_level], 1)
    last = bins[stops - 1].astype(np.float64)
    tail = total - cum[stops]
    ref_last = last + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        a = cum_xlogx[stops - 1] + np.where(ref_last > 0, ref_last * np.log(np.maximum(ref_last, 1)), 0.0)
        b = within + np.where((last > 0) & (tail > 0), tail * np.log(np.where(q_last > 0, q_last, 1)), 0.0)
        divergences = (a - b) / total - math.log(total) + np.log(cum[stops])
    divergences[((last == 0) & (tail > 0)) | (cum[stops] == 0)] = np.inf
    best = np.min(divergences)
    near = np.flatnonzero(divergences <= best + 1e-9 * max(1.0, abs(best)))
    if len(near) > 1:
        exact = [_entropy_reference_divergence(bins, int(stops[k]), levels) for k in near]
        pick = near[len(exact) - 1 - int(np.argmin(exact[::-1]))]
    else:
        pick = near[0]
    return float(edges[stops[pick]])


def _entropy_reference_divergence(bins: np.ndarray, i: int, levels: int) -> float:
    """KL divergence of cut ``i`` exactly as pytorch-quantization's ``_compute_amax_entropy`` computes it."""
    from scipy.stats import entropy

    digitized = np.digitize(np.arange(i), np.linspace(0, i, num=levels + 1)) - 1
    nz = bins[:i] != 0
    d = digitized[nz]
    sums = np.bincount(d, weights=bins[:i][nz].astype(np.float64), minlength=levels)
    sizes = np.bincount(d, minlength=levels)
    quantized = np.zeros(i)
    quantized[nz] = sums[d] / sizes[d]
    reference = bins[:i].astype(np.float64)
    reference[-1] += bins[i:].sum()
    return float(entropy(reference, quantized))


def mse_amax(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool = False,
             start_bin: int = START_BIN) -> float:
    """The bin centre (index >= ``start_bin``) that, as amax, minimises sum_j n_j (Q(c_j) - c_j)^2; first on a tie.

    Q is the quantizer's grid as pytorch-quantization computes it (``round(c * s)`` clamped to the narrow signed
    or the unsigned range, divided by ``s = (2^(b-1+unsigned) - 1) / amax``). Empty bins add nothing, so only
    the occupied ones are priced.
    """
    counts_t = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
    edges_t = torch.as_tensor(np.asarray(edges), dtype=torch.float32)
    centers = (edges_t[1:] + edges_t[:-1]) / 2
    occupied = counts_t > 0
    values, weights = centers[occupied], counts_t[occupied]
    candidates = centers[start_bin:]
    bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    floor = 0.0 if unsigned else -bound
    errors = torch.empty(len(candidates))
    rows = max(1, (1 << 20) // max(1, len(values)))
    with torch.no_grad():
        for first in range(0, len(candidates), rows):
            scale = bound / candidates[first: first + rows].unsqueeze(1)
            error = (values * scale).round_().clamp_(floor, bound).div_(scale).sub_(values).square_().mul_(weights)
            errors[first: first + rows] = error.sum(1) / len(centers)
    return float(candidates[int(errors.argmin())])
