"""Quality against the original: perplexity, KL divergence, top-1 agreement.

Perplexity is over non-overlapping windows (every token but each window's first is
predicted from its own window only). KL(P_base || P_model) and top-1 agreement are
per predicted token against a baseline model run on the same windows; several
models are scored in one pass so the baseline runs once per batch.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class _Acc:
    def __init__(self):
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.tokens = 0
        self.seconds = 0.0

    def result(self, with_baseline: bool) -> dict:
        return {
            "perplexity": math.exp(self.nll / self.tokens),
            "kl_divergence": self.kl / self.tokens if with_baseline else None,
            "top1_agreement": self.agree / self.tokens if with_baseline else None,
            "tokens": self.tokens,
            "eval_seconds": self.seconds,
        }


def next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log P(token t+1 | tokens <= t) for every position but the last, float32."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def kl_and_agreement(base: torch.Tensor, lp: torch.Tensor, base_p: torch.Tensor | None = None) -> tuple[float, int]:
    """Log-probs `lp` against the baseline's `base` (vocabulary last), summed over every
    position: KL(P_base || P), and the number of positions whose top-1 tokens agree.
    `base_p`: base.exp(), where one baseline scores several models."""
    base_p = base.exp() if base_p is None else base_p
    return float((base_p * (base - lp)).sum()), int((lp.argmax(-1) == base.argmax(-1)).sum())


@torch.no_grad()
def evaluate_many(models: dict[str, nn.Module], windows: torch.Tensor, baseline: nn.Module | None = None, *,
                  batch_size: int = 2, progress: bool = True) -> dict[str, dict]:
    """{name: metrics} for every model on the same windows."""
    accs = {name: _Acc() for name in models}
    for batch in tqdm(windows.split(batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False):
        targets = batch[:, 1:]
        base = next_token_logprobs(baseline, batch) if baseline is not None else None
        base_p = base.exp() if base is not None else None
        for name, model in models.items():
            t = time.time()
            lp = base if model is baseline else next_token_logprobs(model, batch)
            acc = accs[name]
            acc.seconds += time.time() - t
            acc.nll += float(-lp.gather(-1, targets.unsqueeze(-1)).sum())
            acc.tokens += targets.numel()
            if base is not None:
                kl, agree = kl_and_agreement(base, lp, base_p)
                acc.kl, acc.agree = acc.kl + kl, acc.agree + agree
    return {name: acc.result(baseline is not None) for name, acc in accs.items()}
