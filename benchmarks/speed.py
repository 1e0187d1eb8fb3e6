"""Speed in one run: quantized vs float, kernels vs the measured memory roof.

1. STREAM-like copy bandwidth (the roof), 2 threads.
2. Embedded SmolLM2-135M: decode tokens/s at batch 1 (static KV cache) through
   lowbit's decode loop and through transformers' forward, and prefill tokens/s
   (prompts of 32 and 128 tokens) for fp32, bf16, fp16 and the quantized variants
   (bf16 activations, packed kernels, lm_head int8).
3. A Llama-7B-shaped layer stack (4096x4096 and 11008x4096): GEMV at batch 1
   over cache-cold weights for every path, including the naive
   dequantize-then-multiply one; and GEMM at 32 and 128 rows (prefill), where
   weight-only kernels may lose to float.

    python benchmarks/speed.py [--out results/speed.json] [--tokens 64]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from lowbit.evaluate.bench import copy_bandwidth, end_to_end, format_speed, gemv_bench, speed_variants  # noqa: E402
from lowbit.evaluate.host import host_info  # noqa: E402
from lowbit.models import load_float  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/speed.json")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, tok = load_float("smollm2-135m")
    models = speed_variants("smollm2-135m", ["w4a16-g64", "w8a16"], lm_head="int8")
    e2e = end_to_end(models, tok, new_tokens=args.tokens, prompt_lens=(32, 128))
    del models
    stack = [(4096, 4096), (11008, 4096)]
    roof = copy_bandwidth()  # measured next to the microbenchmarks it divides: it drifts on a shared host
    print(f"roof {roof:.1f} GB/s", file=sys.stderr)
    res = {
        "host": host_info(), "threads": torch.get_num_threads(), "roof_gb_per_s": roof, "variants": e2e,
        "gemv": gemv_bench(stack, roof, batch=1, group_size=128),
        "gemm_prefill": [r for b in (32, 128) for r in gemv_bench(stack, roof, batch=b, group_size=128,
                                                                   variants=["fp32", "bf16", "fp16", "int4pack", "int8pack", "lowbit"])],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(format_speed(res), file=sys.stderr)
    print(f"\n{'GEMM (prefill rows)':44s} {'rows':>5s} {'us':>9s} {'GB/s':>7s}", file=sys.stderr)
    for g in res["gemm_prefill"]:
        print(f"{g['variant'] + ' ' + 'x'.join(map(str, g['shape'])):44s} {g['batch']:5d} {g['us_per_call']:9.1f} "
              f"{g['gb_per_s']:7.1f}", file=sys.stderr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
