"""`lowbit` command line: demo | quantize | eval | analyze | export | import | plan | bench | generate | schemes.

User mistakes print one line and exit 2; bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lowbit.errors import UserError


def _number(kind, lo=None, hi=None, lo_open=False):
    """An argparse type: a finite int/float within [lo, hi] (lo excluded with lo_open)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{text!r} must be <= {hi:g}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


COUNT = _number(int, 1)  # windows, samples, lengths, steps: at least one
NONNEG = _number(int, 0)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        cmd = self.prog.split()[-1]
        hint = "lowbit --help" if cmd == "lowbit" else f"lowbit {cmd} --help"
        self.exit(2, f"lowbit: error: {message} (see '{hint}')\n")


def _add_model_source(p, quantized_ok: bool = True):
    p.add_argument("model", metavar="MODEL", help="'smollm2-135m' (embedded), a Hugging Face checkpoint directory, a .gguf file"
                   + (", or a lowbit output directory" if quantized_ok else " (a float model: not a lowbit output)"))


def _add_text_args(p, default_seq_len=512):
    p.add_argument("--text", default="wiki", help="'wiki' (Wikipedia articles shipped in the gensim wheel), a .txt file or a .jsonl file (default: wiki)")
    p.add_argument("--text-field", default="text", help="field to read from each JSONL record (default: text)")
    p.add_argument("--seq-len", type=COUNT, default=default_seq_len, help=f"tokens per window (default: {default_seq_len})")


def _add_export_args(p, help_format, required=False):
    p.add_argument("--format", required=required, default=None, choices=["compressed-tensors", "gguf", "gptq"], help=help_format)
    p.add_argument("--requantize", metavar="TYPE", help="gguf only: re-round schemes GGUF cannot hold exactly to this GGUF type, e.g. q4_k (the error is reported)")
    p.add_argument("--embed-type", default="q8_0", choices=["q8_0", "f16", "f32"], help="gguf only: token embedding type (default: q8_0)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lowbit", description="Quantize LLMs and measure what it buys and costs. "
                 "Start with 'lowbit demo' (quantizes the embedded SmolLM2-135M and prints a quality table).")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    # --quiet is accepted after the subcommand too; SUPPRESS keeps the top-level value otherwise
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add(*a, parents=[common], **kw)

    p = sub.add_parser("demo", help="quantize the embedded model with RTN and GPTQ at W4/W3-g64 and print a quality table")
    p.add_argument("--samples", type=COUNT, default=32, help="calibration windows (default: 32)")
    p.add_argument("--seq-len", type=COUNT, default=512, help="tokens per window (default: 512)")
    p.add_argument("--max-windows", type=COUNT, default=16, help="evaluation windows (default: 16)")
    p.add_argument("--schemes", default="w4a16-g64-asym,w3a16-g64-asym", help="comma-separated schemes (default: w4a16-g64-asym,w3a16-g64-asym)")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated methods (default: rtn,gptq)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")

    p = sub.add_parser("quantize", help="quantize a model and save it")
    _add_model_source(p, quantized_ok=False)
    p.add_argument("--method", default="gptq", help="rtn, gptq, awq, smoothquant, outlier-split, rotate, qat, or a composition "
                   "such as awq+gptq, smoothquant+gptq, rotate+gptq (default: gptq)")
    p.add_argument("--target-bits", type=_number(float, 1, 9), help="mixed precision: measure each layer's sensitivity, then give layers "
                   "the --bit-choices that average this many code bits per weight with the least predicted loss (e.g. 3.5; "
                   "with a GGUF --scheme, all stored bits per weight over GGUF types, e.g. 4.8)")
    p.add_argument("--bit-choices", help="comma-separated bit widths (3,4) or GGUF types (q4_k,q6_k) for --target-bits "
                   "(default: the two around it)")
    p.add_argument("--recipe", metavar="JSON", help="reuse a saved recipe (e.g. recipe.json of an earlier --target-bits run); "
                   "--scheme/--method/--include/--exclude are then ignored")
    p.add_argument("--alpha", type=_number(float, 0, 1), default=0.5, help="SmoothQuant migration strength (default: 0.5)")
    p.add_argument("--outlier-threshold", type=_number(float, 0, lo_open=True), default=6.0, help="outlier-split: input channels whose calibration |x| "
                   "reaches this stay in float (default: 6.0, LLM.int8's)")
    p.add_argument("--imatrix", metavar="GGUF", help="a llama.cpp importance matrix (llama-imatrix's .gguf): weights the scale "
                   "search of rtn the way llama-quantize does")
    p.add_argument("--imatrix-out", metavar="GGUF", help="also write this run's calibration statistics (sum of x^2 per input "
                   "channel) as an importance matrix llama-quantize --imatrix reads")
    p.add_argument("--expert-calibration", choices=("all-tokens", "routed"), default="all-tokens",
                   help="mixture-of-experts models: calibrate every expert on every token (default; the lower error "
                   "measured), or only on the tokens its router sends it")
    p.add_argument("--qat-steps", type=COUNT, default=64, help="qat: fine-tuning steps (default: 64)")
    p.add_argument("--scheme", default="w4a16-g64", help="scheme name, e.g. w4a16-g64, w4a16-g128-asym, w8a16 (see 'lowbit schemes')")
    p.add_argument("--calib", default="wiki", help="calibration text: 'wiki', a .txt or .jsonl file (default: wiki)")
    p.add_argument("--text-field", default="text", help="JSONL field (default: text)")
    p.add_argument("--samples", type=COUNT, default=128, help="calibration windows (default: 128)")
    p.add_argument("--seq-len", type=COUNT, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERN", help="module name pattern kept in float (repeatable; default: lm_head and embeddings)")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN", help="only quantize modules matching (repeatable; default: all Linears)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (a killed run resumes when the same command is run again)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="calibration windows per forward pass (default: 8)")
    p.add_argument("--dry-run", action="store_true", help="predict peak RAM, disk and time for this machine, then stop")
    p.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming it block by block "
                   "from disk (rotate and qat always do; no resume)")
    _add_export_args(p, "also write the model in this serving format to --export-out")
    p.add_argument("--export-out", help="where --format writes (a directory; a .gguf file for gguf)")
    p.add_argument("--report", metavar="HTML", help="also write an HTML report (quality vs float on held-out text, task probes) and its JSON")
    p.add_argument("--report-windows", type=COUNT, default=16, help="held-out windows for --report (default: 16)")

    p = sub.add_parser("analyze", help="why a scheme works or breaks: outliers, sensitivity, studies, task probes -> HTML report")
    _add_model_source(p)
    _add_text_args(p, default_seq_len=256)
    p.add_argument("--sets", type=COUNT, default=4, help="disjoint text sets for outlier persistence (plus the probe prompts) (default: 4)")
    p.add_argument("--windows", type=COUNT, default=4, help="windows per text set (default: 4)")
    p.add_argument("--probes", metavar="FILE", help="extra probe prompts: JSONL {prompt, category} or one prompt per line")
    p.add_argument("--probe-schemes", default="w4a16-g64-asym,w3a16-g64-asym", help="schemes (RTN) whose generations are compared with float (default: w4a16-g64-asym,w3a16-g64-asym)")
    p.add_argument("--new-tokens", type=COUNT, default=24, help="greedy tokens per probe (default: 24)")
    p.add_argument("--sensitivity-scheme", default="w3a16-g64-asym", help="scheme for one-layer-at-a-time sensitivity (default: w3a16-g64-asym)")
    p.add_argument("--sensitivity-windows", type=COUNT, default=2, help="held-out windows of 128 tokens for sensitivity (default: 2)")
    p.add_argument("--out", default="report.html", help="HTML report; the JSON goes beside it (default: report.html)")

    p = sub.add_parser("export", help="write a lowbit output as compressed-tensors (vLLM), GGUF (llama.cpp) or GPTQ")
    p.add_argument("model", metavar="DIR", help="a lowbit output directory (from 'lowbit quantize')")
    _add_export_args(p, "serving format", required=True)
    p.add_argument("--out", required=True, help="output directory (a .gguf file for gguf)")

    p = sub.add_parser("import", help="read a GGUF / compressed-tensors / GPTQ / AWQ checkpoint into a lowbit output, codes unchanged")
    p.add_argument("model", metavar="SOURCE", help="a .gguf file or a compressed-tensors / GPTQ / AWQ checkpoint directory")
    p.add_argument("--out", required=True, help="lowbit output directory")

    p = sub.add_parser("eval", help="perplexity, and KL / top-1 agreement against a baseline")
    _add_model_source(p)
    p.add_argument("--baseline", help="model to compare against (for KL divergence and top-1 agreement)")
    _add_text_args(p)
    p.add_argument("--max-windows", type=COUNT, default=64, help="evaluation windows (default: 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("plan", help="memory, GPUs, fleet and roofline speed for a deployment")
    p.add_argument("model", metavar="MODEL_OR_CONFIG", help="HF directory or config.json, .gguf file, lowbit output, or a parameter count (e.g. 8e9) with --layers/--hidden/--heads")
    p.add_argument("--scheme", default=None, help="weight scheme (default: the lowbit output's own, else fp16)")
    p.add_argument("--kv-dtype", default="fp16", choices=["fp16", "bf16", "fp8", "int8"])
    p.add_argument("--batch", type=COUNT, default=8, help="concurrent sequences per replica (default: 8)")
    p.add_argument("--seq-len", type=COUNT, default=8192, help="context length per sequence (default: 8192)")
    p.add_argument("--gpu", default="h100-sxm", help="device name (see --list-devices; default: h100-sxm)")
    p.add_argument("--devices", help="JSON file of extra devices (same keys as the catalog)")
    p.add_argument("--headroom", type=_number(float, 0, 0.99), default=0.3, help="fraction of device memory kept free (default: 0.3)")
    p.add_argument("--max-gpus", type=_number(int, 1, 4096), default=8, help="most GPUs one replica may span (default: 8)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--replicas", type=COUNT, help="replicas in the fleet")
    g.add_argument("--target-tokens-per-s", type=_number(float, 0, lo_open=True), help="size the fleet for this aggregate decode throughput")
    p.add_argument("--compare", default=None, help="comma-separated schemes for a decision matrix (e.g. w8a16,fp8,w4a16-g128)")
    p.add_argument("--quality", help="a benchmarks/quality.py JSON: attach measured perplexity increases to the matrix")
    for flag in ("layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate", "vocab"):
        p.add_argument(f"--{flag}", type=COUNT, help=f"architecture: {flag} (for a parameter-count MODEL)")
    p.add_argument("--list-devices", action="store_true", help="print the device catalog with sources and exit")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="decode/prefill speed, quantized vs float, and GEMV kernels vs the memory roof")
    _add_model_source(p)
    p.add_argument("--scheme", default="w4a16-g64,w8a16", help="comma-separated schemes to time (default: w4a16-g64,w8a16)")
    p.add_argument("--lm-head", default="int8", choices=["int8", "float"], help="output projection: int8 per channel or bf16 (default: int8)")
    p.add_argument("--tokens", type=COUNT, default=64, help="tokens to decode (default: 64)")
    p.add_argument("--prompt-lens", default="32,128", help="prefill lengths (default: 32,128)")
    p.add_argument("--no-micro", action="store_true", help="skip the GEMV microbenchmarks")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="greedy generation with a static KV cache, and where the time goes")
    _add_model_source(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=COUNT, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="activation dtype (bf16: packed kernels; fp32: reference path) (default: bfloat16)")
    p.add_argument("--engine", default="auto", choices=["auto", "lowbit", "transformers"],
                   help="decode loop: lowbit's (Llama/Mistral/Qwen2/Qwen3) or transformers' forward; auto picks lowbit's where it runs")

    p = sub.add_parser("schemes", help="list scheme presets and the name grammar")
    p.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.cmd:
        ap.print_help()
        return 2
    try:
        return _COMMANDS[args.cmd](args) or 0
    except UserError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    except OSError as e:
        from lowbit.io.files import disk_full_error

        err = disk_full_error(getattr(e, "filename", None) or "the output", e)
        if err is None:
            raise
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2


def cmd_schemes(args) -> int:
    from lowbit.core.scheme import GGUF_PRESETS, PRESETS, VALID_FORMS, Scheme

    rows = []
    for name in (*PRESETS, *GGUF_PRESETS):
        s = Scheme.parse(name)
        rows.append({"name": name, "weights": s.with_(activations=None).name, "activations": s.activations.name if s.activations else "float"})
    if args.json:
        print(json.dumps({"presets": rows, "grammar": VALID_FORMS}, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:12s} weights {r['weights']:32s} activations {r['activations']}")
        print("\n" + VALID_FORMS)
    return 0


def _lazy(modname, fn):
    def run(args):
        import importlib

        return getattr(importlib.import_module(f"lowbit.cli.{modname}"), fn)(args)

    return run


_COMMANDS = {
    "schemes": cmd_schemes,
    "demo": _lazy("commands", "cmd_demo"),
    "quantize": _lazy("commands", "cmd_quantize"),
    "eval": _lazy("commands", "cmd_eval"),
    "analyze": _lazy("commands", "cmd_analyze"),
    "plan": _lazy("commands", "cmd_plan"),
    "bench": _lazy("commands", "cmd_bench"),
    "generate": _lazy("commands", "cmd_generate"),
    "export": _lazy("commands", "cmd_export"),
    "import": _lazy("commands", "cmd_import"),
}
