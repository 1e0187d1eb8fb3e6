"""The lowbit output directory: config, tokenizer, safetensors (one file or shards with an
index) and lowbit.json, which lists every quantized module's scheme and layout."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from lowbit.core.layer import QuantizedLayer
from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import UserError
from lowbit.io.files import atomic_dir, check_output
from lowbit.models.moe import unfuse_experts
from lowbit.runtime.qlinear import QUANT_BUFFERS, QuantLinear, float_state, quantized_modules, replace_module

FORMAT_VERSION = 1
MODULES_KEY = "lowbit.modules"  # safetensors metadata: the lowbit.json entries of the modules in that file


@dataclass
class Payload:
    """What a saved model, or one streamed block of it, holds: the tensors to store, the
    lowbit.json entry of each quantized module, and the byte and channel counts every
    report quotes. One tally for the in-memory and the streamed writer."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)
    quantized_bytes: int = 0
    float_bytes: int = 0
    float_input_channels: int = 0  # outlier split: input channels kept in float
    input_channels: int = 0  # summed over the quantized layers

    @classmethod
    def of(cls, root: nn.Module, float_dtype: torch.dtype, prefix: str = "") -> "Payload":
        """Every QuantLinear under `root` (packed), and its float parts (norms, biases, embeddings,
        the layers' float extras) at `float_dtype`, tied tensors once; named `prefix` + path."""
        out = cls()
        for name, m in quantized_modules(root).items():
            out.add_layer(prefix + name, m.layer)
        for k, t in float_state(root).items():
            out.add_float(prefix + k, t, float_dtype)
        return out

    def add_layer(self, name: str, layer: QuantizedLayer) -> None:
        """A layer's packed codes (its float extras are float parts of its module)."""
        self.tensors.update(layer.weight.tensors(prefix=f"{name}.qweight."))
        self.modules[name] = layer.meta()
        self.quantized_bytes += layer.weight.nbytes
        self.float_input_channels += layer.float_input_channels
        self.input_channels += layer.shape[1]

    def add_float(self, key: str, t: torch.Tensor, float_dtype: torch.dtype) -> None:
        t = t.to(float_dtype) if t.is_floating_point() else t
        self.tensors[key] = t.contiguous()
        self.float_bytes += t.numel() * t.element_size()

    def counts(self) -> dict:
        """Everything but the tensors (what a streamed block leaves in progress.json)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tensors"}

    @classmethod
    def from_counts(cls, counts: dict) -> "Payload":
        return cls(**{k: v for k, v in counts.items() if k != "tensors"})

    def merge(self, other: "Payload") -> None:
        """Add another part's modules and counts (its tensors are written already)."""
        self.modules.update(other.modules)
        self.quantized_bytes += other.quantized_bytes
        self.float_bytes += other.float_bytes
        self.float_input_channels += other.float_input_channels
        self.input_channels += other.input_channels

    def file_metadata(self) -> dict[str, str]:
        """The safetensors header's metadata: each module's lowbit.json entry is also written
        beside its codes, so a lowbit.json edited after the fact is caught at load."""
        # one key: safetensors writes metadata keys in hash order, which differs between processes,
        # and a resumed run must write the same bytes as an uninterrupted one
        if self.modules:
            return {MODULES_KEY: json.dumps(self.modules, sort_keys=True)}
        return {"format": "lowbit"}

    @property
    def bytes(self) -> dict:
        return {"quantized_bytes": self.quantized_bytes, "float_bytes": self.float_bytes,
                "total_bytes": self.quantized_bytes + self.float_bytes}


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, info: dict,
                   float_dtype: torch.dtype = torch.float16, payload: Payload | None = None) -> Path:
    """Write config.json, tokenizer, model.safetensors and lowbit.json; the directory appears atomically."""
    from safetensors.torch import save_file

    out = check_output(out_dir)
    payload = payload or Payload.of(model, float_dtype)
    with atomic_dir(out) as tmp:
        save_file(payload.tensors, str(tmp / "model.safetensors"), metadata=payload.file_metadata())
        write_model_files(tmp, model.config, tokenizer, payload.modules, float_dtype, info)
    return out


def write_model_files(tmp: Path, config, tokenizer, modules: dict, float_dtype: torch.dtype, info: dict) -> None:
    """config.json, the tokenizer and lowbit.json: every quantized module's scheme and layout,
    and how the model was made (no wall-clock figures: the same job gives the same bytes)."""
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    info = {k: v for k, v in info.items() if k not in ("seconds", "resumed_from_block", "preflight")}
    meta = {"format": "lowbit", "version": FORMAT_VERSION, "modules": modules,
            "float_dtype": str(float_dtype).removeprefix("torch."), **info}
    (tmp / "lowbit.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _read_shards(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, dict]]]:
    """The tensors of model.safetensors, or of every shard a model.safetensors.index.json lists
    (streamed outputs), and {module: (file, its entry as written beside the codes)}."""
    from lowbit.io.files import read_safetensors
    from lowbit.models.lazy import INDEX

    index = path / INDEX
    files = ["model.safetensors"]
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: unreadable ({type(e).__name__}: {e})") from None
    tensors, written = {}, {}
    for f in files:
        t, md = read_safetensors(path / f)
        tensors.update(t)
        try:
            written.update({k: (f, v) for k, v in json.loads(md.get(MODULES_KEY, "{}")).items()})
        except (ValueError, AttributeError) as e:
            raise UserError(f"{path / f}: damaged lowbit metadata ({type(e).__name__}: {e})") from None
    return tensors, written


def _check_entries(path: Path, modules: dict, written: dict) -> None:
    """lowbit.json must say what the files say about their codes (outputs written before the
    files carried their entries are taken as they are)."""
    if not written:
        return
    for name, (f, entry) in written.items():
        if name not in modules:
            raise UserError(f"{path / 'lowbit.json'} lists no {name}, whose codes {f} holds; restore lowbit.json or quantize again")
        if modules[name] != entry:
            raise UserError(f"{path / 'lowbit.json'} disagrees with {f} about {name}: {_first_difference(entry, modules[name])}; "
                            "restore lowbit.json or quantize again")
    extra = [n for n in modules if n not in written]
    if extra:
        raise UserError(f"{path / 'lowbit.json'} lists {extra[0]}, which no safetensors file holds codes for")


def _first_difference(written, said, where: str = "") -> str:
    if isinstance(written, dict) and isinstance(said, dict):
        for k in sorted(set(written) | set(said)):
            if written.get(k) != said.get(k):
                return _first_difference(written.get(k), said.get(k), f"{where}.{k}" if where else k)
    return f"{where or 'entry'} is {written!r} where the codes were written, {said!r} in lowbit.json"


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, lowbit.json) from a lowbit output directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from lowbit.models.load import read_lowbit_config

    path = Path(path)
    meta = read_lowbit_config(path)
    if meta.get("format") != "lowbit" or meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: lowbit.json says format {meta.get('format')!r} version {meta.get('version')!r}; this lowbit reads version {FORMAT_VERSION}")
    tensors, written = _read_shards(path)
    if not isinstance(meta.get("modules"), dict):
        raise UserError(f"{path / 'lowbit.json'}: no 'modules' object")
    _check_entries(path, meta["modules"], written)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model, copy_weights=False)  # saved MoE layers are per-expert Linears
    qts = {}
    for name, m in meta["modules"].items():
        prefix = f"{name}.qweight."
        try:
            qts[name] = QuantizedTensor.from_tensors(tensors, m, prefix=prefix)
        except KeyError as e:
            raise UserError(f"{path}: the safetensors files lack {e.args[0]} listed in lowbit.json") from None
        for k in list(tensors):
            if k.startswith(prefix):
                del tensors[k]
    for name, qt in qts.items():
        has_bias = getattr(model.get_submodule(name), "bias", None) is not None
        layer = QuantizedLayer.placeholder(qt, meta["modules"][name].get("extras", {}))
        replace_module(model, name, QuantLinear(layer, torch.zeros(qt.shape[0]) if has_bias else None))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    missing = [k for k in missing if not _is_tied_or_quant(model, k)]
    if missing or unexpected:
        raise UserError(f"{path}: tensors do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    tok = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok, meta


def _is_tied_or_quant(model, key: str) -> bool:
    if key.rpartition(".")[2] in QUANT_BUFFERS:
        return True
    return getattr(model.config, "tie_word_embeddings", False) and key.startswith("lm_head.")
