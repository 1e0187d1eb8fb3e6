"""Weights: per-tensor quantization error, and each layer's sensitivity on its own.

Sensitivity of a Linear = what happens to the model's next-token distributions when
only that Linear is quantized (RTN, given scheme) and everything else stays float:
mean KL(float || one-layer-quantized) per token and the change in mean NLL, on a
few held-out windows. It ranks layers for mixed precision and names the fragile ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.analysis.collect import linear_kind
from lowbit.core.qparams import fake_quantize
from lowbit.core.scheme import Scheme, fitting
from lowbit.evaluate.quality import next_token_logprobs
from lowbit.models.adapters import decoder_layers, final_norm, is_linear, linear_weight, set_linear_weight
from lowbit.quantization.runner import BlockInputs

WEIGHT_SCHEMES = {
    "int8 per-tensor": "int8-tensor",
    "int8 per-channel": "int8-channel",
    "int4 per-channel": "int4-channel",
    "int4 g128": "int4-g128",
}


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linears inside the decoder blocks, by full name, in model order."""
    prefix, _ = decoder_layers(model)
    return {n: m for n, m in model.named_modules() if n.startswith(prefix + ".") and is_linear(m)}


def relative_error(x: torch.Tensor, xq: torch.Tensor) -> float:
    """||xq - x||^2 / ||x||^2 (relative MSE)."""
    return float((xq - x).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30))


def weight_errors(model: nn.Module, schemes: dict[str, str] = WEIGHT_SCHEMES) -> dict[str, dict[str, float]]:
    """{linear name: {scheme label: relative MSE}} for every Linear in the blocks."""
    parsed = {k: Scheme.parse(v) for k, v in schemes.items()}
    out = {}
    for name, mod in block_linears(model).items():
        w = linear_weight(mod).detach().to(torch.float32)
        out[name] = {label: relative_error(w, fake_quantize(w, s)) for label, s in parsed.items()}
    return out


def _logprobs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([next_token_logprobs(model, b) for b in windows.split(batch_size)])


class _Tail:
    """Log-probs recomputed from block b on: the inputs of every block are cached once
    (float), so quantizing a layer in block b reruns blocks b.. only, then the final
    norm and the LM head."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        _, self.layers = decoder_layers(model)
        self.norm, self.head = final_norm(model), model.get_output_embeddings()
        self.inputs = [BlockInputs.capture(model, windows, batch_size)]
        for layer in self.layers[:-1]:
            self.inputs.append(self.inputs[-1].run(layer))

    def logprobs(self, block: int) -> torch.Tensor:
        h = self.inputs[block]
        for layer in self.layers[block:]:
            h = h.run(layer)
        outs = [args[0] if args else kwargs["hidden_states"] for args, kwargs in h.calls]
        return torch.cat([F.log_softmax(self.head(self.norm(x))[:, :-1].float(), -1) for x in outs])


def block_index(model: nn.Module) -> dict[str, int]:
    """{full Linear name: its block number}."""
    prefix, layers = decoder_layers(model)
    return {f"{prefix}.{i}.{n}": i for i, layer in enumerate(layers) for n, m in layer.named_modules() if is_linear(m)}


@torch.no_grad()
def layer_sensitivity(model: nn.Module, windows: torch.Tensor, scheme: str = "w3a16-g64-asym", *,
                      batch_size: int = 4, progress: bool = True, only: set[str] | None = None) -> list[dict]:
    """One row per Linear (those in `only`, if given): KL and delta-NLL with only that layer
    quantized; the model is restored."""
    s = Scheme.parse(scheme).with_(activations=None)
    base = _logprobs(model, windows, batch_size)
    targets = windows[:, 1:].unsqueeze(-1)
    base_nll = float(-base.gather(-1, targets).mean())
    base_p = base.exp()
    tail = _Tail(model, windows, batch_size) if final_norm(model) is not None else None
    if tail is not None and not torch.allclose(tail.logprobs(0), base, atol=1e-4, rtol=1e-4):
        tail = None  # a head this shortcut does not model (softcapping, projections): full forwards
    block_of = block_index(model)
    rows = []
    linears = {n: m for n, m in block_linears(model).items() if only is None or n in only}
    for name, mod in tqdm(linears.items(), desc="analyze: sensitivity", unit="layer",
                          disable=not progress, leave=False):
        w = linear_weight(mod).detach().clone()
        set_linear_weight(mod, fake_quantize(w, fitting(s, w.shape[-1])))  # the type a K-quant row really gets
        try:
            lp = tail.logprobs(block_of[name]) if tail is not None else _logprobs(model, windows, batch_size)
        finally:
            set_linear_weight(mod, w)
        kl = float((base_p * (base - lp)).sum(-1).mean())
        nll = float(-lp.gather(-1, targets).mean())
        rows.append({"name": name, "kind": linear_kind(name), "kl": kl, "delta_nll": nll - base_nll})
    return rows
