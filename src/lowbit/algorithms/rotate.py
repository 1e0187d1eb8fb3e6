"""Hadamard rotations folded into the weights (QuaRot), so W4A4 becomes usable.

The residual stream x is replaced by xQ for a random orthogonal Q (a Hadamard matrix
with random signs): embeddings become E Q, every Linear reading the stream W Q, every
Linear writing it Q^T W. RMSNorm commutes with Q once its weight is folded into the
Linears after it (||xQ|| = ||x||), so the float model computes the same function. What
changes is the distribution: a Hadamard rotation spreads each outlier channel over all
channels, so per-token activation scales stop being dictated by a few huge channels.

Two more rotations QuaRot adds: an online Hadamard on down_proj's input (the SwiGLU
output has the worst outliers and no norm to fold into; the weight is stored rotated
and the input is rotated at run time, O(n (m + 2^k)) with the Kronecker structure),
and a per-head Hadamard between v_proj and o_proj (folded on both sides, free).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.transforms import apply_input_transform, hadamard, random_hadamard
from lowbit.errors import UserError
from lowbit.models.adapters import attention_heads, decoder_layers, final_norm, is_rms_norm, llama_parts


class OnlineHadamardLinear(nn.Linear):
    """A Linear that rotates its input by H before multiplying (its weight holds W H)."""

    input_transform = "hadamard"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(apply_input_transform(x, self.input_transform), self.weight, self.bias)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> dict:
    """Rotate a Llama-style model in place (same function in float). Returns what it did."""
    _, layers = decoder_layers(model)
    norm = final_norm(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if norm is None or not is_rms_norm(norm) or head is None or emb is None:
        raise UserError(f"rotate needs a Llama-style model (RMSNorm, input and output embeddings); {type(model).__name__} is not one")
    parts = [llama_parts(b, "rotate") for b in layers]
    n_heads, n_kv, hd = attention_heads(model)
    d = emb.weight.shape[1]
    inter = parts[0]["down"].in_features
    Q = random_hadamard(d, seed)
    H_hd, H_inter = hadamard(hd), hadamard(inter)

    def w64(m):
        return m.weight.data.to(torch.float64)

    # 1. fold every RMSNorm's weight into the Linears after it
    for p in parts:
        for norm_name, readers in (("input_norm", ("q", "k", "v")), ("post_norm", ("gate", "up"))):
            g = p[norm_name].weight.data.to(torch.float64)
            for r in readers:
                _set(p[r].weight, w64(p[r]) * g[None, :])
            p[norm_name].weight.data.fill_(1.0)
    # the head gets its own copy (it was tied to the embedding; now they differ)
    head_w = w64(head) * norm.weight.data.to(torch.float64)[None, :]
    norm.weight.data.fill_(1.0)
    head.weight = nn.Parameter(head_w.to(head.weight.dtype), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False

    # 2. rotate the residual stream
    _set(emb.weight, w64(emb) @ Q)
    _set(head.weight, head.weight.data.to(torch.float64) @ Q)
    for p in parts:
        for r in ("q", "k", "v", "gate", "up"):
            _set(p[r].weight, w64(p[r]) @ Q)
        for wr in ("o", "down"):
            _set(p[wr].weight, Q.t() @ w64(p[wr]))
            if p[wr].bias is not None:
                _set(p[wr].bias, p[wr].bias.data.to(torch.float64) @ Q)

    # 3. per-head Hadamard between v and o: v's rows per kv head, o's columns per query head
    for p in parts:
        wv = w64(p["v"]).reshape(n_kv, hd, -1)
        _set(p["v"].weight, torch.einsum("ji,kjc->kic", H_hd, wv).reshape(n_kv * hd, -1))
        if p["v"].bias is not None:
            _set(p["v"].bias, (p["v"].bias.data.to(torch.float64).reshape(n_kv, hd) @ H_hd).reshape(-1))
        wo = w64(p["o"]).reshape(-1, n_heads, hd)
        _set(p["o"].weight, (wo @ H_hd).reshape(-1, n_heads * hd))

    # 4. online Hadamard on down_proj's input: the weight is stored as W H
    for p, block in zip(parts, layers):
        down = p["down"]
        new = OnlineHadamardLinear(down.in_features, down.out_features, bias=down.bias is not None,
                                   dtype=down.weight.dtype, device=down.weight.device)
        new.weight.data = (w64(down) @ H_inter).to(down.weight.dtype)
        if down.bias is not None:
            new.bias.data = down.bias.data.clone()
        new.requires_grad_(False)
        block.mlp.down_proj = new
    return {"seed": seed, "hidden": d, "intermediate": inter, "head_dim": hd,
            "online_hadamard": "mlp.down_proj"}
