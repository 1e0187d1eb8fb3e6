"""The classic studies, run on the model's own tensors instead of synthetic ones.

Errors are relative MSE, ||Q(x) - x||^2 / ||x||^2, averaged over the tensors given.
For activations the per-row granularity is per token; for weights it is per output
channel (both are one scale per row of the [rows, reduction] view).
"""
from __future__ import annotations

import torch

from lowbit.analysis.sensitivity import relative_error
from lowbit.core.qparams import MSE_GRID, fake_quantize
from lowbit.core.scheme import Scheme
from lowbit.core.tensor import quantize_tensor

BITS = (2, 3, 4, 8)
GRANULARITIES = ("tensor", "row", "g128", "g64", "g32")


def _gran(g: str, activation: bool) -> str:
    return ("token" if activation else "channel") if g == "row" else g


def error_vs_bits(tensors: list[torch.Tensor], *, activation: bool, asym: bool = False) -> list[dict]:
    """Mean relative MSE for every bits x granularity (absmax scales)."""
    rows = []
    for bits in BITS:
        for g in GRANULARITIES:
            gran = _gran(g, activation)
            scheme = Scheme.parse(f"int{bits}-{gran}" + ("-asym" if asym else ""))
            usable = [t for t in tensors if not gran.startswith("g") or t.shape[-1] >= int(gran[1:])]
            if not usable:
                continue
            err = sum(relative_error(t, fake_quantize(t, scheme)) for t in usable) / len(usable)
            rows.append({"bits": bits, "granularity": gran, "rel_mse": err, "tensors": len(usable)})
    return rows


def sym_vs_affine(x: torch.Tensor, bits=(8, 4, 3)) -> dict:
    """Per-token symmetric vs affine (zero point) error on one activation sample.

    On a nearly non-negative tensor (SiLU's output is >= -0.28) a symmetric grid wastes
    half its codes on values that never occur; affine spends them all on [min, max].
    """
    x = x.to(torch.float32)
    rows = []
    for b in bits:
        sym = relative_error(x, fake_quantize(x, Scheme.parse(f"int{b}-token")))
        aff = relative_error(x, fake_quantize(x, Scheme.parse(f"int{b}-token-asym")))
        rows.append({"bits": b, "symmetric": sym, "affine": aff, "affine_gain": sym / max(aff, 1e-30)})
    return {"min": float(x.min()), "max": float(x.max()), "fraction_negative": float((x < 0).float().mean()),
            "rows": rows}


def clipping_curve(x: torch.Tensor, scheme: str) -> dict:
    """Relative MSE as every group's range is shrunk by the same factor, with the optimum.

    Also the error of lowbit's per-group MSE search (each group its own factor), which
    is at most the best common factor's.
    """
    s = Scheme.parse(scheme)
    x = x.to(torch.float32)
    clips = list(MSE_GRID)
    errs = [relative_error(x, fake_quantize(x, s, clip=c)) for c in clips]
    best = min(range(len(errs)), key=errs.__getitem__)
    per_group = relative_error(x, fake_quantize(x, s.with_(scale_method="mse")))
    return {"scheme": s.name, "clip": clips, "rel_mse": errs, "best_clip": clips[best], "best_rel_mse": errs[best],
            "absmax_rel_mse": errs[0], "per_group_search_rel_mse": per_group}


def metadata_overhead(w: torch.Tensor, bits: int = 4) -> list[dict]:
    """Exact stored bits per weight (codes + fp16 scales [+ zero points]) by group size."""
    rows = []
    for gran in ("channel", "g256", "g128", "g64", "g32"):
        if gran.startswith("g") and w.shape[-1] < int(gran[1:]):
            continue
        for asym in (False, True):
            qt = quantize_tensor(w, f"int{bits}-{gran}" + ("-asym" if asym else ""))
            rows.append({"granularity": gran, "affine": asym, "bits_per_weight": qt.bits_per_weight,
                         "overhead_bits": qt.bits_per_weight - bits,
                         "rel_mse": relative_error(w.to(torch.float32), qt.dequantize().to(torch.float32))})
    return rows
