"""Outlier channels and tokens, by a stated rule, and whether they persist across texts.

Rule (channels): input channel j of a layer is an outlier on a text set when its
absmax over that text is at least OUTLIER_RATIO times the median channel absmax of
the same layer on the same text. The ratio is relative, so it works for any model
scale; 6x the median is where a per-tensor INT8 grid already spends most of its
levels on one channel's range (LLM.int8() used an absolute 6.0 on OPT).

Persistence: a channel is persistent when it is an outlier on at least
PERSISTENT_FRACTION of the text sets (different documents and the built-in prompts).
Persistent channels are a property of the weights (fold them away: SmoothQuant,
rotation, or keep those channels in float); transient ones are spikes of one text.
"""
from __future__ import annotations

import itertools

import torch

OUTLIER_RATIO = 6.0
PERSISTENT_FRACTION = 0.8


def outlier_channels(absmax: torch.Tensor, ratio: float = OUTLIER_RATIO) -> list[int]:
    """Channels whose absmax >= ratio x the median channel absmax, largest first."""
    med = float(absmax.median())
    if med <= 0:
        return []
    idx = torch.nonzero(absmax >= ratio * med).flatten()
    return [int(i) for i in idx[absmax[idx].argsort(descending=True)]]


def persistence(per_set_absmax: list[torch.Tensor], ratio: float = OUTLIER_RATIO,
                persistent_fraction: float = PERSISTENT_FRACTION) -> dict:
    """Outlier sets per text set and how much they overlap.

    Returns the per-set channel lists, each channel's fraction of sets in which it is
    an outlier, the persistent and transient channels, and the mean pairwise Jaccard
    overlap of the sets (1.0 = the same channels on every text; NaN if no set has any).
    """
    sets = [outlier_channels(a, ratio) for a in per_set_absmax]
    k = len(sets)
    union = sorted(set().union(*map(set, sets)))
    frac = {c: sum(c in s for s in sets) / k for c in union}
    pairs = [(set(a), set(b)) for a, b in itertools.combinations(sets, 2) if a or b]
    jac = sum(len(a & b) / len(a | b) for a, b in pairs) / len(pairs) if pairs else float("nan")
    return {
        "per_set": sets,
        "fraction": frac,
        "persistent": [c for c in union if frac[c] >= persistent_fraction],
        "transient": [c for c in union if frac[c] < persistent_fraction],
        "jaccard": jac,
    }


class TopTokens:
    """The K tokens with the largest activation absmax seen at one site (bounded memory)."""

    def __init__(self, k: int = 16):
        self.k = k
        self.items: list[tuple[float, int, int]] = []  # (absmax, token id, position)

    def update(self, token_absmax: torch.Tensor, ids: torch.Tensor) -> None:
        flat = token_absmax.reshape(-1)
        top = flat.topk(min(self.k, flat.numel()))
        seq = token_absmax.shape[-1]
        for v, i in zip(top.values.tolist(), top.indices.tolist()):
            self.items.append((v, int(ids.reshape(-1)[i]), i % seq))
        self.items = sorted(self.items, reverse=True)[: self.k]
