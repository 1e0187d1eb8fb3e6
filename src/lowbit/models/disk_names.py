"""Checkpoint (on-disk) names of the tensors lowbit holds in memory, from transformers' own
conversion mapping.

transformers 5 renames and fuses some tensors on load (Mixtral's
`block_sparse_moe.experts.{e}.w1/w3` become one 3-D `mlp.experts.gate_up_proj`) and
reverses that on save. lowbit holds the experts unfused again, one Linear per expert
projection (`mlp.experts.{e}.gate_proj`, see models/moe.py), so it needs the map between
those names and the checkpoint's. Rather than a table of renames per family, it runs
transformers' `revert_weight_conversion` on a probe state dict: every in-memory tensor
becomes a tiny tensor of distinct ids (one id per expert and projection inside a fused
parameter), and the ids found in each reverted tensor say which in-memory tensor it is.
New families come with transformers' mapping for free.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.models.moe import is_fused_experts

# the fused parameters of a transformers experts module, and the per-expert Linear each row block becomes
_FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
          "gate_up_proj_bias": ("gate_proj", "up_proj"), "down_proj_bias": ("down_proj",)}


class DiskNames:
    """{in-memory key: checkpoint key} for a model with fused experts as transformers builds
    it, expressed for lowbit's unfused layout. `fused_on_disk` names the checkpoint tensors
    that hold several in-memory tensors at once (gpt-oss stores its experts fused)."""

    def __init__(self, model: nn.Module):
        from transformers.core_model_loading import revert_weight_conversion

        probe, owner = _probe(model)
        reverted = revert_weight_conversion(model, probe)
        self.to_disk: dict[str, str] = {}
        self.fused_on_disk: dict[str, list[str]] = {}
        for disk_key, t in reverted.items():
            ids = sorted({int(v) for v in t.reshape(-1).tolist()})
            if len(ids) == 1:
                self.to_disk[owner[ids[0]]] = disk_key
            else:
                self.fused_on_disk[disk_key] = [owner[i] for i in ids]
        self.to_memory = {d: m for m, d in self.to_disk.items()}

    def disk(self, key: str) -> str:
        """A tensor's checkpoint name; a module's other leaves (weight_scale, qweight, ...) follow its weight."""
        return _follow(self.to_disk, key)

    def memory(self, key: str) -> str:
        return _follow(self.to_memory, key)

    def disk_module(self, name: str) -> str:
        return self.disk(f"{name}.weight").removesuffix(".weight")

    def memory_module(self, name: str) -> str:
        return self.memory(f"{name}.weight").removesuffix(".weight")


def _follow(table: dict[str, str], key: str) -> str:
    if key in table:
        return table[key]
    module, _, leaf = key.rpartition(".")
    renamed = table.get(f"{module}.weight", "")
    return f"{renamed.removesuffix('.weight')}.{leaf}" if renamed.endswith(".weight") else key


def _probe(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """A tiny stand-in for every state-dict tensor (float64 ids, exact), and {id: in-memory key}
    in lowbit's unfused naming. A fused [E, 2I, H] gate_up_proj becomes [E, 2, 1]: row 0 is
    expert e's gate_proj, row 1 its up_proj, whether the family concatenates or interleaves."""
    probe, owner = {}, {}

    def new_id(key: str) -> int:
        owner[len(owner)] = key
        return len(owner) - 1

    fused = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in fused and leaf in _FUSED:
            parts, kind = _FUSED[leaf], "bias" if leaf.endswith("_bias") else "weight"
            transposed = bool(getattr(fused[mod], "is_transposed", False)) and kind == "weight"
            ids = torch.tensor([[new_id(f"{mod}.{e}.{p}.{kind}") for p in parts] for e in range(t.shape[0])],
                               dtype=torch.float64)  # [E, parts]
            if kind == "weight":
                ids = ids[:, None, :] if transposed else ids[:, :, None]  # the parts run along the output dim
            probe[key] = ids
        else:
            probe[key] = torch.full([1] * t.dim(), float(new_id(key)), dtype=torch.float64)
    return probe, owner


def disk_names(config) -> DiskNames:
    """The map for a config's architecture (built on the meta device: no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return DiskNames(model)
