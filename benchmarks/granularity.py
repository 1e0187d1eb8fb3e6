"""The classic table: why granularity matters when a few input channels are outliers.

A 512x512 Gaussian weight with 8 input columns scaled x20 (the outlier-channel
pattern of LLM activations folded into weights). For INT8 and INT4: relative
Frobenius error and stored bytes vs FP16, per-tensor, per-channel (one scale per
output row), groups of 128/64/32 along the input dimension, each with absmax and
MSE-optimal clipping. Prints a table, then one JSON object.

    python benchmarks/granularity.py [--json-out FILE]
"""
import argparse
import json
import sys

import torch

from lowbit import quantize_tensor
from lowbit.evaluate.host import host_info


def run(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(512, 512, generator=g)
    outliers = torch.randperm(512, generator=g)[:8]
    w[:, outliers] *= 20
    fp16_bytes = w.numel() * 2
    rows = []
    for bits in (8, 4):
        for gran in ("tensor", "channel", "g128", "g64", "g32"):
            for clip in ("", "-mse"):
                name = f"int{bits}-{gran}{clip}"
                qt = quantize_tensor(w, name)
                err = float((qt.dequantize() - w).norm() / w.norm())
                rows.append({
                    "scheme": name, "bits": bits, "granularity": gran, "scale": "mse" if clip else "absmax",
                    "rel_error": err, "bytes": qt.nbytes, "bits_per_weight": qt.bits_per_weight,
                    "memory_vs_fp16": qt.nbytes / fp16_bytes,
                })
    return {"matrix": [512, 512], "outlier_columns": 8, "outlier_scale": 20, "fp16_bytes": fp16_bytes, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", help="also write the JSON here")
    args = ap.parse_args()
    res = {"host": host_info(), **run()}
    print(f"{'scheme':18s} {'rel.err':>8s} {'bytes':>8s} {'bits/w':>7s} {'vs fp16':>8s}", file=sys.stderr)
    for r in res["rows"]:
        print(f"{r['scheme']:18s} {r['rel_error']:8.4f} {r['bytes']:8d} {r['bits_per_weight']:7.3f} {r['memory_vs_fp16']:8.3f}", file=sys.stderr)
    out = json.dumps(res, indent=1)
    print(out)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
