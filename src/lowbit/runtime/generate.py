"""Greedy generation with a static KV cache, through lowbit's decode loop or transformers' forward."""
from __future__ import annotations

import time

import torch
from torch import nn

from lowbit.runtime.qlinear import QuantLinear


class LinearTimer:
    """Wall time spent inside Linear / QuantLinear forwards (CPU ops are synchronous)."""

    def __init__(self, model: nn.Module):
        self.seconds = 0.0
        self._t = {}
        self.handles = []
        for m in model.modules():
            if isinstance(m, (nn.Linear, QuantLinear)):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, mod, _inp):
        self._t[id(mod)] = time.perf_counter()

    def _post(self, mod, _inp, _out):
        self.seconds += time.perf_counter() - self._t.pop(id(mod))

    def close(self):
        for h in self.handles:
            h.remove()


ENGINES = ("auto", "lowbit", "transformers")


def decode_engine(model: nn.Module, engine: str = "auto") -> str:
    """'lowbit' (decode.py's loop) where the architecture allows it, else 'transformers'."""
    from lowbit.runtime.decode import unsupported_reason

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
    if engine == "auto":
        return "transformers" if unsupported_reason(model) else "lowbit"
    return engine


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, engine: str = "auto",
             time_linears: bool = False) -> dict:
    """Greedy decode with a static KV cache, through lowbit's decode loop or transformers'
    forward (`engine`). Returns tokens and timings."""
    prompt_len = input_ids.shape[1]
    engine = decode_engine(model, engine)
    if engine == "lowbit":
        from lowbit.runtime.decode import Decoder

        decoder = Decoder(model, prompt_len + max_new_tokens, hooks=time_linears)

        def step(ids, pos):
            return decoder.next_token(ids)
    else:
        from transformers import StaticCache

        from lowbit.runtime.kvcache import cache_kwargs

        cache = cache_kwargs(model, StaticCache(config=model.config, max_cache_len=prompt_len + max_new_tokens))

        def step(ids, pos):  # cache: {"cache" or "past_key_values": the StaticCache}
            out = model(input_ids=ids, **cache, use_cache=True,
                        cache_position=torch.arange(pos, pos + ids.shape[1]))
            return out.logits[:, -1:].argmax(-1)
    timer = LinearTimer(model) if time_linears else None
    try:
        t0 = time.perf_counter()
        nxt = step(input_ids, 0)
        t_prefill = time.perf_counter() - t0
        lin_prefill = timer.seconds if timer else 0.0
        tokens = [nxt]
        t1 = time.perf_counter()
        for pos in range(prompt_len, prompt_len + max_new_tokens - 1):
            nxt = step(nxt, pos)
            tokens.append(nxt)
        t_decode = time.perf_counter() - t1
    finally:
        if timer:
            timer.close()
    res = {"tokens": torch.cat(tokens, 1), "engine": engine, "prefill_seconds": t_prefill, "decode_seconds": t_decode,
           "native_step": engine == "lowbit" and decoder.step is not None,
           "decode_tokens": max_new_tokens - 1,
           "decode_tokens_per_s": (max_new_tokens - 1) / t_decode if max_new_tokens > 1 else None}
    if timer:  # the C++ decode step times its own projections (no module hooks run there)
        native = decoder.native_linear_seconds if engine == "lowbit" else 0.0
        res["decode_linear_seconds"] = timer.seconds - lin_prefill + native
    return res
