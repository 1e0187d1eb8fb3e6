"""Mixed precision: bits per layer from measured sensitivity, to a target average.

Each Linear is quantized alone at every candidate bit width (RTN, the base scheme's
grouping) and its cost is the KL divergence it alone adds on held-out windows
(analysis.sensitivity). Treating the costs as additive, the allocation minimises
sum_l KL_l(b_l) subject to sum_l n_l b_l <= target * sum_l n_l (n_l = the layer's
weights; bits are code bits: scales and zero points ride on top, reported apart).
A Lagrangian sweep picks, for each multiplier, every layer's best width; the
largest multiplier that fits the budget wins, and leftover budget goes to the
upgrades with the best KL saved per bit.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.analysis.sensitivity import block_linears, layer_sensitivity
from lowbit.core.scheme import Recipe, Scheme
from lowbit.errors import UserError
from lowbit.models.adapters import linear_weight


def scheme_at(base: Scheme, bits: int) -> Scheme:
    if base.number_format.kind != "int":
        raise UserError(f"mixed precision varies integer bit widths; {base.name} is not an integer scheme")
    return base.with_(format=f"int{bits}", activations=base.activations)


def measure(model: nn.Module, windows: torch.Tensor, base: Scheme, choices: tuple[int, ...],
            names: set[str] | None = None, progress: bool = True) -> dict[str, dict[int, float]]:
    """{linear: {bits: KL with only that linear quantized at those bits}}."""
    costs: dict[str, dict[int, float]] = {}
    for b in choices:
        for row in layer_sensitivity(model, windows, scheme_at(base, b), progress=progress, only=names):
            costs.setdefault(row["name"], {})[b] = max(row["kl"], 0.0)
    return costs


def allocate(costs: dict[str, dict[int, float]], sizes: dict[str, int], target_bits: float) -> dict[str, int]:
    """Bits per layer with sum n*b <= target * sum n and the least summed cost."""
    choices = sorted(next(iter(costs.values())))
    budget = target_bits * sum(sizes.values())
    if min(choices) * sum(sizes.values()) > budget + 1e-6:
        raise UserError(f"--target-bits {target_bits} is below the smallest choice ({min(choices)} bits)")

    def pick(lam: float) -> dict[str, int]:
        return {n: min(choices, key=lambda b: (c[b] + lam * sizes[n] * b, b)) for n, c in costs.items()}

    def used(a: dict[str, int]) -> float:
        return sum(sizes[n] * b for n, b in a.items())

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
                extra = sizes[n] * (nb - b)
                if nb > b and extra <= left + 1e-6:
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
    if choices is None:
        lo = max(2, int(target_bits))
        choices = (lo, min(8, lo + 1)) if lo < target_bits else (lo,)
    choices = tuple(sorted(set(choices)))
    if not min(choices) <= target_bits <= max(choices):
        raise UserError(f"--target-bits {target_bits} lies outside the bit choices {choices}")
    sizes = {n: linear_weight(m).numel() for n, m in block_linears(model).items() if recipe.scheme_for(n) is not None}
    if not sizes:
        raise UserError("the recipe quantizes no Linear inside the decoder blocks; nothing to allocate bits to")
    costs = measure(model, windows, base, choices, set(sizes), progress)
    alloc = allocate(costs, sizes, target_bits)
    recipe = Recipe(scheme=base, method=recipe.method, include=list(recipe.include), exclude=list(recipe.exclude),
                    overrides={n: scheme_at(base, b) for n, b in alloc.items()})
    avg = sum(sizes[n] * b for n, b in alloc.items()) / sum(sizes.values())
    uniform = {b: sum(c[b] for c in costs.values()) for b in choices}
    info = {"target_bits": target_bits, "average_bits": avg, "choices": list(choices),
            "predicted_kl": sum(costs[n][b] for n, b in alloc.items()),
            "predicted_kl_uniform": uniform,
            "layers_per_bits": {b: sum(1 for v in alloc.values() if v == b) for b in choices},
            "bits": alloc}
    return recipe, info
