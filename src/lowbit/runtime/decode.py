"""lowbit's own decode loop for Llama-family models (Llama, Mistral, Qwen2, Qwen3) and their
mixture-of-experts kin (Mixtral, Qwen3-MoE).

At batch 1 a 4-bit model's Linears take a few milliseconds per token; transformers'
module tree around them (hooks, masks rebuilt every step, per-layer rotary, cache
objects, kwargs plumbing) took twice that on 2 CPU cores, equally for every dtype.
This loop runs the same modules' weights with nothing else in the way: a cos/sin
table made once by the model's own rotary module, a preallocated fp32 KV cache,
grouped-query attention without repeat_kv copies, logits for the last position only.
Every Linear runs its own module's forward, so QuantLinear picks the same kernel as
under transformers; a mixture-of-experts block runs its own router and lowbit's
RoutedExperts (only the experts a token is sent to). Batch 1; tests hold it to
transformers' forward.

One token at a time (decode proper), a bf16 model whose projections all run lowbit's
int4/int8 kernels or are bf16 Linears takes the whole layer stack in C++
(kernels/csrc/decode_step.cpp: the same numerics, none of the ~3000 ATen calls per
token); prompts, other dtypes and mixture-of-experts blocks run the loop below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this model cannot use the decoder, or None when it can."""
    cfg = model.config
    if cfg.model_type not in FAMILIES:
        return f"model type {cfg.model_type!r} (lowbit's decoder knows {', '.join(FAMILIES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (expects silu)"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        return f"rope type {rope['rope_type']!r} (its frequencies change with the length)"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "layer_types", None) and any(
            t != "full_attention" for t in cfg.layer_types):
        return "sliding-window attention layers"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' Llama RMSNorm: normalise in fp32, round to the activation dtype, then scale
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _is_moe(block: nn.Module) -> bool:
    return hasattr(block.mlp, "experts")


def _projections(block: nn.Module) -> list[nn.Module]:
    """q, k, v, o, then gate, up, down unless the MLP is a mixture of experts."""
    att, mlp = block.self_attn, block.mlp
    mlp_projs = [] if _is_moe(block) else [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return [att.q_proj, att.k_proj, att.v_proj, att.o_proj, *mlp_projs]


class _Layer:
    """One decoder block's weights as plain callables (no module hooks, no kwargs)."""

    def __init__(self, block: nn.Module, hooks: bool):
        att, mlp = block.self_attn, block.mlp
        call = (lambda m: m) if hooks else (lambda m: m.forward)
        projs = [call(m) for m in _projections(block)]
        self.q, self.k, self.v, self.o = projs[:4]
        # a mixture-of-experts block is called whole: its router, then the routed experts
        self.moe = call(mlp) if _is_moe(block) else None
        if self.moe is None:
            self.gate, self.up, self.down = projs[4:]
        self.norm1 = (block.input_layernorm.weight, block.input_layernorm.variance_epsilon)
        self.norm2 = (block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon)
        qn, kn = getattr(att, "q_norm", None), getattr(att, "k_norm", None)  # Qwen3 normalises q/k per head
        self.qk_norm = ((qn.weight, qn.variance_epsilon), (kn.weight, kn.variance_epsilon)) if qn is not None else None


def _native_proj(mod, linear: nn.Module):
    """`linear` as the C++ step's projection, or None where it cannot run it."""
    from lowbit.runtime.kernels import native
    from lowbit.runtime.qlinear import QuantLinear

    bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
    if isinstance(linear, QuantLinear):
        kernel, st = linear.packed_kernel(torch.bfloat16, torch.device("cpu"))
        if kernel is not None and kernel.name == "lowbit-int4":
            return mod.proj_int4(st["codes"], st["scale"], st["zero"], st["n"], linear.in_features, st["group"],
                                 st["mode"], st["zconst"], bias, native.gemv_act_int8())
        if kernel is not None and kernel.name == "lowbit-int8":
            return mod.proj_int8(st["w"], st["scale"], bias, native.gemv_act_int8(), st.get("scale_act"))
        return None
    if type(linear) is nn.Linear and linear.weight.dtype == torch.bfloat16:
        return mod.proj_dense(linear.weight.detach(), bias)
    return None


def _native_step(model: nn.Module, dec: "Decoder"):
    """The C++ decode step over every layer of `model`, or None where some layer needs the loop."""
    from lowbit.runtime.kernels import native

    if dec.dtype != torch.bfloat16 or dec.embed.weight.device.type != "cpu" or not native.available():
        return None
    mod = native.module()
    step = mod.DecodeStep(model.config.hidden_size, dec.n_heads, dec.n_kv, dec.head_dim, dec.max_len)
    norm = lambda n: mod.Norm(n.weight.detach(), n.variance_epsilon) if n is not None else mod.Norm(None, 0.0)  # noqa: E731
    for block in model.model.layers:
        att = block.self_attn
        if _is_moe(block) or block.input_layernorm.weight.dtype != torch.bfloat16:
            return None
        projs = [_native_proj(mod, m) for m in _projections(block)]
        if any(p is None for p in projs):
            return None
        step.add_layer(norm(block.input_layernorm), norm(block.post_attention_layernorm),
                       norm(getattr(att, "q_norm", None)), norm(getattr(att, "k_norm", None)), projs)
    head = _native_proj(mod, model.get_output_embeddings())
    if head is not None and model.model.norm.weight.dtype == torch.bfloat16:
        step.set_head(norm(model.model.norm), head)  # run() returns logits
        dec.native_head = True
    return step


class Decoder:
    """Batch-1 decoding with a static fp32 KV cache of `max_len` positions.

    `hooks=True` calls the Linears through nn.Module.__call__, so forward hooks (the
    benchmark's Linear timer) see them; without, their forward is called directly. The C++
    step (`native`, where the model allows it) runs single tokens; it times its projections
    itself when `hooks` is set (`native_linear_seconds`).
    """

    def __init__(self, model: nn.Module, max_len: int, *, hooks: bool = False, native: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise UserError(f"lowbit's decoder does not run this model: {reason}; use transformers' generate")
        cfg, inner = model.config, model.model
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "model_type", "") == "mistral" and max_len > window:
            raise UserError(f"lowbit's decoder does not run this model past its {window}-token sliding window "
                            f"({max_len} positions asked for); use transformers' generate")
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = self.head_dim ** -0.5
        self.max_len = max_len
        self.layers = [_Layer(b, hooks) for b in inner.layers]
        self.embed = model.get_input_embeddings()
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        head = model.get_output_embeddings()
        self.lm_head = head if hooks else head.forward
        self.dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.bfloat16
        with torch.no_grad():  # the model's own rotary module: its rope type, scaling and attention factor
            pos = torch.arange(max_len)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        self.cos, self.sin = cos[0, :, None, :].float(), sin[0, :, None, :].float()  # [max_len, 1, head_dim]
        # queries take the softmax scaling with their rotation: one multiply fewer per layer
        self.q_cos, self.q_sin = self.cos * self.scaling, self.sin * self.scaling
        shape = (len(self.layers), self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=torch.float32)
        self.v_cache = torch.zeros(shape, dtype=torch.float32)
        self.pos = 0
        self.native_head = False  # the C++ step runs the final norm and head too
        self.step = _native_step(model, self) if native else None
        if self.step is not None:
            self.step.timed = hooks

    @property
    def native_linear_seconds(self) -> float:
        return self.step.linear_seconds if self.step is not None else 0.0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids` ([1, T] or [T]) at the current position; logits of the last one, [vocab]."""
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise UserError(f"lowbit's decoder runs batch 1; got {ids.shape[0]} sequences")
        ids = ids.reshape(-1)
        t, pos = ids.numel(), self.pos
        if pos + t > self.max_len:
            raise UserError(f"the KV cache holds {self.max_len} positions; {pos + t} asked for")
        x = self.embed(ids)
        if t == 1 and self.step is not None:
            x = self.step.run(x[0], pos, self.q_cos, self.q_sin, self.cos, self.sin, self.k_cache, self.v_cache)
            self.pos = pos + t
            if self.native_head:
                return x
            x = x[None]
        else:
            x = self._layers(x, pos)
            self.pos = pos + t
        return self.lm_head(_rms_norm(x[-1:], *self.norm))[0]

    def next_token(self, ids: torch.Tensor) -> torch.Tensor:
        """The greedy next token after `ids` ([1, 1]); torch.argmax's choice."""
        logits = self.forward(ids)
        if self.step is not None and logits.dtype == torch.bfloat16:
            from lowbit.runtime.kernels import native

            return torch.tensor([[native.module().argmax(logits)]])
        return logits.argmax().view(1, 1)

    def _layers(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        t = x.shape[0]
        rope = (self.q_cos[pos:pos + t], self.q_sin[pos:pos + t], self.cos[pos:pos + t], self.sin[pos:pos + t])
        mask = None
        if t > 1:  # query i sees cache slots up to pos + i
            mask = torch.ones(t, pos + t, dtype=torch.bool).tril(pos)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, _rms_norm(x, *layer.norm1), rope, mask)
            h = _rms_norm(x, *layer.norm2)
            x = x + (layer.moe(h[None])[0] if layer.moe is not None else layer.down(F.silu(layer.gate(h)) * layer.up(h)))
        return x

    def _attention(self, i: int, layer: _Layer, h: torch.Tensor, rope, mask) -> torch.Tensor:
        t, d, g = h.shape[0], self.head_dim, self.n_heads // self.n_kv
        q = layer.q(h).view(t, self.n_heads, d)
        k = layer.k(h).view(t, self.n_kv, d)
        v = layer.v(h).view(t, self.n_kv, d)
        if layer.qk_norm is not None:
            q, k = _rms_norm(q, *layer.qk_norm[0]), _rms_norm(k, *layer.qk_norm[1])
        q = _rotate(q.float(), rope[0], rope[1])
        end = self.pos + t
        self.k_cache[i, :, self.pos:end] = _rotate(k.float(), rope[2], rope[3]).transpose(0, 1)
        self.v_cache[i, :, self.pos:end] = v.float().transpose(0, 1)
        keys, values = self.k_cache[i, :, :end], self.v_cache[i, :, :end]
        # query heads j*g .. j*g+g-1 share KV head j: [n_kv, g*t, d] against [n_kv, end, d]
        qg = q.view(t, self.n_kv, g, d).permute(1, 2, 0, 3).reshape(self.n_kv, g * t, d)
        scores = torch.bmm(qg, keys.transpose(1, 2))
        if mask is not None:
            scores = scores.view(self.n_kv, g, t, end).masked_fill(~mask, float("-inf")).view(self.n_kv, g * t, end)
        out = torch.bmm(torch.softmax(scores, -1), values)
        out = out.view(self.n_kv, g, t, d).permute(2, 0, 1, 3).reshape(t, self.n_heads * d)
        return layer.o(out.to(self.dtype))

    def reset(self) -> None:
        self.pos = 0  # stale slots past pos are never read: attention stops at pos + t
