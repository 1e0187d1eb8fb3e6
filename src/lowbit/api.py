"""The Python API: lowbit.load() and lowbit.quantize()."""
from __future__ import annotations

import torch

from lowbit.core.method import Method
from lowbit.core.scheme import Recipe, Scheme
from lowbit.io.lowbit_dir import check_output_dir, load_quantized, save_quantized
from lowbit.io.text import check_text_source, text_windows
from lowbit.models.load import load_float, resolve_source
from lowbit.quantization.job import GPTQOptions, MethodOptions, QuantizeResult, quantize_model


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


def quantize(model: str, scheme: str | Scheme = "w4a16-g64", method: str = "gptq", *, calib: str = "wiki",
             text_field: str = "text", samples: int = 128, seq_len: int = 512, seed: int = 0,
             out: str | None = None, include: list[str] | None = None, exclude: list[str] | None = None,
             gptq_options: GPTQOptions | None = None, method_options: MethodOptions | None = None,
             recipe: Recipe | None = None, progress: bool = True, extra_info: dict | None = None) -> QuantizeResult:
    """Quantize a model source; save it to `out` if given. Returns the QuantizeResult
    (its .model is ready to run, .info has the recipe, bytes and timing)."""
    recipe = recipe or make_recipe(scheme, method, include, exclude)
    needs_calib = Method.parse(recipe.method).needs_calibration(recipe.scheme)
    if needs_calib:
        check_text_source(calib)
    if out:
        check_output_dir(out)  # before hours of work, not after
    torch.manual_seed(seed)
    fmodel, tok = load_float(model)
    calib_ids = None
    if needs_calib:
        calib_ids, _ = text_windows(tok, calib, text_field, seq_len, calib_samples=samples, seed=seed)
    res = quantize_model(fmodel, recipe, calib_ids, gptq_options=gptq_options, method_options=method_options,
                         progress=progress)
    res.info.update({"source": model, "calib": calib if needs_calib else None, "seed": seed, **(extra_info or {})})
    res.tokenizer = tok
    if out:
        save_quantized(res.model, tok, out, res.info)
    return res
