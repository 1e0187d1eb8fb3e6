"""A quantized KV cache for transformers models: INT8 or FP8 codes plus scales.

Keys and values are stored as uint8 codes ([batch, kv_heads, tokens, head_dim]) with
fp16 scales, either one per token per head (dynamic: each new token gets its own,
so the cache stays appendable) or one per head (static: calibrated once, e.g. on the
prefill). Every update returns the *dequantized* cache, new tokens included, so a
single forward over a window gives each position exactly what it would read when
generated one token at a time from a quantized cache: that is how the quality cost is
measured. `nbytes()` is what the cache holds, for checking the planner's arithmetic.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from lowbit.core.qparams import dequantize_grouped, encode_grouped, qparams_from_range
from lowbit.core.scheme import Scheme
from lowbit.errors import UserError

KV_FORMATS = {"int8": "int8", "fp8": "fp8_e4m3"}


def cache_kwargs(model, cache) -> dict:
    """A KV cache as `model`'s forward takes it: `cache=` from transformers 5.25 on (where
    `past_key_values=` warns, and is gone in 5.40), `past_key_values=` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
KV_GRANULARITIES = ("token", "head")


class QuantizedKVLayer(BaseQuantizedLayer):
    def __init__(self, fmt: str, granularity: str):
        super().__init__()
        self.scheme = Scheme(format=KV_FORMATS[fmt], granularity="token")
        self.granularity = granularity
        self.head_scales = None  # [1, kv_heads, 1, 1] per key/value, frozen at the first update

    def _scale(self, x: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
        if frozen is not None:
            return frozen
        amax = x.abs().amax(-1, keepdim=True) if self.granularity == "token" else x.abs().amax((0, 2, 3), keepdim=True)
        return qparams_from_range(-amax.float(), amax.float(), self.scheme)[0]

    def _quantize(self, x: torch.Tensor, frozen: torch.Tensor | None = None):
        s = self._scale(x, frozen)
        return encode_grouped(x.float(), s, None, self.scheme), s.to(torch.float16)

    def _dequantize(self, q):
        codes, s = q
        return dequantize_grouped(codes, s.float(), None, self.scheme).to(self.out_dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.out_dtype = key_states.dtype  # what the attention reads back (transformers' layers no longer record it)
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        fk = fv = None
        if self.granularity == "head" and self._quantized_keys is not None:
            fk, fv = self._quantized_keys[1].float(), self._quantized_values[1].float()
        new_k, new_v = self._quantize(key_states, fk), self._quantize(value_states, fv)
        if self._quantized_keys is None:
            self._quantized_keys, self._quantized_values = new_k, new_v
        else:
            self._quantized_keys = _cat(self._quantized_keys, new_k, self.granularity)
            self._quantized_values = _cat(self._quantized_values, new_v, self.granularity)
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    def nbytes(self) -> int:
        if self._quantized_keys is None:
            return 0
        return sum(t.numel() * t.element_size() for q in (self._quantized_keys, self._quantized_values) for t in q)


def _cat(old, new, granularity):
    codes = torch.cat([old[0], new[0]], dim=-2)
    scales = torch.cat([old[1], new[1]], dim=-2) if granularity == "token" else old[1]
    return codes, scales


class QuantizedKVCache(Cache):
    """One QuantizedKVLayer per decoder layer; pass it as cache_kwargs() says."""

    def __init__(self, config, fmt: str = "int8", granularity: str = "token"):
        if fmt not in KV_FORMATS:
            raise UserError(f"KV cache format {fmt!r}: choose one of {', '.join(KV_FORMATS)}")
        if granularity not in KV_GRANULARITIES:
            raise UserError(f"KV cache scales {granularity!r}: choose one of {', '.join(KV_GRANULARITIES)}")
        n = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[QuantizedKVLayer(fmt, granularity) for _ in range(n)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


@torch.no_grad()
def kv_logprobs(model, ids: torch.Tensor, fmt: str | None, granularity: str = "token") -> torch.Tensor:
    """Next-token log-probs with the KV cache quantized (fmt None: float cache)."""
    import torch.nn.functional as F

    cache = QuantizedKVCache(model.config, fmt, granularity) if fmt else None
    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=cache is not None)
    return F.log_softmax(out.logits[:, :-1].float(), -1)

