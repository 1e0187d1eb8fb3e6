"""Mixture-of-experts blocks: fused 3-D expert weights as one Linear per expert projection.

transformers 5 stores the experts of Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V2/V3,
GLM-4-MoE, GraniteMoE and gpt-oss as two 3-D parameters of one module (`gate_up_proj`
[experts, 2*I, H] and `down_proj` [experts, H, I], or transposed), with the layout
described by attributes that its `use_experts_implementation` decorator sets
(`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`, `has_post_expert_norm`) and
the activation in `_apply_gate`. lowbit replaces such a module by `RoutedExperts`: the
same computation over `experts.{e}.gate_proj / up_proj / down_proj` nn.Linear modules,
so everything that handles a Linear (calibration hooks, every algorithm, QuantLinear and
its kernels, save/load) handles each expert, and only the experts a token is routed to run.

Calibration sees exactly the tokens the router sends to each expert, and down_proj's
input is scaled by the router weight (down(w*h) = w*down(h) without a bias), so its
statistics weigh each token's error as the block's output does. `calibrate_all_tokens`
instead shows every expert every token (what some toolkits do for experts the router
rarely picks); tests/test_moe.py measures which gives the lower error.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import UserError


def is_fused_experts(m: nn.Module) -> bool:
    """A transformers experts module whose expert weights are 3-D parameters."""
    p = getattr(m, "_parameters", {})
    return (isinstance(p.get("gate_up_proj"), torch.Tensor) and isinstance(p.get("down_proj"), torch.Tensor)
            and p["gate_up_proj"].dim() == 3)


class RoutedExperts(nn.Module):
    """The experts of one MoE block as per-expert Linears; called like the fused module it
    replaces: forward(hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k])."""

    def __init__(self, fused: nn.Module, copy_weights: bool = True):
        super().__init__()
        # Llama 4 keeps its own experts module: [E, H, 2I] / [E, I, H], act(gate) * up, and the router
        # weight scales each expert's input (Llama4RoutedMoe below) rather than its output
        llama4 = type(fused).__name__ == "Llama4TextExperts"
        if getattr(fused, "has_post_expert_norm", False) or not getattr(fused, "has_gate", True) \
                or not (hasattr(fused, "_apply_gate") or llama4):
            raise UserError(f"{type(fused).__name__}: lowbit runs gated experts (gate/up, then down) as transformers' "
                            f"experts implementation describes them; this one differs")
        self.transposed = llama4 or bool(getattr(fused, "is_transposed", False))
        self.concatenated = llama4 or bool(getattr(fused, "is_concatenated", True))
        self.router_scales_input = llama4
        gate_up, down = fused.gate_up_proj, fused.down_proj
        if self.transposed:  # [E, H, 2I] / [E, I, H] -> nn.Linear's [out, in]
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        n, two_i, hidden = gate_up.shape
        inter = two_i // 2
        bias = bool(getattr(fused, "has_bias", False))
        gate_up_bias = getattr(fused, "gate_up_proj_bias", None) if bias else None
        down_bias = getattr(fused, "down_proj_bias", None) if bias else None
        device, dtype = gate_up.device, gate_up.dtype
        for e in range(n):  # children "0", "1", ...: modules named `...experts.{e}.gate_proj`, as vLLM names them
            ex = nn.Module()
            ex.gate_proj = nn.Linear(hidden, inter, bias=bias, device=device, dtype=dtype)
            ex.up_proj = nn.Linear(hidden, inter, bias=bias, device=device, dtype=dtype)
            ex.down_proj = nn.Linear(inter, hidden, bias=bias, device=device, dtype=dtype)
            if copy_weights and device.type != "meta":
                with torch.no_grad():
                    g, u = self._split(gate_up[e], dim=0)
                    ex.gate_proj.weight.copy_(g)
                    ex.up_proj.weight.copy_(u)
                    ex.down_proj.weight.copy_(down[e])
                    if bias:
                        gb, ub = self._split(gate_up_bias[e], dim=0)
                        ex.gate_proj.bias.copy_(gb)
                        ex.up_proj.bias.copy_(ub)
                        ex.down_proj.bias.copy_(down_bias[e])
            self.add_module(str(e), ex)
        self.num_experts, self.has_bias = n, bias
        # the activation stays the family's own (_apply_gate: silu(gate) * up, gpt-oss' clamped GLU, ...);
        # its module keeps no weights of its own once the 3-D parameters are gone
        for name in list(fused._parameters):
            del fused._parameters[name]
        self.activation = fused

    def _split(self, t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.concatenated:
            return t.chunk(2, dim=dim)
        return t.unflatten(dim, (-1, 2)).unbind(dim + 1)  # interleaved gate0, up0, gate1, up1, ...

    def _gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.router_scales_input:
            return self.activation.act_fn(gate) * up
        joined = torch.cat([gate, up], dim=-1) if self.concatenated else torch.stack([gate, up], dim=-1).flatten(-2)
        return self.activation._apply_gate(joined)

    # calibration only: run every expert on every token so that its Linears' input statistics
    # cover all of them (the block's output still sums the routed experts alone)
    calibrate_all_tokens = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        every = self.calibrate_all_tokens
        for e in range(self.num_experts) if every else torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue  # the "no expert" index some routers use
            token, pos = torch.where(top_k_index == e)
            w = top_k_weights[token, pos, None].to(hidden_states.dtype)
            x = hidden_states if every else hidden_states[token]
            if self.router_scales_input:  # every token in calibration: the routed ones as the block scales them
                x = x.index_copy(0, token, x[token] * w) if every else x * w
            ex = self.get_submodule(str(e))
            if every:  # calibration hooks count the routed rows apart from all they see (runner.InputStats.routed)
                for lin in (ex.gate_proj, ex.up_proj, ex.down_proj):
                    lin.routed_rows = token.numel()
            h = self._gated(ex.gate_proj(x), ex.up_proj(x))
            if every:
                y = ex.down_proj(h)[token]
                y = y if self.router_scales_input else y * w
                for lin in (ex.gate_proj, ex.up_proj, ex.down_proj):
                    del lin.routed_rows
            elif self.router_scales_input:
                y = ex.down_proj(h)
            else:
                y = ex.down_proj(h) * w if self.has_bias else ex.down_proj(h * w.to(h.dtype))
            out.index_add_(0, token, y.to(out.dtype))
        return out


class Llama4RoutedMoe(nn.Module):
    """Llama 4's MoE block (transformers' Llama4TextMoe) over RoutedExperts: the same router, shared
    expert and sum, but each expert runs on the tokens routed to it. transformers' block runs every
    expert on every token, each input scaled by the sigmoid of its router logit (zero where unrouted)."""

    def __init__(self, block: nn.Module, copy_weights: bool = True):
        super().__init__()
        self.top_k, self.hidden_dim = block.top_k, block.hidden_dim
        self.experts = RoutedExperts(block.experts, copy_weights)
        self.router, self.shared_expert = block.router, block.shared_expert

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden_states.reshape(-1, self.hidden_dim)
        _, logits = self.router(h)
        top, index = torch.topk(logits, self.top_k, dim=1)  # as Llama4Router picks them
        weights = torch.sigmoid(top.float()).to(h.dtype)
        return self.shared_expert(h) + self.experts(h, index, weights), logits


# MoE blocks whose forward calls their experts module in a way of their own: replaced whole
ROUTED_BLOCKS = {"Llama4TextMoe": Llama4RoutedMoe}


def unfuse_experts(model: nn.Module, copy_weights: bool = True) -> int:
    """Replace every fused experts module by RoutedExperts (in place); the number replaced.
    `copy_weights=False` when the per-expert weights are loaded afterwards."""
    fused = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in fused:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block = ROUTED_BLOCKS.get(type(parent).__name__)
        if block is not None and attr == "experts":
            grand_name, _, parent_attr = parent_name.rpartition(".")
            setattr(model.get_submodule(grand_name) if grand_name else model, parent_attr, block(parent, copy_weights))
        else:
            setattr(parent, attr, RoutedExperts(getattr(parent, attr), copy_weights))
    return len(fused)


# the config field that counts routed experts, per family (Mixtral/gpt-oss/Llama 4, Qwen/OLMoE, DeepSeek/GLM)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def is_moe_config(config) -> bool:
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg
    return any((cfg.get(k) or 0) > 1 for k in EXPERT_COUNT_KEYS)

