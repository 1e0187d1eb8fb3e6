"""Mixed precision: bits per layer from measured sensitivity, to a target average.

Each Linear is quantized alone at every candidate bit width (RTN, the base scheme's
grouping) and its cost is the KL divergence it alone adds on held-out windows
(analysis.sensitivity). Treating the costs as additive, the allocation minimises
sum_l KL_l(b_l) subject to sum_l n_l b_l <= target * sum_l n_l (n_l = the layer's
weights; bits are code bits: scales and zero points ride on top, reported apart).
A Lagrangian sweep picks, for each multiplier, every layer's best width; the
largest multiplier that fits the budget wins, and leftover budget goes to the
upgrades with the best KL saved per bit. The choices may instead be GGUF types
(llama.cpp-style mixes, chosen by measurement): then a layer's cost counts every
bit the type stores (Q4_K 4.5, Q6_K 6.5625), at the type its rows really get.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.analysis.sensitivity import block_linears, layer_sensitivity
from lowbit.core.qparams import num_groups
from lowbit.core.scheme import GGUF_PRESETS, Recipe, Scheme, fitting
from lowbit.core.tensor import scale_nbytes
from lowbit.errors import UserError
from lowbit.models.adapters import linear_weight


def scheme_at(base: Scheme, choice: int | str) -> Scheme:
    """A bit width of the base integer scheme, or a GGUF type by name (q4_k, q6_k, ...)."""
    if isinstance(choice, str):
        if choice not in GGUF_PRESETS:
            raise UserError(f"choice {choice!r}: give bit widths (3,4) or GGUF types ({', '.join(GGUF_PRESETS)})")
        return GGUF_PRESETS[choice]
    if base.number_format.kind != "int":
        raise UserError(f"mixed precision varies integer bit widths; {base.name} is not an integer scheme")
    return base.with_(format=f"int{choice}", activations=base.activations)


def width(choice: int | str, cols: int) -> float:
    """Bits per weight a choice costs: code bits for a bit width; for a GGUF type, all it stores
    (scales included, llama.cpp's bpw), at the type a row of `cols` really gets."""
    if isinstance(choice, int):
        return float(choice)
    s = fitting(GGUF_PRESETS[choice], cols)
    rows, groups = num_groups(s, 1, cols)
    return s.bits + 8 * scale_nbytes(s, rows, groups, cols) / cols


def measure(model: nn.Module, windows: torch.Tensor, base: Scheme, choices: tuple,
            names: set[str] | None = None, progress: bool = True) -> dict[str, dict]:
    """{linear: {choice: KL with only that linear quantized at that choice}}."""
    costs: dict[str, dict] = {}
    for b in choices:
        for row in layer_sensitivity(model, windows, scheme_at(base, b), progress=progress, only=names):
            costs.setdefault(row["name"], {})[b] = max(row["kl"], 0.0)
    return costs


def allocate(costs: dict[str, dict], sizes: dict[str, int], target_bits: float,
             widths: dict[str, dict] | None = None) -> dict:
    """A choice per layer with sum n*width <= target * sum n and the least summed cost.
    `widths[layer][choice]` is what a choice costs per weight (default: the choice, a bit width)."""
    choices = sorted(next(iter(costs.values())), key=lambda c: (str(type(c)), c))
    w = widths or {n: {c: float(c) for c in choices} for n in costs}
    budget = target_bits * sum(sizes.values())

    def used(a: dict) -> float:
        return sum(sizes[n] * w[n][b] for n, b in a.items())

    if used({n: min(choices, key=lambda c: w[n][c]) for n in costs}) > budget + 1e-6:
        raise UserError(f"--target-bits {target_bits} is below the smallest choice ({min(choices, key=str)})")

    def pick(lam: float) -> dict:
        return {n: min(choices, key=lambda b: (c[b] + lam * sizes[n] * w[n][b], w[n][b])) for n, c in costs.items()}

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget:
        hi *= 2
    for _ in range(60):  # the smallest multiplier that fits the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(pick(mid)) > budget else (lo, mid)
    alloc = pick(hi)
    # fill what is left, best KL saved per added bit first
    while True:
        left = budget - used(alloc)
        best, gain = None, 0.0
        for n, b in alloc.items():
            for nb in choices:
                extra = sizes[n] * (w[n][nb] - w[n][b])
                if extra > 0 and extra <= left + 1e-6:
                    g = (costs[n][b] - costs[n][nb]) / extra
                    if g > gain:
                        best, gain = (n, nb), g
        if best is None:
            return alloc
        alloc[best[0]] = best[1]


def mixed_recipe(model: nn.Module, windows: torch.Tensor, recipe: Recipe, target_bits: float,
                 choices: tuple[int, ...] | None = None, progress: bool = True) -> tuple[Recipe, dict]:
    """A copy of `recipe` whose overrides give each Linear it quantizes its bits, and the figures behind it."""
    base = recipe.scheme
    gguf = base.name in GGUF_PRESETS
    if not gguf and target_bits > 8:
        raise UserError(f"--target-bits {target_bits}: integer code widths stop at 8 (above 8 bits per weight "
                        "is for GGUF types, whose scales count: --scheme q8_0 or q6_k)")
    if choices is None:
        choices = _default_choices(target_bits, gguf)
    choices = tuple(sorted(set(choices), key=lambda c: (str(type(c)), c)))
    modules = {n: linear_weight(m) for n, m in block_linears(model).items() if recipe.scheme_for(n) is not None}
    if not modules:
        raise UserError("the recipe quantizes no Linear inside the decoder blocks; nothing to allocate bits to")
    sizes = {n: w.numel() for n, w in modules.items()}
    widths = {n: {c: width(c, w.shape[1]) for c in choices} for n, w in modules.items()}
    total = sum(sizes.values())
    lo, hi = (sum(sizes[n] * f(widths[n].values()) for n in sizes) / total for f in (min, max))
    if not lo - 1e-9 <= target_bits <= hi + 1e-9:
        raise UserError(f"--target-bits {target_bits} lies outside what the choices {choices} reach ({lo:.3f}..{hi:.3f})")
    costs = measure(model, windows, base, choices, set(sizes), progress)
    alloc = allocate(costs, sizes, target_bits, widths)
    recipe = Recipe(scheme=base, method=recipe.method, include=list(recipe.include), exclude=list(recipe.exclude),
                    overrides={n: scheme_at(base, b) for n, b in alloc.items()})
    avg = sum(sizes[n] * widths[n][b] for n, b in alloc.items()) / total
    uniform = {b: sum(c[b] for c in costs.values()) for b in choices}
    info = {"target_bits": target_bits, "average_bits": avg, "choices": list(choices),
            "bits_counted": "all stored bits (GGUF bpw)" if isinstance(choices[0], str) else "code bits",
            "predicted_kl": sum(costs[n][b] for n, b in alloc.items()),
            "predicted_kl_uniform": uniform,
            "layers_per_bits": {b: sum(1 for v in alloc.values() if v == b) for b in choices},
            "bits": alloc}
    return recipe, info


# GGUF types by bits per weight, for --target-bits over a GGUF base scheme
GGUF_LADDER = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")


def _default_choices(target_bits: float, gguf: bool) -> tuple:
    if gguf:  # the K-quant ladder around the target (their fallbacks cover rows 256 does not divide)
        below = [c for c in GGUF_LADDER if width(c, 256) <= target_bits]
        above = [c for c in GGUF_LADDER if width(c, 256) >= target_bits]
        return tuple({*(below[-1:] or GGUF_LADDER[:1]), *(above[:1] or GGUF_LADDER[-1:])})
    lo = max(2, int(target_bits))
    return (lo, min(8, lo + 1)) if lo < target_bits else (lo,)
