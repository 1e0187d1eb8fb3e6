"""Quantization-aware fine-tuning: fake-quantized forward, straight-through gradients.

Start from the round-to-nearest (or already folded) model. Each quantized Linear
gets a latent float weight W and its learnable scales s (zero points stay fixed):
the forward uses w_hat = s * (clamp(round(W / s) + z) - z), and round passes its
gradient straight through, so both W and s learn (LSQ-style). The loss is the KL
divergence from the float model's next-token distribution on calibration text
(distillation: no labels needed, and it asks for the float model's behaviour, not
the text's). At the end the codes are re-encoded from the trained W and s: the
same QuantizedTensor as every other method.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.qparams import group_view, quantize_activations, ungroup
from lowbit.core.tensor import QuantizedTensor, quantize_tensor
from lowbit.core.transforms import apply_input_transform
from lowbit.errors import UserError
from lowbit.runtime.qlinear import replace_module


@dataclass
class QATOptions:
    steps: int = 64
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-4  # latent weights (measured on the embedded model at W3-g64: 2e-5 moves too few codes)
    scale_lr: float = 3e-3  # scales (relative: they are trained in log space)
    seed: int = 0


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class FakeQuantLinear(nn.Module):
    """Linear with a latent weight and learnable log-scales, fake-quantized on every forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, qt: QuantizedTensor, input_transform=None,
                 act_scale: torch.Tensor | None = None):
        super().__init__()
        s = qt.scheme
        if s.number_format.kind != "int" or s.float_zero:
            raise UserError(f"QAT trains integer grids with integer zero points; {s.name} is not one")
        self.scheme = s
        self.shape = tuple(weight.shape)
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.log_scale = nn.Parameter(qt.scales().log().clone())
        z = qt.zero_points()
        self.register_buffer("zero", z if z is not None else None)
        self.bias = bias
        self.input_transform = input_transform
        self.act_scale = act_scale  # static activation schemes: the scale calibrated before training
        lo, hi = s.number_format.int_range(s.symmetric)
        self.qmin, self.qmax = lo, hi

    def weight_hat(self) -> torch.Tensor:
        rows, cols = self.shape
        wg = group_view(self.weight, self.scheme).nan_to_num(0.0)
        s = self.log_scale.exp().unsqueeze(-1)
        z = self.zero.unsqueeze(-1) if self.zero is not None else 0.0
        q = torch.clamp(_round_ste(wg / s) + z, self.qmin, self.qmax)
        return ungroup((q - z) * s, rows, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = apply_input_transform(x, self.input_transform)
        if self.scheme.activations is not None:  # activations round too (no gradient to their dynamic scales)
            x = x + (quantize_activations(x.detach(), self.scheme.activations, self.act_scale) - x).detach()
        return F.linear(x, self.weight_hat(), self.bias)

    def export(self, name: str) -> QuantizedTensor:
        with torch.no_grad():
            scale = self.log_scale.exp().to(self.scheme.scale_storage_dtype).float()
            return quantize_tensor(self.weight, self.scheme, scale=scale, zero_point=self.zero, name=name)


def qat_finetune(model: nn.Module, teacher: nn.Module, qts: dict[str, QuantizedTensor], calib: torch.Tensor,
                 latent: dict[str, torch.Tensor], options: QATOptions | None = None,
                 act_scales: dict[str, torch.Tensor] | None = None, progress: bool = True) -> tuple[dict[str, QuantizedTensor], dict]:
    """Fine-tune `model` (its targets hold RTN values) towards `teacher`; returns new QuantizedTensors
    and the loss curve. `latent[name]` is the float weight each latent starts from."""
    o = options or QATOptions()
    t0 = time.time()
    for p in model.parameters():
        p.requires_grad_(False)
    fq = {}
    for name, qt in qts.items():
        old = model.get_submodule(name)
        fq[name] = FakeQuantLinear(latent[name], getattr(old, "bias", None), qt, getattr(old, "input_transform", None),
                                   (act_scales or {}).get(name))
        replace_module(model, name, fq[name])
    params_w = [m.weight for m in fq.values()]
    params_s = [m.log_scale for m in fq.values()]
    opt = torch.optim.Adam([{"params": params_w, "lr": o.lr}, {"params": params_s, "lr": o.scale_lr}])
    windows = calib[:, : o.seq_len]
    g = torch.Generator().manual_seed(o.seed)
    losses = []
    model.train(False)
    for step in tqdm(range(o.steps), desc="qat", unit="step", disable=not progress, leave=False):
        idx = torch.randint(0, windows.shape[0], (o.batch_size,), generator=g)
        batch = windows[idx]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), -1)
        s_logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    out = {}
    for name, m in fq.items():
        out[name] = m.export(name)
        lin = nn.Linear(m.shape[1], m.shape[0], bias=m.bias is not None)
        lin.weight.data = out[name].dequantize()
        if m.bias is not None:
            lin.bias = m.bias
        if m.input_transform:
            lin.input_transform = m.input_transform  # install() keeps the online Hadamard
        replace_module(model, name, lin)
    changed = sum(int((out[n].unpacked_codes() != qts[n].unpacked_codes()).sum()) for n in qts)
    total = sum(math.prod(q.shape) for q in qts.values())
    k = max(1, len(losses) // 8)
    info = {"steps": o.steps, "batch_size": o.batch_size, "seq_len": int(windows.shape[1]), "lr": o.lr,
            "scale_lr": o.scale_lr, "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "codes_changed_fraction": changed / max(total, 1), "seconds": time.time() - t0}
    return out, info
