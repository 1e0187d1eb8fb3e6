"""Prefill GEMMs of one 4-bit weight, in one process: lowbit's kernel beside the alternatives.

For each weight shape (the embedded model's 576- and 1536-wide projections, 7B shapes) and
row count (32, 128, 512 activation rows), one int4-g32 weight (q4_0's grid) timed round-robin
over `--rounds` rounds, medians reported:

- `bf16 mm`: PyTorch's bf16 GEMM on the dequantized weight, held as bf16 (what a bf16 model runs);
- `dequant+mm`: ~2 MB blocks of W dequantized into one reused buffer, then PyTorch's bf16
  GEMM on each (the AVX2 build's prefill, and the avx512 build's before
  csrc/bf16_gemm.cpp);
- `lowbit`: what dispatch runs (AMX tiles where the CPU grants them, else the AVX512-BF16 GEMM);
- `lowbit int8 act`: the same with LOWBIT_GEMV_ACT=int8 (avx512 build): activations rounded to
  int8 in blocks of 32, VNNI (csrc/vnni_gemm.cpp); llama.cpp's numerics, not bf16's.

Every path is checked against `bf16 mm` first.

    python benchmarks/prefill.py [--out results/prefill.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

import torch  # noqa: E402

from lowbit import quantize_tensor  # noqa: E402
from lowbit.evaluate.bench import environment  # noqa: E402
from lowbit.evaluate.host import host_info  # noqa: E402
from lowbit.runtime.kernels import native, select  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (4096, 4096), (11008, 4096)]


def paths(n: int, k: int) -> dict:
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(n, k) * 0.05, "int4-g32")
    kernel = select(qt, torch.bfloat16, torch.device("cpu"))
    st = kernel.prepare(qt, torch.bfloat16)
    wb = qt.dequantize().bfloat16()
    mod, args = native.module(), (st["codes"], st["scale"], st["zero"])
    blocks = lambda x: native.blocked_mm(x, n, lambda r0, r1, out: mod.int4_dequant(  # noqa: E731
        *args, n, k, st["group"], st["mode"], st["zconst"], r0, -(-r1 // native.TILE) * native.TILE, out))
    fns = {"bf16 mm": lambda x: x @ wb.t(), "dequant+mm": blocks, "lowbit": lambda x: kernel.run(x, st)}
    if native.isa() == "avx512":
        def int8_act(x):
            with environment({"LOWBIT_GEMV_ACT": "int8"}):
                return kernel.run(x, st)
        fns["lowbit int8 act"] = int8_act
    return fns


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--rows", default="32,128,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    if not native.available():
        sys.exit("lowbit's CPU kernels do not run here: nothing to compare")
    torch.set_num_threads(a.threads)
    res = {"host": host_info(), "threads": a.threads, "rounds": a.rounds, "rows": []}
    for m in map(int, a.rows.split(",")):
        for n, k in SHAPES:
            if m * n * k > 8e9:
                continue
            fns = paths(n, k)
            x = torch.randn(m, k).bfloat16()
            ref = fns["bf16 mm"](x).float()
            for name, f in fns.items():  # fp32 sums in different orders, one bf16 rounding each
                err = float((f(x).float() - ref).abs().max())
                assert err <= 0.02 * float(ref.abs().max()), (name, m, n, k, err)
            reps = max(3, int(2e9 / (2 * m * n * k)))
            times = {name: [] for name in fns}
            for _ in range(a.rounds):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        f(x)
                    times[name].append((time.perf_counter() - t0) / reps)
            us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            row = {"rows": m, "shape": [n, k], "us": us,
                   "lowbit_vs_bf16": us["bf16 mm"] / us["lowbit"], "lowbit_vs_dequant_mm": us["dequant+mm"] / us["lowbit"]}
            if "lowbit int8 act" in us:
                row["int8_act_vs_bf16"] = us["bf16 mm"] / us["lowbit int8 act"]
            res["rows"].append(row)
            print(f"{m:4d} rows {n:5d}x{k:<5d} " + "  ".join(f"{name} {t:9.0f} us" for name, t in us.items())
                  + f"  lowbit: {row['lowbit_vs_bf16']:.2f}x bf16, {row['lowbit_vs_dequant_mm']:.2f}x dequant+mm"
                  + (f", int8 act {row['int8_act_vs_bf16']:.2f}x bf16" if "int8_act_vs_bf16" in row else ""),
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
