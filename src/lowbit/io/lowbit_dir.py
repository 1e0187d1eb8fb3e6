"""The lowbit output directory: config, tokenizer, safetensors (one file or shards with an
index) and lowbit.json, which lists every quantized module's scheme and layout."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.errors import UserError
from lowbit.runtime.qlinear import QUANT_BUFFERS, QuantLinear, float_state, quantized_modules, replace_module

FORMAT_VERSION = 1


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """Fail before any work if the output cannot be written (or would clobber something else)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; choose a directory for --out")
    if out.is_dir() and not (out / "lowbit.json").is_file() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not a lowbit output; choose an empty or new --out")
    try:  # permission bits lie (root, read-only mounts, /proc): really create something
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out.parent}: not writable ({e.strerror}); choose another --out") from None
    return out


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, info: dict,
                   float_dtype: torch.dtype = torch.float16) -> Path:
    """Write config.json, tokenizer, model.safetensors and lowbit.json; the directory appears atomically."""
    from safetensors.torch import save_file

    from lowbit.io.files import atomic_dir

    out = check_output_dir(out_dir)
    with atomic_dir(out) as tmp:
        tensors, modules = quantized_payload(model)
        fstate = float_state(model)
        tensors.update({k: (v.to(float_dtype) if v.is_floating_point() else v).contiguous() for k, v in fstate.items()})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "lowbit"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "lowbit.json").write_text(json.dumps(lowbit_meta(modules, float_dtype, info), indent=1, sort_keys=True) + "\n")
    return out


def quantized_payload(root: nn.Module, prefix: str = "") -> tuple[dict, dict]:
    """(packed tensors, lowbit.json module entries) of every QuantLinear under `root`,
    named `prefix` + its path (the whole model, or one streamed block)."""
    tensors, modules = {}, {}
    for name, m in quantized_modules(root).items():
        qt = m.qweight
        tensors.update(qt.tensors(prefix=f"{prefix}{name}.qweight."))
        extras = m.extra_meta()
        modules[prefix + name] = {**qt.meta(), **({"extras": extras} if extras else {})}
    return tensors, modules


def lowbit_meta(modules: dict, float_dtype: torch.dtype, info: dict) -> dict:
    """lowbit.json: every quantized module's scheme and layout, and how the model was made
    (no wall-clock figures: the same job gives the same bytes)."""
    info = {k: v for k, v in info.items() if k not in ("seconds", "resumed_from_block", "preflight")}
    return {"format": "lowbit", "version": FORMAT_VERSION, "modules": modules,
            "float_dtype": str(float_dtype).removeprefix("torch."), **info}


def _read_shards(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard a model.safetensors.index.json lists (streamed outputs)."""
    from lowbit.io.files import read_safetensors
    from lowbit.models.lazy import INDEX

    index = path / INDEX
    if not index.is_file():
        return read_safetensors(path / "model.safetensors")[0]
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index}: unreadable ({type(e).__name__}: {e})") from None
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(path / f)[0])
    return tensors


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, lowbit.json) from a lowbit output directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from lowbit.models.load import read_lowbit_config

    path = Path(path)
    meta = read_lowbit_config(path)
    if meta.get("format") != "lowbit" or meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: lowbit.json says format {meta.get('format')!r} version {meta.get('version')!r}; this lowbit reads version {FORMAT_VERSION}")
    tensors = _read_shards(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
        replace_module(model, name, QuantLinear.from_meta(qt, meta["modules"][name].get("extras", {}), has_bias))
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
