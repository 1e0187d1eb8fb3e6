"""Quantize one model several ways and measure each against its float original."""
from __future__ import annotations

import copy
import sys
import time

import torch

from lowbit.api import make_recipe, quantize
from lowbit.core.method import Method
from lowbit.core.scheme import Recipe
from lowbit.evaluate.quality import evaluate_many
from lowbit.io.text import text_windows
from lowbit.models.load import load_float
from lowbit.quantization.job import MethodOptions
from lowbit.runtime.qlinear import model_bytes


def compare(source: str = "smollm2-135m", variants: list = (), *, text: str = "wiki",
            samples: int = 128, seq_len: int = 512, max_windows: int = 64, seed: int = 0,
            method_options: MethodOptions | None = None, progress: bool = True) -> dict:
    """variants: (method, scheme) pairs, or Recipes, or callables (calib windows, float model) -> Recipe
    (mixed precision measures on the calibration text). Returns {'rows': [...], ...}, float row first.

    Calibration windows come from the first half of the text, evaluation windows
    from the second; every variant is scored against the float model in one pass.
    """
    t0 = time.time()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    base, tok = load_float(source)
    recipes = [v if isinstance(v, Recipe) or callable(v) else make_recipe(v[1], v[0]) for v in variants]
    needs_calib = any(callable(r) or Method.parse(r.method).needs_calibration(r.scheme) for r in recipes)
    calib, windows = text_windows(tok, text, "text", seq_len, calib_samples=samples if needs_calib else None,
                                  eval_max=max_windows, seed=seed)
    rows = [{"method": "float", "scheme": "fp16 storage", "seconds": 0.0, **_bytes(base)}]
    models = {}
    for recipe in recipes:
        t = time.time()
        notes = {}
        if callable(recipe):  # a Recipe is not callable: this one builds its recipe on the calibration text
            recipe, notes = recipe(calib, base)
        label = recipe.method + (" mixed" if recipe.overrides else "")
        log(f"{label} {recipe.scheme.name} ...")
        torch.manual_seed(seed)
        needs = Method.parse(recipe.method).needs_calibration(recipe.scheme)
        res = quantize(copy.deepcopy(base), recipe=recipe, tokenizer=tok, calib_ids=calib if needs else None,
                       method_options=method_options, progress=progress, seed=seed)
        models[f"{label} {recipe.scheme.name} {len(models)}"] = res.model
        notes.update({k: res.info[k] for k in ("outlier_split", "qat") if k in res.info})
        rows.append({"method": label, "scheme": recipe.scheme.name, "seconds": time.time() - t, **_bytes(res.model),
                     **({"notes": notes} if notes else {})})
    log("evaluating against the float model ...")
    metrics = evaluate_many({"float": base, **models}, windows, base, progress=progress)
    for row, m in zip(rows, metrics.values()):
        row.update(m)
    return {
        "model": source, "text": text,
        "calibration": None if calib is None else {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "evaluation": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        "threads": torch.get_num_threads(), "total_seconds": time.time() - t0, "rows": rows,
    }


def _bytes(model) -> dict:
    b = model_bytes(model, torch.float16)
    return {"model_bytes": b["total_bytes"], "quantized_bytes": b["quantized_bytes"]}


def format_quality_table(rows: list[dict]) -> str:
    w = max([8] + [len(r["method"]) for r in rows])
    head = f"{'method':{w}s} {'scheme':20s} {'ppl':>8s} {'KL':>8s} {'top-1':>7s} {'MB':>7s} {'quant s':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        kl = "-" if r.get("kl_divergence") is None else f"{r['kl_divergence']:.4f}"
        agree = "-" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.1f}%"
        lines.append(f"{r['method']:{w}s} {r['scheme']:20s} {r['perplexity']:8.3f} {kl:>8s} {agree:>7s} "
                     f"{r['model_bytes'] / 1e6:7.1f} {r['seconds']:8.1f}")
    return "\n".join(lines)
