"""Serving formats in and out: compressed-tensors (vLLM), GGUF (llama.cpp), GPTQ; AWQ in.

export_model() writes a lowbit model in another engine's format; import_model()
reads such a checkpoint into QuantLinears holding the very same codes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import UserError

FORMATS = ("compressed-tensors", "gguf", "gptq")


def checkpoint_kind(path: str | Path) -> str | None:
    """'gguf', 'compressed-tensors', 'gptq', 'awq' for a foreign quantized checkpoint, else None."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf"
    cfg = p / "config.json"
    if not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method in ("gptq", "awq"):
        return method
    return None


def import_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, {module: QuantizedTensor}) from a GGUF file or a compressed-tensors / GPTQ / AWQ directory."""
    kind = checkpoint_kind(path)
    if kind == "gguf":
        from lowbit.io.interop.gguf_io import import_gguf

        return import_gguf(path)
    if kind == "compressed-tensors":
        from lowbit.io.interop.compressed import import_compressed_tensors

        return import_compressed_tensors(path, dtype)
    if kind == "gptq":
        from lowbit.io.interop.gptq_format import import_gptq

        return import_gptq(path, dtype)
    if kind == "awq":
        from lowbit.io.interop.awq_format import import_awq

        return import_awq(path, dtype)
    raise UserError(f"{path}: not a GGUF file or a compressed-tensors/GPTQ/AWQ checkpoint directory")


def export_model(model, tokenizer, fmt: str, out: str | Path, *, source: str | None = None,
                 tokenizer_dir: str | Path | None = None, requantize: str | None = None,
                 embed_type: str = "q8_0") -> dict:
    """Write `model` (with QuantLinears) as `fmt` to `out`; returns what was written."""
    _check_weight_only(model, fmt)
    if fmt == "compressed-tensors":
        from lowbit.io.interop.compressed import export_compressed_tensors

        return export_compressed_tensors(model, tokenizer, out)
    if fmt == "gptq":
        from lowbit.io.interop.gptq_format import export_gptq

        return export_gptq(model, tokenizer, out)
    if fmt == "gguf":
        from lowbit.io.interop.gguf_io import export_gguf

        return export_gguf(model, tokenizer_dir, out, source_gguf=_source_gguf(source),
                           requantize=requantize, embed_type=embed_type)
    raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_weight_only(model, fmt: str) -> None:
    """The exports hold weight codes only: refuse what a loader would silently drop."""
    from lowbit.runtime.qlinear import quantized_modules

    for name, m in quantized_modules(model).items():
        extra = m.layer.beyond_weight_codes()
        if extra:
            raise UserError(f"{name} {' and '.join(extra)}; the {fmt} export holds weight-only codes, so a loader would compute "
                            "something else (export weight-only methods and schemes: rtn/gptq/awq, w*a16)")


def _source_gguf(source: str | None) -> Path | None:
    """The GGUF a model was quantized from, whose tokenizer metadata can be copied verbatim."""
    if not source:
        return None
    from lowbit.models.load import EMBEDDED, embedded_gguf

    if source in EMBEDDED:
        return embedded_gguf(source)
    p = Path(source).expanduser()
    return p if p.is_file() and p.suffix.lower() == ".gguf" else None
