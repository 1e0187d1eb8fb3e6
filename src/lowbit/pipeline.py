"""quantize(): a model source + recipe + calibration text -> a quantized model (and its directory)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .algorithms.gptq import gptq
from .algorithms.rtn import rtn
from .errors import UserError
from .models.adapters import is_linear
from .models.runner import run_sequential
from .runtime import QuantLinear, install, model_bytes, round_float_parts
from .scheme import Recipe, Scheme
from .tensor import QuantizedTensor


@dataclass
class GPTQOptions:
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    true_sequential: bool = False  # each stage of a block sees the stages before it quantized (measured: no gain here)
    weighted_mse: bool = True  # MSE scale search weighs columns by the Hessian diagonal


@dataclass
class QuantizeResult:
    model: nn.Module
    qtensors: dict[str, QuantizedTensor]
    seconds: float
    info: dict = field(default_factory=dict)
    tokenizer: object = None  # set by lowbit.quantize(), which loads the model itself


def target_modules(model: nn.Module, recipe: Recipe) -> dict[str, Scheme]:
    """Linear modules the recipe quantizes, with their schemes."""
    out = {}
    for name, mod in model.named_modules():
        if name and is_linear(mod):
            s = recipe.scheme_for(name)
            if s is not None:
                out[name] = s
    if not out:
        raise UserError("the recipe selects no Linear modules (check --include/--exclude patterns)")
    return out


def quantize_model(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None = None, *,
                   gptq_options: GPTQOptions | None = None, batch_size: int = 8, progress: bool = True,
                   float_dtype: torch.dtype = torch.float16) -> QuantizeResult:
    """Quantize `model` in place (its Linears become QuantLinears)."""
    targets = target_modules(model, recipe)
    opts = gptq_options or GPTQOptions()
    if recipe.method == "gptq":
        if calib is None:
            raise UserError("GPTQ needs calibration text")

        def fn(name, w, H):
            if H is None:  # outside the decoder blocks (e.g. lm_head when included)
                return rtn(w, targets[name], name)
            return gptq(w, H, targets[name], blocksize=opts.blocksize, percdamp=opts.percdamp,
                        act_order=opts.act_order, weighted_mse=opts.weighted_mse, name=name)
    elif recipe.method == "rtn":
        calib = None

        def fn(name, w, H):
            return rtn(w, targets[name], name)
    else:
        raise UserError(f"unknown method {recipe.method!r}; choose rtn or gptq")
    t0 = time.time()
    qts = run_sequential(model, targets, fn, calib=calib, batch_size=batch_size, progress=progress,
                         desc=f"{recipe.method} {recipe.scheme.name}", true_sequential=opts.true_sequential)
    install(model, qts)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and isinstance(out_emb, QuantLinear) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the input embedding stays a float table; the head is now its own tensor
    round_float_parts(model, float_dtype)
    seconds = time.time() - t0
    info = {"recipe": recipe.to_dict(), "seconds": seconds, "bytes": model_bytes(model, float_dtype),
            "calibration": None if calib is None else {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])}}
    return QuantizeResult(model, qts, seconds, info)
