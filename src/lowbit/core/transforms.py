"""Hadamard transforms: the rotations QuaRot folds into weights and applies online at run
time (x @ H in O(n (m + 2^k)) through H's Kronecker structure)."""
from __future__ import annotations

import functools
import math

import torch

from lowbit.errors import UserError


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    Q = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.float64)


_BASES = {1: lambda: torch.ones(1, 1, dtype=torch.float64), 12: lambda: _paley(11), 20: lambda: _paley(19),
          144: lambda: torch.kron(_paley(11), _paley(11)), 240: lambda: torch.kron(_paley(11), _paley(19)),
          400: lambda: torch.kron(_paley(19), _paley(19))}


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [m, m], B [p, p]) with kron(A, B) an orthonormal Hadamard matrix of order n = m * p,
    p a power of two (Sylvester), m a product of up to two Paley orders 12 and 20."""
    for m, make in _BASES.items():
        p = n // m
        if n % m == 0 and p >= 1 and p & (p - 1) == 0:
            B = torch.ones(1, 1, dtype=torch.float64)
            while B.shape[0] < p:
                B = torch.cat([torch.cat([B, B], 1), torch.cat([B, -B], 1)], 0)
            return make() / math.sqrt(m), B / math.sqrt(p)
    raise UserError(f"no Hadamard matrix of order {n} here (orders m*2^k for m in 1, 12, 20, 144, 240, 400 are built); "
                    "rotation needs hidden, intermediate and head sizes of those forms")


def hadamard(n: int) -> torch.Tensor:
    """The dense orthonormal Hadamard matrix of order n (float64)."""
    A, B = hadamard_factors(n)
    return torch.kron(A, B)


@functools.lru_cache(maxsize=64)
def _factors_as(n: int, dtype: torch.dtype, device: torch.device):
    A, B = hadamard_factors(n)
    return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n along the last dim, using H = kron(A, B): x viewed [m, p] becomes A^T X B."""
    n = x.shape[-1]
    A, B = _factors_as(n, x.dtype, x.device)
    m, p = A.shape[0], B.shape[0]
    X = x.reshape(*x.shape[:-1], m, p)
    Y = torch.matmul(A.t(), X) if m > 1 else X
    return torch.matmul(Y, B).reshape(x.shape)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """diag(random signs) H_n: orthogonal, and as outlier-spreading as H itself."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n)


# Transforms a layer applies to its input at run time, by the name lowbit.json stores.
INPUT_TRANSFORMS = {"hadamard": hadamard_transform}


def apply_input_transform(x: torch.Tensor, name: str | None) -> torch.Tensor:
    return INPUT_TRANSFORMS[name](x) if name is not None else x
