"""Streaming statistics of activations: per channel and per token, never stored per token.

Each `update` folds a batch of rows (tokens) into running sums held in float64, so the
memory is O(channels) whatever the amount of text, and batches may arrive in any
split: the result equals the statistics of all rows at once.
"""
from __future__ import annotations

import math

import torch

# Per-token absmax histogram: log10 bins from 1e-3 to 1e4 (values outside fall in the end bins).
TOKEN_BINS = torch.logspace(-3, 4, 57, dtype=torch.float64)


class ChannelStats:
    """Per-channel count, mean, std, absmax and kurtosis of rows x [tokens, channels]."""

    def __init__(self, channels: int):
        self.n = 0
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros_like(self.s1)
        self.s3 = torch.zeros_like(self.s1)
        self.s4 = torch.zeros_like(self.s1)
        self.absmax = torch.zeros_like(self.s1)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        x2 = x * x
        self.n += x.shape[0]
        self.s1 += x.sum(0)
        self.s2 += x2.sum(0)
        self.s3 += (x2 * x).sum(0)
        self.s4 += (x2 * x2).sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        out = ChannelStats(self.s1.numel())
        out.n = self.n + other.n
        for k in ("s1", "s2", "s3", "s4"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        out.absmax = torch.maximum(self.absmax, other.absmax)
        return out

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    @property
    def var(self) -> torch.Tensor:
        """Population variance (divides by n)."""
        m = self.mean
        return (self.s2 / self.n - m * m).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def kurtosis(self) -> torch.Tensor:
        """Pearson kurtosis m4 / m2^2 (a Gaussian gives 3; heavy tails give more). NaN for a constant channel."""
        m, e2, e3, e4 = self.mean, self.s2 / self.n, self.s3 / self.n, self.s4 / self.n
        m4 = e4 - 4 * m * e3 + 6 * m * m * e2 - 3 * m ** 4
        v = self.var
        return torch.where(v > 0, m4.clamp_min(0) / (v * v), torch.full_like(v, math.nan))


class TokenStats:
    """Per-token absmax (over channels), summarised without keeping tokens.

    Keeps a log histogram of token absmax, the running count, sum and max, and the
    absmax of the first position of every sequence separately (attention-sink tokens
    are where activation spikes live).
    """

    def __init__(self):
        self.hist = torch.zeros(TOKEN_BINS.numel() + 1, dtype=torch.long)
        self.n = 0
        self.sum = 0.0
        self.max = 0.0
        self.first_n = 0
        self.first_sum = 0.0
        self.first_max = 0.0

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, channels]; returns the per-token absmax [batch, seq]."""
        a = x.detach().abs().amax(-1).to(torch.float64)
        flat = a.reshape(-1)
        self.hist += torch.bincount(torch.bucketize(flat, TOKEN_BINS), minlength=self.hist.numel())
        self.n += flat.numel()
        self.sum += float(flat.sum())
        self.max = max(self.max, float(flat.max()))
        first = a[:, 0]
        self.first_n += first.numel()
        self.first_sum += float(first.sum())
        self.first_max = max(self.first_max, float(first.max()))
        return a

    def median(self) -> float:
        """Median token absmax, read off the histogram (bin centre, geometric)."""
        c = torch.cumsum(self.hist, 0)
        i = int(torch.searchsorted(c, torch.tensor((self.n + 1) // 2)))
        edges = TOKEN_BINS
        lo = float(edges[max(i - 1, 0)])
        hi = float(edges[min(i, edges.numel() - 1)])
        return math.sqrt(lo * hi)

    def summary(self) -> dict:
        rest = self.n - self.first_n
        return {
            "tokens": self.n, "mean_absmax": self.sum / max(self.n, 1), "median_absmax": self.median(),
            "max_absmax": self.max,
            "first_token_mean_absmax": self.first_sum / max(self.first_n, 1),
            "other_tokens_mean_absmax": (self.sum - self.first_sum) / max(rest, 1),
            "first_token_max_absmax": self.first_max,
        }


def weight_stats(w: torch.Tensor) -> dict:
    """Per output row and per input column statistics of a [out, in] weight, summarised."""
    w = w.detach().to(torch.float64)
    col_absmax = w.abs().amax(0)
    row_absmax = w.abs().amax(1)
    col = ChannelStats(w.shape[1])
    col.update(w)
    flat = ChannelStats(1)
    flat.update(w.reshape(-1, 1))
    return {
        "shape": list(w.shape), "absmax": float(w.abs().max()), "std": float(flat.std[0]),
        "kurtosis": float(flat.kurtosis[0]),
        "in_channel_absmax_max_over_median": float(col_absmax.max() / col_absmax.median().clamp_min(1e-12)),
        "out_channel_absmax_max_over_median": float(row_absmax.max() / row_absmax.median().clamp_min(1e-12)),
        "in_channel_kurtosis_max": float(torch.nan_to_num(col.kurtosis, nan=0.0).max()),
    }
