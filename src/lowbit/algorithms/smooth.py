"""Per-input-channel scales folded into the op that feeds a Linear: SmoothQuant and AWQ.

For a Linear reading x, y = x W^T = (x / s)(W diag s)^T for any positive s. The
division by s is folded into whatever produced x (an RMSNorm's weight, or the rows of
the Linear before it), so the model computes the same function in float while the
Linear now sees flatter activations (SmoothQuant: outliers migrate into the weights,
which per-channel weight scales absorb) or has its salient channels enlarged before
rounding (AWQ: less relative rounding error where the activations are large).

Folding places in a Llama block:
    input_layernorm -> q, k, v        post_attention_layernorm -> gate, up
    v_proj rows -> o_proj columns     up_proj rows -> down_proj columns
With grouped-query attention one v row feeds several o columns (one per query head
of its group), so those columns share one scale. In a mixture-of-experts block the
post-attention norm feeds the router and every expert (and shared expert): one scale per
input channel for all of them, the router's columns multiplied too (it stays float, so
routing is unchanged); each expert folds its own up_proj rows into its down_proj.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.core.qparams import fake_quantize
from lowbit.core.scheme import Scheme
from lowbit.errors import UserError
from lowbit.models.adapters import block_mlp, linear_weight, llama_parts, set_linear_weight
from lowbit.models.moe import RoutedExperts
from lowbit.quantization.runner import InputStats

AWQ_GRID = tuple(i / 20 for i in range(20))  # exponents 0, 0.05, ..., 0.95 (AWQ's grid)


@dataclass
class FoldGroup:
    """Linears that read one tensor, and the op whose output that tensor is."""

    prev: nn.Module
    prev_is_norm: bool
    readers: dict[str, nn.Module]  # every Linear reading the tensor, by full name
    kv_groups: int = 1  # o_proj after v_proj: query heads per key/value head
    head_dim: int = 0
    also: tuple[nn.Module, ...] = ()  # other readers ([out, in] weights, e.g. a MoE router): folded, never scored

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """A scale in prev's output space -> the readers' input space (GQA: repeat per query head)."""
        if self.kv_groups == 1:
            return s
        kv = s.numel() // self.head_dim
        return s.reshape(kv, 1, self.head_dim).expand(kv, self.kv_groups, self.head_dim).reshape(-1)

    def reduce(self, x: torch.Tensor, how: str = "amax") -> torch.Tensor:
        """A per-input-channel statistic of the readers -> prev's output space."""
        if self.kv_groups == 1:
            return x
        x = x.reshape(-1, self.kv_groups, self.head_dim)
        return (x.amax(1) if how == "amax" else x.mean(1)).reshape(-1)

    def fold(self, s: torch.Tensor) -> torch.Tensor:
        """Divide prev's output by s and multiply the readers' columns by it; returns s in input space."""
        s = s.to(torch.float32)
        s_in = self.expand(s)
        with torch.no_grad():
            if self.prev_is_norm:
                self.prev.weight.div_(s.to(self.prev.weight.dtype))
                if getattr(self.prev, "bias", None) is not None:
                    self.prev.bias.div_(s.to(self.prev.bias.dtype))
            else:
                w = linear_weight(self.prev).float()
                set_linear_weight(self.prev, w / s[:, None])
                if self.prev.bias is not None:
                    self.prev.bias.div_(s.to(self.prev.bias.dtype))
            for m in self.readers.values():
                set_linear_weight(m, linear_weight(m).float() * s_in[None, :])
            for m in self.also:
                m.weight.mul_(s_in[None, :].to(m.weight.dtype))
        return s_in


def fold_groups(block: nn.Module, full_names: dict[int, str], heads: tuple[int, int, int], what: str) -> list[FoldGroup]:
    """The fold places of a Llama-style block (or its mixture-of-experts kin); `full_names`
    maps id(module) -> its model-level name."""
    mlp = block_mlp(block)
    experts = getattr(mlp, "experts", None)
    p = llama_parts(block, what, mlp=not isinstance(experts, RoutedExperts))
    n, kv, hd = heads

    def named(*mods):
        return {full_names.get(id(m), f"<{i}>"): m for i, m in enumerate(mods)}

    groups = [
        FoldGroup(p["input_norm"], True, named(p["q"], p["k"], p["v"])),
        FoldGroup(p["v"], False, named(p["o"]), kv_groups=n // kv, head_dim=hd),
    ]
    if not isinstance(experts, RoutedExperts):
        return groups + [FoldGroup(p["post_norm"], True, named(p["gate"], p["up"])),
                         FoldGroup(p["up"], False, named(p["down"]))]
    mlps = [experts.get_submodule(str(e)) for e in range(experts.num_experts)]
    mlps += [m for a in ("shared_expert", "shared_experts") if isinstance(m := getattr(mlp, a, None), nn.Module)]
    if not all(isinstance(getattr(m, f"{q}_proj", None), nn.Linear) for m in mlps for q in ("gate", "up", "down")):
        raise UserError(f"{what} folds into experts with gate/up/down_proj Linears; {type(mlp).__name__} has others")
    router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)  # Llama 4 and gpt-oss call it router
    if not isinstance(getattr(router, "weight", None), torch.Tensor) or router.weight.dim() != 2:
        raise UserError(f"{what}: {type(mlp).__name__} has no router weight to fold its scale into")
    also = (router,) + tuple(m for a in ("shared_expert_gate",) if isinstance(m := getattr(mlp, a, None), nn.Linear))
    readers = named(*(getattr(m, f"{q}_proj") for m in mlps for q in ("gate", "up")))
    return groups + [FoldGroup(p["post_norm"], True, readers, also=also)] + \
        [FoldGroup(m.up_proj, False, named(m.down_proj)) for m in mlps]


def _group_stats(g: FoldGroup, stats: dict[str, InputStats]) -> InputStats | None:
    """The statistics of the tensor the group reads: its reader that saw the most rows (a MoE
    router's input: every expert shows all tokens by default, a shared expert always does)."""
    seen = [stats[n] for n in g.readers if stats.get(n) is not None]
    return max(seen, key=lambda st: st.n) if seen else None


def smoothquant_scales(g: FoldGroup, st: InputStats, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), in prev's output space."""
    w = torch.cat([linear_weight(m).float() for m in g.readers.values()])
    wmax = g.reduce(w.abs().amax(0)).clamp(min=1e-5)
    amax = g.reduce(st.amax)
    s = amax.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return torch.where(amax > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def awq_scales(g: FoldGroup, st: InputStats, schemes: dict[str, Scheme]) -> tuple[torch.Tensor, float]:
    """AWQ's search: s = mean|x|^a (optionally over mean|w|^(1-a)), normalised, for a on a
    grid; keep the one whose quantized readers give the least output error on the
    calibration inputs, tr(E H E^T) with E the weight error after unscaling."""
    ws = {n: linear_weight(m).float() for n, m in g.readers.items() if n in schemes}
    x_mean = g.reduce(st.absmean, "mean").clamp(min=1e-6)
    w_all = torch.cat(list(ws.values()))
    w_norm = w_all.abs() / w_all.abs().amax(1, keepdim=True).clamp(min=1e-8)
    w_mean = g.reduce(w_norm.mean(0), "mean").clamp(min=1e-6)
    H = st.H
    best, best_loss = torch.ones_like(x_mean), float("inf")
    plain = {n: s.with_(scale_method="absmax") for n, s in schemes.items()}
    for duo in (False, True):
        for a in AWQ_GRID:
            s = x_mean.pow(a) / (w_mean.pow(1 - a) if duo else 1.0)
            s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
            s_in = g.expand(s)
            loss = 0.0
            for n, w in ws.items():
                e = w - fake_quantize(w * s_in, plain[n]) / s_in
                loss += float(((e @ H) * e).sum())
            if loss < best_loss:
                best, best_loss = s, loss
    return best, best_loss


def make_prepare(method: str, schemes: dict[str, Scheme], heads: tuple[int, int, int], alpha: float = 0.5):
    """A runner `prepare` hook that folds SmoothQuant or AWQ scales into each block.

    Returns (prepare, log): log collects one line of figures per fold group."""
    log: list[dict] = []

    @torch.no_grad()
    def prepare(block: nn.Module, names: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
        ids = {id(m): n for n, m in names.items()}
        for g in fold_groups(block, ids, heads, method):
            st = _group_stats(g, stats)
            if st is None or not any(n in schemes for n in g.readers):
                continue
            if method == "smoothquant":
                s, loss = smoothquant_scales(g, st, alpha), None
            else:
                s, loss = awq_scales(g, st, {n: schemes[n] for n in g.readers if n in schemes})
            s_in = g.fold(s)
            for n in g.readers:
                if stats.get(n) is not None:
                    stats[n].rescale(s_in)
            log.append({"readers": list(g.readers), "scale_max": float(s.max()), "scale_min": float(s.min()),
                        **({"loss": loss} if loss is not None else {})})

    return prepare, log
