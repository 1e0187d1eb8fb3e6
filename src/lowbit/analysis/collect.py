"""Run text through a model with hooks and stream what every Linear sees.

A *site* is one input tensor: q/k/v read the same normed hidden state, gate/up read
another, so they share a site (found by tensor identity on the fly). Per site we
stream channel statistics (overall and per text set, for persistence), per-token
absmax, the largest tokens, and the activation quantization error of each scheme in
ACT_SCHEMES; rows are sampled (bounded) only in a few representative blocks, for the
studies. Nothing grows with the amount of text.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.analysis.outliers import TopTokens
from lowbit.analysis.stats import ChannelStats, TokenStats
from lowbit.core.qparams import fake_quantize
from lowbit.core.scheme import Scheme
from lowbit.models.adapters import decoder_layers, is_linear

# Activation quantization as a kernel would do it: dynamic scales from the tensor at hand.
ACT_SCHEMES = {
    "int8 per-tensor": "int8-tensor",
    "int8 per-token": "int8-token",
    "int4 per-token": "int4-token",
    "int4 g128": "int4-g128",
}

_KINDS = (
    ("qkv", re.compile(r"(q_proj|k_proj|v_proj|query_key_value|qkv_proj|c_attn|Wqkv)$")),
    ("o", re.compile(r"(o_proj|out_proj|attn\.c_proj|attention\.dense|self_attn\.dense)$")),
    ("gate_up", re.compile(r"(gate_proj|up_proj|gate_up_proj|fc1|c_fc|w1|w3|dense_h_to_4h)$")),
    ("down", re.compile(r"(down_proj|fc2|mlp\.c_proj|w2|dense_4h_to_h)$")),
)

KIND_LABEL = {
    "qkv": "q/k/v input (normed hidden state)",
    "o": "o_proj input (attention output)",
    "gate_up": "gate/up input (normed hidden state)",
    "down": "down_proj input (SiLU(gate) * up)",
    "other": "other",
}


def linear_kind(name: str) -> str:
    for kind, pat in _KINDS:
        if pat.search(name):
            return kind
    return "other"


@dataclass
class Site:
    name: str
    block: int
    kind: str
    linears: list[str]
    channels: int
    chan: ChannelStats
    tokens: TokenStats = field(default_factory=TokenStats)
    top: TopTokens = field(default_factory=TopTokens)
    per_set_absmax: list[torch.Tensor] = field(default_factory=list)
    set_absmax: torch.Tensor | None = None
    act_err: dict = field(default_factory=dict)  # label -> [sum sq err, sum sq]
    sample: list[torch.Tensor] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"L{self.block} {self.kind}"


class ActivationCollector:
    """Hooks every Linear (and each MLP's activation function) of a decoder-only model."""

    def __init__(self, model: nn.Module, *, sample_blocks: tuple[int, ...] = (), sample_rows: int = 256,
                 act_schemes: dict[str, str] = ACT_SCHEMES):
        self.model = model
        prefix, layers = decoder_layers(model)
        self.num_blocks = len(layers)
        self.sample_blocks = set(sample_blocks)
        self.sample_rows = sample_rows
        self.act_schemes = {k: Scheme.parse(v) for k, v in act_schemes.items()}
        self.sites: dict[str, Site] = {}
        self.site_of: dict[str, str] = {}
        self.act_fn_samples: dict[int, list[torch.Tensor]] = {}
        self._prev: tuple[torch.Tensor, str] | None = None
        self._ids: torch.Tensor | None = None
        self._rows_per_call = 1
        self._handles = []
        block_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        for name, mod in model.named_modules():
            m = block_re.match(name)
            if m is None:
                continue
            block = int(m.group(1))
            if is_linear(mod):
                self._handles.append(mod.register_forward_pre_hook(self._linear_hook(name, block)))
            elif name.endswith("act_fn") and block in self.sample_blocks:
                self._handles.append(mod.register_forward_hook(self._act_fn_hook(block)))

    def _take_rows(self, x2: torch.Tensor) -> torch.Tensor:
        idx = torch.linspace(0, x2.shape[0] - 1, min(self._rows_per_call, x2.shape[0])).round().long()
        return x2[idx].to(torch.float32).clone()

    def _linear_hook(self, name: str, block: int):
        def hook(mod, args):
            x = args[0]
            if self._prev is not None and x is self._prev[0]:  # same tensor as the previous Linear's input
                site = self.sites[self._prev[1]]
                if name not in self.site_of:
                    self.site_of[name] = site.name
                    site.linears.append(name)
                return
            site = self.sites.get(self.site_of.get(name, name))
            if site is None:
                site = Site(name, block, linear_kind(name), [name], x.shape[-1], ChannelStats(x.shape[-1]))
                self.sites[name] = site
                self.site_of[name] = name
            self._prev = (x, site.name)
            self._observe(site, x.detach())
        return hook

    def _act_fn_hook(self, block: int):
        def hook(mod, args, out):
            self.act_fn_samples.setdefault(block, []).append(self._take_rows(out.detach().reshape(-1, out.shape[-1])))
        return hook

    def _observe(self, site: Site, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        site.chan.update(x2)
        a = x2.abs().amax(0).to(torch.float64)
        site.set_absmax = a if site.set_absmax is None else torch.maximum(site.set_absmax, a)
        if x.dim() == 3 and self._ids is not None and x.shape[:2] == self._ids.shape:
            tok_absmax = site.tokens.update(x)
            site.top.update(tok_absmax, self._ids)
        x32 = x2.to(torch.float32)
        sq = float(x32.pow(2).sum())
        for label, scheme in self.act_schemes.items():
            err = float((fake_quantize(x32, scheme) - x32).pow(2).sum())
            acc = site.act_err.setdefault(label, [0.0, 0.0])
            acc[0] += err
            acc[1] += sq
        if site.block in self.sample_blocks:
            site.sample.append(self._take_rows(x2))

    @torch.no_grad()
    def run(self, text_sets: dict[str, list[torch.Tensor]], progress: bool = True) -> None:
        """Forward every text set (a list of [batch, seq] id tensors) through the model, set by set."""
        calls = sum(len(batches) for batches in text_sets.values())
        self._rows_per_call = max(1, math.ceil(self.sample_rows / calls))
        bar = tqdm(total=calls, desc="analyze: activations", unit="batch", disable=not progress, leave=False)
        for batches in text_sets.values():
            for batch in batches:
                self._ids, self._prev = batch, None
                self.model(input_ids=batch, use_cache=False)
                bar.update(1)
            for site in self.sites.values():
                seen = site.set_absmax if site.set_absmax is not None else torch.zeros(site.channels, dtype=torch.float64)
                site.per_set_absmax.append(seen)
                site.set_absmax = None
        bar.close()
        self._ids = self._prev = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def samples(self, site: Site) -> torch.Tensor:
        return torch.cat(site.sample) if site.sample else torch.empty(0, site.channels)
