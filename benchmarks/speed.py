"""Speed in one run: quantized vs float, kernels vs the measured memory roof.

1. DRAM read and copy bandwidth (the roofs), 2 threads; a GEMV's % is of the read roof.
2. Embedded SmolLM2-135M: decode tokens/s at batch 1 (static KV cache) through
   lowbit's decode loop and through transformers' forward, and prefill tokens/s
   (prompts of 32 and 128 tokens, the last position's logits, as llama-bench's pp) for fp32,
   bf16, fp16 and the quantized variants (bf16 activations, packed kernels, lm_head int8);
   where the avx512 build runs, q4_0 is timed a second time with its GEMVs and 4-bit prefill
   on int8 activations (LOWBIT_GEMV_ACT=int8, the rounding llama.cpp applies to every
   quantized type's dot products).
3. llama.cpp (built from the llama-cpp-python sdist), timed by llama-bench in the same
   round-robin rounds as lowbit's variants (`--rounds`) on the same model: F32, F16, BF16,
   Q8_0 and Q4_0 from llama-quantize, and lowbit's own Q4_0 export (same threads; decode of
   `--tokens`, prefill of 128); lowbit q4_0 over llama.cpp Q4_0 is taken round by round.
4. A Llama-7B-shaped layer stack (4096x4096 and 11008x4096): GEMV at batch 1
   over cache-cold weights for every path, including the naive
   dequantize-then-multiply one; and GEMM at 32 and 128 rows (prefill), where
   weight-only kernels may lose to float.

    python benchmarks/speed.py [--out results/speed.json] [--tokens 64]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# this file's folder holds gguf.py, which would shadow the `gguf` package: put src/ in its place
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

import torch  # noqa: E402

from lowbit.evaluate.bench import (  # noqa: E402
    cold_bytes,
    copy_bandwidth,
    end_to_end,
    environment,
    format_speed,
    gemv_bench,
    ratio_by_round,
    read_bandwidth,
    speed_variants,
)
from lowbit.evaluate.host import host_info  # noqa: E402
from lowbit.io.interop import llamacpp  # noqa: E402
from lowbit.io.interop.gguf_io import export_gguf  # noqa: E402
from lowbit.models import load_float  # noqa: E402
from lowbit.models.load import embedded_gguf  # noqa: E402
from lowbit.runtime.kernels import native  # noqa: E402

Q4, A8 = "q4_0 +int8 lm_head", "q4_0 +int8 lm_head, int8 activations"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/speed.json")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds of every variant and llama.cpp file")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                    help="skip llama.cpp (its tools are built on first use, ~8 minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.llama_cpp:
        llamacpp.build()
    float_model, tok = load_float("smollm2-135m")
    models = speed_variants("smollm2-135m", ["q4_0", "w4a16-g64", "w8a16"], lm_head="int8")
    tmp = tempfile.mkdtemp()
    files = llama_cpp_files(float_model, models[Q4], tmp) if args.llama_cpp else {}
    # llama.cpp in lowbit's rounds (one llama-bench repetition per round, as lowbit's one
    # generate): a host that drifts moves both figures of a round together
    peers = {f"llama.cpp {n}": partial(llamacpp.bench, f, gen=args.tokens, reps=1, threads=args.threads)
             for n, f in files.items()}
    env = {}
    with environment({"LOWBIT_GEMV_ACT": "int8"}):
        if native.gemv_act_int8():
            models[A8] = models[Q4]  # the same model, timed with int8 activations
            env[A8] = {"LOWBIT_GEMV_ACT": "int8"}
    # lowbit's q4_0 last and llama.cpp's Q4_0 first: each round runs the two sides of the
    # headline ratio back to back (this host's speed moves by 20% within a minute)
    models = {**{n: m for n, m in models.items() if n != Q4}, Q4: models[Q4]}
    peers = dict(sorted(peers.items(), key=lambda kv: not kv[0].endswith("Q4_0")))
    e2e = end_to_end(models, tok, new_tokens=args.tokens, prompt_lens=(32, 128), rounds=args.rounds, env=env,
                     peers=peers)
    llama = {n: e2e.pop(n) for n in peers}
    del models
    shutil.rmtree(tmp)
    stack = [(4096, 4096), (11008, 4096)]
    roof = copy_bandwidth()  # measured next to the microbenchmarks it divides: it drifts on a shared host
    read_roof = read_bandwidth()
    print(f"roof {roof:.1f} GB/s copy, {read_roof:.1f} GB/s read (over {cold_bytes() >> 20} MiB)", file=sys.stderr)
    res = {
        "host": host_info(), "threads": torch.get_num_threads(), "roof_gb_per_s": roof, "read_roof_gb_per_s": read_roof,
        "cold_bytes": cold_bytes(), "variants": e2e,
        "llama_cpp": {"sdist": llamacpp.SDIST, "engines": llama, "vs_lowbit": vs_llama_cpp(e2e, llama)} if llama else None,
        "q4_0_vs_float": {  # the issue's bars, round by round: decode >= 3x fp32, 4-bit prefill >= bf16's
            "decode / fp32": ratio_by_round(e2e[Q4]["decode_tokens_per_s_rounds"], e2e["fp32"]["decode_tokens_per_s_rounds"]),
            "prefill 128 / bf16": ratio_by_round(e2e[Q4]["prefill_tokens_per_s_rounds"],
                                                 e2e["bf16"]["prefill_tokens_per_s_rounds"])},
        "gemv": gemv_bench(stack, read_roof, batch=1, group_size=128),
        "gemm_prefill": [r for b in (32, 128) for r in gemv_bench(stack, read_roof, batch=b, group_size=128,
                                                                   variants=["fp32", "bf16", "fp16", "int4pack", "int8pack", "lowbit"])],
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),  # when the run ended, as bandwidth.py's
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(format_speed(res), file=sys.stderr)
    print(f"\n{'GEMM (prefill rows)':44s} {'rows':>5s} {'us':>9s} {'GB/s':>7s}", file=sys.stderr)
    for g in res["gemm_prefill"]:
        print(f"{g['variant'] + ' ' + 'x'.join(map(str, g['shape'])):44s} {g['batch']:5d} {g['us_per_call']:9.1f} "
              f"{g['gb_per_s']:7.1f}", file=sys.stderr)
    for n, r in res["q4_0_vs_float"].items():
        print(f"lowbit q4_0 {n}: {r['median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in r['by_round'])})", file=sys.stderr)
    if llama:
        print("\n" + format_peer(res), file=sys.stderr)
    print(json.dumps(res, indent=1))


def llama_cpp_files(model, q4_0, tmp: str) -> dict[str, Path]:
    """The embedded model as GGUF files llama.cpp runs: F32 (lowbit's float export), F16/BF16/Q8_0/Q4_0
    by llama-quantize from it (token embedding and head Q8_0 for the quantized ones, as lowbit's
    int8 head), and lowbit's own Q4_0 codes exported (its int8 head re-rounded to Q8_0)."""
    tmp = Path(tmp)
    files = {"F32": tmp / "f32.gguf"}
    export_gguf(model, None, files["F32"], source_gguf=embedded_gguf("smollm2-135m"), embed_type="f32", float_type="f32")
    for t in ("F16", "BF16", "Q8_0", "Q4_0"):
        files[t] = tmp / f"{t}.gguf"
        heads = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"] if t.startswith("Q") else []
        llamacpp.run("llama-quantize", "--pure", *heads, files["F32"], files[t], t, "2")
    files["Q4_0 (lowbit's export)"] = tmp / "lowbit-q4_0.gguf"
    export_gguf(q4_0, None, files["Q4_0 (lowbit's export)"], source_gguf=embedded_gguf("smollm2-135m"), requantize="q8_0")
    return files


def vs_llama_cpp(variants: dict, llama: dict) -> dict:
    """lowbit's q4_0 (bf16 and, where timed, int8 activations) over llama.cpp's Q4_0, decode and
    prefill at 128, round by round (bench.ratio_by_round)."""
    ref = llama["llama.cpp Q4_0"]
    return {f"{n} / llama.cpp Q4_0 {what}": ratio_by_round(variants[n][f"{key}_rounds"], ref[f"{key}_rounds"])
            for n in (Q4, A8) if n in variants
            for what, key in (("decode", "decode_tokens_per_s"), ("prefill 128", "prefill_tokens_per_s"))}


def format_peer(res: dict) -> str:
    """lowbit beside llama.cpp: decode and prefill (128-token prompt) tokens/s (medians of the
    rounds), and the ratios round by round."""
    lc, v = res["llama_cpp"], res["variants"]
    lines = [f"{'':34s} {'decode tok/s':>14s} {'prefill 128':>14s}"]
    for n, r in {**lc["engines"], **{f"lowbit {n}": r for n, r in v.items()}}.items():
        lines.append(f"{n:34s} {r['decode_tokens_per_s']:14.1f} {r['prefill_tokens_per_s']:14.0f}")
    for n, r in lc["vs_lowbit"].items():
        lines.append(f"{n}: {r['median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in r['by_round'])})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
