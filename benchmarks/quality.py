"""The full quality table on the embedded model (the pipeline issue's protocol).

128 calibration windows of 512 tokens from the first half of the wiki text, 64
held-out windows of 512 from the second half; every variant scored against the
float model: perplexity, KL divergence, top-1 agreement, stored bytes, time.

    python benchmarks/quality.py [--out results/quality.json] [--variants rtn:w4a16-g64,gptq:w4a16-g64-asym-mse]
"""
import argparse
import json
import os
import sys

# this file's folder holds gguf.py, which would shadow the `gguf` package: put src/ in its place
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

from lowbit.evaluate.compare import compare, format_quality_table  # noqa: E402
from lowbit.evaluate.host import host_info  # noqa: E402

DEFAULT = ",".join(
    f"{m}:{s}"
    for bits in (4, 3)
    for m, s in [("rtn", f"w{bits}a16-g64"), ("rtn", f"w{bits}a16-g64-asym"), ("rtn", f"w{bits}a16-g64-asym-mse"),
                 ("gptq", f"w{bits}a16-g64"), ("gptq", f"w{bits}a16-g64-asym"), ("gptq", f"w{bits}a16-g64-asym-mse")]
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=DEFAULT, help="comma-separated method:scheme pairs")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--out", default="results/quality.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    variants = [tuple(v.split(":", 1)) for v in args.variants.split(",") if v]
    res = compare("smollm2-135m", variants, samples=args.samples, seq_len=args.seq_len,
                  max_windows=args.max_windows, progress=not args.quiet)
    res["host"] = host_info()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(format_quality_table(res["rows"]), file=sys.stderr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
