"""Attention for CPU decoding with a static KV cache.

Transformers' eager attention multiplies over the whole static cache (max_cache_len
positions, most of them masked) and repeats every KV head for its query heads; its
bf16 batched matmuls cost ~50 us each on this CPU for a one-token query, and the SDPA
path is no faster there. This one groups query heads by their KV head instead of
copying K/V, keeps only the cache positions some query can see, and computes scores,
softmax and the weighted sum in fp32 (exact for every activation dtype, and faster
than bf16 at these sizes). Registered with transformers as "lowbit".
"""
from __future__ import annotations

import torch
from torch import nn

NAME = "lowbit"


def lowbit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    b, h, q, d = query.shape
    kvh = key.shape[1]
    groups = h // kvh
    if attention_mask is None and q > 1:  # transformers' causal shortcut: query i sees keys up to kv - q + i
        kv = key.shape[2]
        attention_mask = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril(kv - q)[None, None]
    if attention_mask is not None:  # boolean [b, 1, q, kv], True = visible
        visible = attention_mask.reshape(-1, attention_mask.shape[-1]).any(0)
        kv = int(visible.nonzero().max()) + 1 if bool(visible.any()) else 1
        key, value, attention_mask = key[:, :, :kv], value[:, :, :kv], attention_mask[..., :kv]
    # heads i*groups .. i*groups+groups-1 share KV head i (transformers' repeat_kv order)
    qf = query.float().reshape(b, kvh, groups * q, d)
    scores = torch.matmul(qf, key.float().transpose(-1, -2)) * scaling
    if attention_mask is not None:
        m = attention_mask.reshape(b, 1, 1, q, -1).expand(b, kvh, groups, q, -1).reshape(b, kvh, groups * q, -1)
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float()).reshape(b, h, q, d)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def register() -> str:
    """Make "lowbit" a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, lowbit_attention)
    AttentionMaskInterface.register(NAME, _boolean_mask)
    return NAME


def _boolean_mask(*args, **kwargs):
    """transformers' SDPA mask (boolean, True = attend), never its None shortcut: with a
    static cache that would leave the empty cache slots visible."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)
