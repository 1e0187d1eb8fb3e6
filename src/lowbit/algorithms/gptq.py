"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each
column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's inputs (H = X^T X over the calibration tokens).

Details that matter:
- lazy block updates: errors are applied inside a block of columns at once, and to
  the rest of the matrix once per block;
- dampening: H + percdamp * mean(diag H) * I (raised tenfold if still not PD);
- groups: a group's scale/zero point is chosen when its first column is reached,
  from the *updated* weights of the whole group (with the scheme's absmax, MSE or
  percentile choice);
- MSE scale search (schemes that ask for it) weighs each column's squared error by
  its Hessian diagonal, the output error a unit of weight error causes there;
- act-order: columns with the largest Hessian diagonal go first. We order whole
  groups (by their summed diagonal) and columns inside each group, so every group
  is processed contiguously: its parameters are chosen from up-to-date weights and
  the stored layout keeps plain contiguous groups (no g_idx), which every kernel
  and export format accepts.
"""
from __future__ import annotations

import torch

from lowbit.core.qparams import choose_qparams, fake_quant
from lowbit.core.scheme import Scheme
from lowbit.core.tensor import QuantizedTensor, check_finite, quantize_tensor


def _inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (after dampening)."""
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp = damp * 10 if damp > 0 else 1e-6
    raise RuntimeError("Hessian is not positive definite even after heavy dampening")


def _column_groups(scheme: Scheme, cols: int) -> list[range]:
    if scheme.granularity == "group":
        g = scheme.group_size
        return [range(s, min(s + g, cols)) for s in range(0, cols, g)]
    return [range(cols)]


def _column_quantizer(scheme: Scheme, scale: torch.Tensor, zero: torch.Tensor | None, rows: int):
    """w [rows] -> its quantize-dequantize on the grid, given per-row scale/zero [rows, 1]."""
    s, z = scale.reshape(rows), None if zero is None else zero.reshape(rows)
    return lambda w: fake_quant(w, s, z, scheme)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, *, blocksize: int = 128,
         percdamp: float = 0.01, act_order: bool = True, weighted_mse: bool = True,
         name: str = "weight") -> QuantizedTensor:
    """GPTQ-quantize `weight` [out, in] given the input Hessian [in, in]."""
    check_finite(weight, name)
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    H = hessian.to(torch.float32).clone()
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian {tuple(H.shape)} does not match in_features {cols}")
    dead = torch.diag(H) == 0  # inputs never active in calibration: no error to spread
    H[dead, dead] = 1.0

    groups = _column_groups(scheme, cols)
    diag = torch.diag(H)
    if act_order:
        groups = sorted(groups, key=lambda g: -float(diag[g.start:g.stop].sum())) if len(groups) > 1 else groups
        order = [torch.tensor(list(g))[torch.argsort(diag[g.start:g.stop], descending=True, stable=True)] for g in groups]
    else:
        order = [torch.tensor(list(g)) for g in groups]
    perm = torch.cat(order)
    W = W[:, perm]
    H = H[perm][:, perm]
    # MSE scale search weighted by each input's energy (diag H), where the scheme searches
    importance = torch.diag(H).clone() if weighted_mse and scheme.scale_method == "mse" else None
    U = _inverse_hessian_factor(H, percdamp)

    # Per-row (or per-tensor) parameters come from the whole weight up front; per-group
    # parameters are chosen as each group starts (below).
    grouped = scheme.granularity == "group"
    local = scheme.with_(granularity="channel", group_size=None, super_block=None, scale_bits=None) if grouped else scheme
    ng = len(groups)
    scale = torch.zeros(rows, ng) if grouped else None
    zero = torch.zeros(rows, ng) if grouped and scheme.has_zero_point else None
    if not grouped:
        imp = None if importance is None or scheme.granularity == "tensor" else torch.diag(hessian.float())
        scale, zero = choose_qparams(weight.detach().float(), scheme, imp)
    fixed = None
    if grouped and scheme.super_block:  # two-level scales tie a super-block's groups: all chosen up front
        imp = None if importance is None else torch.diag(hessian.float())
        fixed = choose_qparams(weight.detach().float(), scheme, imp)

    # Blocks hold whole groups (up to `blocksize` columns) so a group never straddles one.
    blocks, start = [], 0
    for gi, g in enumerate(groups):
        n = len(g)
        if blocks and grouped and blocks[-1][1] - blocks[-1][0] + n <= blocksize:
            blocks[-1][1] += n
            blocks[-1][2].append((gi, start, start + n))
        elif not grouped:
            for b0 in range(0, n, blocksize):
                blocks.append([b0, min(b0 + blocksize, n), [(0, b0, min(b0 + blocksize, n))]])
        else:
            blocks.append([start, start + n, [(gi, start, start + n)]])
        start += n

    Q = torch.zeros_like(W)
    for b0, b1, members in blocks:
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for gi, g0, g1 in members:
            if fixed is not None:
                og = groups[gi].start // scheme.group_size
                s_col = fixed[0][:, og:og + 1]
                z_col = None if fixed[1] is None else fixed[1][:, og:og + 1]
            elif grouped:
                imp = None if importance is None else importance[g0:g1]
                s, z = choose_qparams(W1[:, g0 - b0 : g1 - b0], local, imp)
                scale[:, gi] = s[:, 0]
                if zero is not None:
                    zero[:, gi] = z[:, 0]
                s_col, z_col = s, z
            else:
                s_col = scale.expand(rows, 1) if scale.shape[0] == 1 else scale
                z_col = None if zero is None else (zero.expand(rows, 1) if zero.shape[0] == 1 else zero)
            fq = _column_quantizer(scheme, s_col, z_col, rows)
            for i in range(g0 - b0, g1 - b0):
                w = W1[:, i]
                q = fq(w)
                Q[:, b0 + i] = q
                err = (w - q) / U1[i, i]
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
                Err[:, i] = err
        W[:, b1:] -= Err @ U[b0:b1, b1:]

    inv = torch.argsort(perm)
    Q = Q[:, inv]
    if not grouped:
        return quantize_tensor(Q, scheme, scale=scale, zero_point=zero, name=name)
    if fixed is not None:
        return quantize_tensor(Q, scheme, scale=fixed[0], zero_point=fixed[1], name=name)
    # groups were visited out of order: gather them back into stored (ascending) order
    back = torch.argsort(torch.tensor([g.start for g in groups]))
    return quantize_tensor(Q, scheme, scale=scale[:, back], zero_point=None if zero is None else zero[:, back], name=name)

