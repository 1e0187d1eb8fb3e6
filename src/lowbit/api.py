"""The Python API: lowbit.load() and lowbit.quantize()."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.core.method import Method
from lowbit.core.scheme import Recipe, Scheme
from lowbit.io.lowbit_dir import load_quantized
from lowbit.models.load import load_float, resolve_source
from lowbit.quantization.job import Calibration, GPTQOptions, MethodOptions, QuantizeJob, QuantizeResult, run


def load(source: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) ready to run: QuantLinear modules in place for a lowbit output
    directory and for checkpoints quantized elsewhere (GGUF Q8_0/Q4_0/Q4_1 tensors,
    compressed-tensors, GPTQ: codes imported unchanged); float for the rest."""
    from lowbit.io.interop import checkpoint_kind, import_model

    kind, path = resolve_source(source)
    if kind == "lowbit":
        model, tok, _ = load_quantized(path, dtype)
        return model, tok
    if kind != "embedded" and checkpoint_kind(path) is not None:
        model, tok, _ = import_model(path, dtype)
        return model.to(dtype), tok
    return load_float(source, dtype)


def make_recipe(scheme: str | Scheme, method: str = "gptq", include: list[str] | None = None,
                exclude: list[str] | None = None) -> Recipe:
    recipe = Recipe(scheme=Scheme.parse(scheme), method=method)
    if include:
        recipe.include = list(include)
    if exclude is not None:
        recipe.exclude = list(exclude)
    recipe.method = Method.parse(method).name  # a clear error for an unknown method, before any work
    return recipe


def quantize(model: str | nn.Module, scheme: str | Scheme = "w4a16-g64", method: str = "gptq", *, calib: str = "wiki",
             text_field: str = "text", samples: int = 128, seq_len: int = 512, seed: int = 0, batch_size: int = 8,
             out: str | None = None, include: list[str] | None = None, exclude: list[str] | None = None,
             gptq_options: GPTQOptions | None = None, method_options: MethodOptions | None = None,
             recipe: Recipe | None = None, progress: bool = True, extra_info: dict | None = None,
             stream: bool | None = None, dry_run: bool = False, tokenizer=None, calib_ids: torch.Tensor | None = None,
             float_dtype: torch.dtype = torch.float16, trust_remote_code: bool = False) -> QuantizeResult | None:
    """Quantize a model source (or a float model object with its `tokenizer`); save it to `out`
    if given. With an `out`, a checkpoint directory or the embedded model is streamed block
    by block and resumes after a kill, exactly as `lowbit quantize` does (`stream=False`
    holds it in memory). Returns the QuantizeResult: .model ready to run, .info with the
    recipe, bytes and timing (None after `dry_run`)."""
    recipe = recipe or make_recipe(scheme, method, include, exclude)
    job = QuantizeJob(recipe, Calibration(calib, text_field, samples, seq_len, seed, batch_size),
                      gptq_options or GPTQOptions(), method_options or MethodOptions(), float_dtype, progress,
                      dict(extra_info or {}), trust_remote_code)
    return run(job, model, out, stream=stream, tokenizer=tokenizer, calib_ids=calib_ids, dry_run=dry_run)
