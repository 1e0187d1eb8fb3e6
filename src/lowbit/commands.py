"""Implementations of the CLI subcommands (argparse lives in cli.py)."""
from __future__ import annotations

import json
import sys
import torch

from .api import load, make_recipe, quantize
from .data import check_text_source, text_windows
from .evaluate import evaluate_many
from .runtime import model_bytes


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def cmd_quantize(args) -> int:
    res = quantize(args.model, args.scheme, args.method, calib=args.calib, text_field=args.text_field,
                   samples=args.samples, seq_len=args.seq_len, seed=args.seed, out=args.out,
                   include=args.include, exclude=args.exclude, progress=_progress(args))
    b = res.info["bytes"]
    print(f"quantized {len(res.qtensors)} Linear layers of {args.model} with {args.method} {res.info['recipe']['scheme']['name']} "
          f"in {res.seconds:.1f}s -> {args.out} ({b['total_bytes'] / 1e6:.1f} MB: {b['quantized_bytes'] / 1e6:.1f} MB quantized, "
          f"{b['float_bytes'] / 1e6:.1f} MB float)")
    return 0


def cmd_eval(args) -> int:
    check_text_source(args.text)
    model, tok = load(args.model)
    _, windows = text_windows(tok, args.text, args.text_field, args.seq_len, eval_max=args.max_windows)
    models = {"model": model}
    baseline = None
    if args.baseline:
        baseline, _ = load(args.baseline)
    res = evaluate_many(models, windows, baseline, progress=_progress(args))["model"]
    res["model_bytes"] = model_bytes(model, torch.float16)["total_bytes"] if _is_quantized(model) else model_bytes(model)["total_bytes"]
    res["windows"], res["seq_len"] = int(windows.shape[0]), args.seq_len
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:16s} {v if not isinstance(v, float) else f'{v:.4f}'}")
    return 0


def _is_quantized(model) -> bool:
    from .runtime import quantized_modules

    return bool(quantized_modules(model))


def cmd_demo(args) -> int:
    """Quantize the embedded model with each method x scheme and print one quality table."""
    from .compare import compare, format_quality_table

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for s in schemes:  # validate every name before any work starts
        for m in methods:
            make_recipe(s, m)
    if _progress(args):
        print("lowbit demo: embedded SmolLM2-135M (the first run converts its GGUF once, ~30 s)", file=sys.stderr)
    res = compare("smollm2-135m", [(m, s) for s in schemes for m in methods], samples=args.samples,
                  seq_len=args.seq_len, max_windows=args.max_windows, progress=_progress(args))
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(format_quality_table(res["rows"]))
    cal, ev = res["calibration"], res["evaluation"]
    cal_txt = f"calibration: {cal['samples']} x {cal['seq_len']} tokens from the other half" if cal else "no calibration (RTN)"
    print(f"\nheld-out wiki text: {ev['windows']} windows x {ev['seq_len']} tokens; {cal_txt}; "
          f"total {res['total_seconds']:.0f}s.\n"
          "MB: what is stored (codes + scales + zero points, float parts at fp16). "
          "KL and top-1 are per token against the float model.")
    return 0


__all__ = ["cmd_demo", "cmd_eval", "cmd_quantize"]
