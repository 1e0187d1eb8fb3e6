"""Implementations of the CLI subcommands (argparse lives in cli.py)."""
from __future__ import annotations

import json
import sys

import torch

from lowbit.algorithms.mixed import mixed_recipe
from lowbit.algorithms.qat import QATOptions
from lowbit.analysis import analyze
from lowbit.analysis.findings import findings, recommend
from lowbit.analysis.probes import load_probes, run_probes
from lowbit.analysis.report import write_report
from lowbit.api import load, make_recipe, quantize
from lowbit.core.scheme import GGUF_PRESETS, Recipe, Scheme
from lowbit.errors import UserError
from lowbit.evaluate.bench import (
    cold_bytes,
    copy_bandwidth,
    end_to_end,
    format_speed,
    gemv_bench,
    read_bandwidth,
    speed_variants,
)
from lowbit.evaluate.compare import compare, format_quality_table
from lowbit.evaluate.host import host_info
from lowbit.evaluate.quality import evaluate_many
from lowbit.io.files import check_output, output_lock
from lowbit.io.interop import export_model, import_model
from lowbit.io.lowbit_dir import load_quantized, save_quantized
from lowbit.io.text import check_text_source, text_windows
from lowbit.models.adapters import check_context
from lowbit.models.load import load_float, resolve_source
from lowbit.plan.devices import get_device, load_catalog
from lowbit.plan.planner import Arch, PlanInput, decision_matrix, format_plan, plan, read_model
from lowbit.quantization.job import MethodOptions
from lowbit.runtime.attention import register as register_attention
from lowbit.runtime.generate import generate
from lowbit.runtime.qlinear import dequantized, model_bytes


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def cmd_quantize(args) -> int:
    if args.format and not args.export_out:
        raise UserError("--format needs --export-out (where the exported model goes)")
    if args.format:
        _check_export_args(args.format, args.export_out, [args.model, args.out], args, "--export-out")
    if args.report:
        _check_report_path(args.report)

    recipe = _read_recipe(args.recipe) if args.recipe else make_recipe(args.scheme, args.method, args.include, args.exclude)
    if args.target_bits is not None:
        if args.recipe:
            raise UserError("--target-bits builds a recipe; it cannot be combined with --recipe")
        choices = _bit_choices(args.bit_choices) if args.bit_choices else None
        recipe, mixed_info = _mixed_recipe(args, recipe, choices)
    mopts = MethodOptions(smoothquant_alpha=args.alpha, outlier_threshold=args.outlier_threshold,
                          rotation_seed=args.seed, qat=QATOptions(steps=args.qat_steps, seed=args.seed),
                          imatrix=args.imatrix, imatrix_out=args.imatrix_out, expert_calibration=args.expert_calibration)
    extra = {"mixed_precision": mixed_info} if args.target_bits is not None else None
    _init_distributed()
    res = quantize(args.model, calib=args.calib, text_field=args.text_field, recipe=recipe, samples=args.samples,
                   seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size, out=args.out, method_options=mopts,
                   progress=_progress(args), extra_info=extra, stream=False if args.in_memory else None, dry_run=args.dry_run)
    if res is None:  # a dry run, or a torch.distributed process other than 0
        return 0
    if res.info.get("resumed_from_block"):
        print(f"resumed at block {res.info['resumed_from_block']} (earlier blocks were already done)")
    if args.format:
        rep = _export(res.model, res.tokenizer, args.format, args.export_out, args.model, args.out, args)
        print(f"exported {args.format} -> {args.export_out}: {rep}")
    if args.report:
        html_path, _ = _quantize_report(args, res)
        print(f"report -> {html_path}")
    b = res.info["bytes"]
    for key in ("outlier_split", "qat", "imatrix", "imatrix_out", "expert_tokens"):
        if key in res.info:  # tokens per expert: the summary (lowbit.json has every expert)
            print(f"{key}: {json.dumps({k: v for k, v in res.info[key].items() if k != 'per_expert'})}")
    print(f"quantized {res.info['quantized_modules']} Linear layers of {args.model} with {res.info['method']} {res.info['recipe']['scheme']['name']} "
          f"in {res.seconds:.1f}s -> {args.out} ({b['total_bytes'] / 1e6:.1f} MB: {b['quantized_bytes'] / 1e6:.1f} MB quantized, "
          f"{b['float_bytes'] / 1e6:.1f} MB float; {100 * res.info['quantized_weight_fraction']:.1f}% of weight-matrix parameters quantized)")
    return 0


def _bit_choices(text: str) -> tuple:
    """'3,4' -> (3, 4); 'q4_k,q6_k' -> GGUF types (one kind at a time)."""
    items = [b.strip().lower() for b in text.split(",")]
    if all(b.isascii() and b.isdigit() for b in items):
        return tuple(int(b) for b in items)
    if all(b in GGUF_PRESETS for b in items):
        return tuple(items)
    raise UserError(f"--bit-choices {text!r}: give comma-separated bit widths (3,4) or GGUF types "
                    f"({', '.join(GGUF_PRESETS)})")


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1): one process group, gloo on CPU, NCCL with GPUs."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _read_recipe(path: str):
    from pathlib import Path


    try:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict):
            raise TypeError("the file holds no JSON object")
        d = d.get("recipe", d)  # a lowbit.json holds its recipe under "recipe"
        return Recipe.from_dict(d)
    except OSError as e:
        raise UserError(f"--recipe {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--recipe {path}: not a lowbit recipe ({type(e).__name__}: {e})") from None


def _mixed_recipe(args, recipe, choices):
    """Measure sensitivity on two calibration windows and allocate bits (printed; the recipe lands in lowbit.json)."""
    check_text_source(args.calib)
    model, tok = load_float(args.model)
    calib, _ = text_windows(tok, args.calib, args.text_field, min(args.seq_len, 256), calib_samples=2, seed=args.seed)
    mixed, info = mixed_recipe(model, calib, recipe, args.target_bits, choices, _progress(args))
    print(f"mixed precision: {info['average_bits']:.3f} code bits/weight, layers per bits {info['layers_per_bits']}, "
          f"predicted KL {info['predicted_kl']:.4f} (uniform: " + ", ".join(f"{b}-bit {v:.4f}" for b, v in info["predicted_kl_uniform"].items()) + "); "
          f"reuse with --recipe {args.out}/lowbit.json")
    return mixed, info


def _check_report_path(path: str) -> None:
    from pathlib import Path

    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"report {path!r}: folder {parent} does not exist")


def _quantize_report(args, res):
    """Quality against the float original on held-out text, and task probes, as a report."""
    base, tok = load_float(args.model)
    _, windows = text_windows(tok, args.calib, args.text_field, args.seq_len, eval_max=args.report_windows)
    metrics = evaluate_many({"float": base, "quantized": res.model}, windows, base, progress=_progress(args))
    rows = [{"method": "float", "scheme": "-", "seconds": 0.0, "model_bytes": model_bytes(base, torch.float16)["total_bytes"],
             **metrics["float"]},
            {"method": res.info["method"], "scheme": res.info["recipe"]["scheme"]["name"], "seconds": res.seconds,
             "model_bytes": res.info["bytes"]["total_bytes"], **metrics["quantized"]}]
    quality = {"evaluation": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}, "rows": rows}
    probes = run_probes(base, {"quantized": dequantized(res.model)}, tok, load_probes(None))
    report = {"kind": "quantize", "model": args.model, "method": res.info["method"], "scheme": rows[1]["scheme"],
              "seconds": res.seconds, "quality": quality, "probes": probes}
    return write_report(report, args.report)


def cmd_analyze(args) -> int:
    check_text_source(args.text)
    _check_report_path(args.out)
    res = analyze(args.model, text=args.text, text_field=args.text_field, seq_len=args.seq_len, sets=args.sets,
                  windows=args.windows, probe_file=args.probes,
                  probe_schemes=[s.strip() for s in args.probe_schemes.split(",") if s.strip()],
                  new_tokens=args.new_tokens, sensitivity_scheme=args.sensitivity_scheme,
                  sensitivity_windows=args.sensitivity_windows, progress=_progress(args))
    html_path, json_path = write_report(res, args.out)
    for line in findings(res):
        print("- " + line)
    print("\nrecommendation:")
    for line in recommend(res):
        print("- " + line)
    print(f"\nreport -> {html_path} (figures: {json_path}); {res['seconds']:.0f}s")
    return 0


def _check_export_args(fmt: str, out: str, sources: list, args, flag: str) -> None:
    """Before any work: where the export goes, and options only its format takes."""
    if fmt != "gguf" and (args.requantize or args.embed_type != "q8_0"):
        raise UserError(f"--requantize and --embed-type apply to the gguf export, not {fmt}")
    check_output(out, file=fmt == "gguf", sources=sources, flag=flag)


def _export(model, tok, fmt, out, source, tokenizer_dir, args) -> dict:
    return export_model(model, tok, fmt, out, source=source, tokenizer_dir=tokenizer_dir,
                        requantize=args.requantize, embed_type=args.embed_type)


def cmd_export(args) -> int:
    kind, path = resolve_source(args.model)
    if kind != "lowbit":
        raise UserError(f"{args.model}: export reads a lowbit output directory (run 'lowbit quantize' first)")
    _check_export_args(args.format, args.out, [path], args, "--out")  # before loading anything
    with output_lock(args.out):
        model, tok, meta = load_quantized(path)
        rep = _export(model, tok, args.format, args.out, meta.get("source"), path, args)
    print(json.dumps({"format": args.format, "out": args.out, **rep}))
    return 0


def cmd_import(args) -> int:
    check_output(args.out, sources=[args.model])
    with output_lock(args.out):
        model, tok, qts = import_model(args.model)
        info = {"source": args.model, "imported": True, "bytes": model_bytes(model, torch.float16)}
        save_quantized(model, tok, args.out, info)
    print(f"imported {len(qts)} quantized Linear layers from {args.model} -> {args.out} "
          f"({info['bytes']['total_bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_eval(args) -> int:
    check_text_source(args.text)
    model, tok = load(args.model)
    check_context(model.config, args.seq_len, "--seq-len")
    _, windows = text_windows(tok, args.text, args.text_field, args.seq_len, eval_max=args.max_windows)
    models = {"model": model}
    baseline = None
    if args.baseline:
        baseline, _ = load(args.baseline)
    res = evaluate_many(models, windows, baseline, progress=_progress(args))["model"]
    res["model_bytes"] = model_bytes(model, torch.float16)["total_bytes"]  # float parts counted at fp16 storage, as saved
    res["windows"], res["seq_len"] = int(windows.shape[0]), args.seq_len
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:16s} {v if not isinstance(v, float) else f'{v:.4f}'}")
    return 0


def cmd_demo(args) -> int:
    """Quantize the embedded model with each method x scheme and print one quality table."""
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


def _param_count(text: str) -> int | None:
    t = text.strip().lower()
    mult = {"b": 1e9, "m": 1e6, "t": 1e12}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if t[-1:] in "bmt" else t) * mult
    except ValueError:
        return None
    if not 0 < n < float("inf"):
        raise UserError(f"{text!r}: a parameter count must be a positive number (e.g. 8e9 or 8b)")
    return int(n)


def cmd_plan(args) -> int:
    catalog = load_catalog(args.devices)
    if args.list_devices:
        for d in catalog.values():
            print(f"{d.name:22s} {d.memory_gb:6.0f} GB {d.bandwidth_gb_s:7.0f} GB/s bf16 {d.bf16_tflops:7.1f} TF "
                  f"fp8 {d.fp8_tflops or '-'!s:>7} int8 {d.int8_tops or '-'!s:>7}  [{d.source}]")
        return 0
    if not 0 <= args.headroom < 1:
        raise UserError(f"--headroom {args.headroom}: give a fraction in [0, 1)")
    params = _param_count(args.model)
    recipe = None
    if params is not None and not args.model.endswith((".json", ".gguf")):
        if not (args.layers and args.hidden and args.heads):
            raise UserError("a parameter-count MODEL needs --layers, --hidden and --heads (for the KV cache and scales)")
        arch = Arch(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads or args.heads,
                    head_dim=args.head_dim or args.hidden // args.heads, intermediate=args.intermediate or 4 * args.hidden,
                    vocab=args.vocab or 32000, name=f"{params / 1e9:g}B", params_override=params)
        if params < arch.vocab * arch.hidden:
            raise UserError(f"{args.model} parameters is fewer than the embedding table alone ({arch.vocab} x {arch.hidden}); "
                            "give the model's total parameter count (or --vocab/--hidden)")
    else:
        arch, recipe = read_model(args.model)
    scheme = Scheme.parse(args.scheme) if args.scheme else None
    if scheme is not None:
        recipe = None  # an explicit --scheme replaces the saved recipe
    inp = PlanInput(arch=arch, scheme=scheme, recipe=recipe, device=get_device(args.gpu, catalog), batch=args.batch,
                    seq_len=args.seq_len, kv_dtype=args.kv_dtype, headroom=args.headroom, replicas=args.replicas,
                    target_tokens_per_s=args.target_tokens_per_s, max_gpus_per_replica=args.max_gpus)
    p = plan(inp)
    out = p.to_dict()
    if args.compare:
        quality = _measured_quality(args.quality) if args.quality else None
        out["decision_matrix"] = decision_matrix(inp, [s.strip() for s in args.compare.split(",") if s.strip()], quality)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(format_plan(p))
    if args.compare:
        print(f"\n{'scheme':14s} {'GB':>8s} {'GPUs':>5s} {'fits':>5s} {'decode tok/s':>13s} {'decode/GPU x':>13s} "
              f"{'prefill/GPU x':>14s} {'ppl +%':>7s}")
        for r in out["decision_matrix"]:
            q = "-" if r["measured_ppl_increase_percent"] is None else f"{r['measured_ppl_increase_percent']:.1f}"
            print(f"{r['scheme']:14s} {r['total_gb']:8.2f} {r['gpus_per_replica']:5d} {str(r['fits']):>5s} "
                  f"{r['decode_tokens_per_s']:13.0f} {r['decode_speedup']:13.2f} {r['prefill_speedup']:14.2f} {q:>7s}"
                  + ("" if r["native"] else "  (format not native here)"))
    return 0


def _measured_quality(path: str) -> dict:
    """{scheme name: best measured perplexity increase in %} from a quality benchmark JSON."""
    try:
        rows = json.loads(open(path).read())["rows"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a benchmarks/quality.py JSON ({e})") from None
    base = next(r["perplexity"] for r in rows if r["method"] == "float")
    out = {}
    for r in rows[1:]:
        inc = 100 * (r["perplexity"] / base - 1)
        out[r["scheme"]] = min(inc, out.get(r["scheme"], inc))
    return out


def cmd_bench(args) -> int:
    progress = _progress(args)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    schemes = [s.strip() for s in args.scheme.split(",") if s.strip()]
    for s in schemes:
        make_recipe(s, "rtn")
    lens = [int(n) for n in args.prompt_lens.split(",") if n.strip()]
    log(f"measuring copy bandwidth ({torch.get_num_threads()} threads) ...")
    roof, read_roof = copy_bandwidth(), read_bandwidth()
    _, tok = load(args.model)
    log("building variants ...")
    models = speed_variants(args.model, schemes, args.lm_head)
    log("decode / prefill ...")
    e2e = end_to_end(models, tok, new_tokens=args.tokens, prompt_lens=lens)
    res = {"host": host_info(), "threads": torch.get_num_threads(), "roof_gb_per_s": roof, "read_roof_gb_per_s": read_roof,
           "cold_bytes": cold_bytes(), "variants": e2e}
    if not args.no_micro:
        log(f"GEMV microbenchmarks (weights rotated through {cold_bytes() >> 20} MiB, 4x the last-level cache) ...")
        res["gemv"] = gemv_bench([(4096, 4096)], read_roof)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(format_speed(res))
    return 0


def cmd_generate(args) -> int:
    if not args.prompt.strip():
        raise UserError("--prompt is empty; give the text to continue")
    dtype = getattr(torch, args.dtype)
    model, tok = load(args.model, dtype)
    model.set_attn_implementation(register_attention())
    ids = tok(args.prompt, return_tensors="pt").input_ids
    check_context(model.config, ids.shape[1] + args.max_new_tokens, f"the prompt ({ids.shape[1]} tokens) + --max-new-tokens")
    g = generate(model, ids, args.max_new_tokens, engine=args.engine, time_linears=True)
    print(args.prompt + tok.decode(g["tokens"][0]))
    if _progress(args):
        lin = g.get("decode_linear_seconds", 0.0)
        print(f"\n{g['engine']} decode loop; prefill {ids.shape[1]} tokens: {g['prefill_seconds'] * 1e3:.0f} ms; decode {g['decode_tokens']} tokens: "
              f"{g['decode_tokens_per_s']:.1f} tok/s ({1e3 * g['decode_seconds'] / max(g['decode_tokens'], 1):.1f} ms/token; "
              f"Linears {100 * lin / g['decode_seconds']:.0f}%, everything else {100 - 100 * lin / g['decode_seconds']:.0f}%)",
              file=sys.stderr)
    return 0


__all__ = ["cmd_analyze", "cmd_bench", "cmd_demo", "cmd_eval", "cmd_generate", "cmd_plan", "cmd_quantize"]
