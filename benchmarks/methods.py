"""Every method x scheme on the embedded model, in one table (the methods issue's benchmark).

Default protocol (sized to run all 20 variants in about 20 minutes on 2 cores):
calibration 16 windows of 256 tokens from the first half of the wiki text; evaluation
16 held-out windows of 256 from the second half; QAT 16 steps of 4 x 128 tokens;
mixed precision measures sensitivity on one calibration window. The quality table's
full protocol is --samples 128 --seq-len 512 --max-windows 64 (hours for all rows).
Every variant is scored against the float model: perplexity, KL, top-1 agreement,
stored bytes, wall time (quantization, including any search or fine-tuning). A second
table measures the KV cache quantized (INT8/FP8, per-token or per-head scales) on the
float model, with the bytes the cache holds next to the planner's arithmetic.

    python benchmarks/methods.py [--out results/methods.json] [--samples 16] [--seq-len 256] [--max-windows 16] [--only w8a8,w4a4]
"""
import argparse
import json
import os
import sys
import time

# this file's folder holds gguf.py, which would shadow the `gguf` package: put src/ in its place
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

import torch  # noqa: E402

from lowbit.algorithms.qat import QATOptions  # noqa: E402
from lowbit.evaluate.compare import compare, format_quality_table  # noqa: E402
from lowbit.evaluate.host import host_info  # noqa: E402
from lowbit.evaluate.quality import kl_and_agreement  # noqa: E402
from lowbit.quantization.job import MethodOptions  # noqa: E402

W = "-g64-asym"
VARIANTS = {
    "w4a16-g64": [(m, "w4a16" + W) for m in ("rtn", "gptq", "awq", "awq+gptq")],
    "w3a16-g64": [(m, "w3a16" + W) for m in ("rtn", "gptq", "awq", "awq+gptq", "qat")] + ["mixed"],
    "w8a8": [(m, "w8a8") for m in ("rtn", "smoothquant", "smoothquant+gptq", "outlier-split")],
    "w4a8": [(m, "w4a8") for m in ("rtn", "rotate", "rotate+gptq")],
    "w4a4": [(m, "w4a4") for m in ("rtn", "rotate", "rotate+gptq")],
}


def mixed_3_5(calib, base):
    """GPTQ with bits per layer (3 or 4, 3.5 on average) from one-layer sensitivity on one calibration window."""
    from lowbit.algorithms.mixed import mixed_recipe
    from lowbit.api import make_recipe

    recipe, info = mixed_recipe(base, calib[:1, :256], make_recipe("w3a16" + W, "gptq"), 3.5, progress=False)
    return recipe, {"mixed_precision": {k: v for k, v in info.items() if k != "bits"}}


def kv_table(source: str, max_windows: int, seq_len: int) -> list[dict]:
    from lowbit.io.text import text_windows
    from lowbit.models.load import load_float
    from lowbit.plan.planner import arch_from_hf_config, kv_cache_bytes
    from lowbit.runtime.kvcache import QuantizedKVCache, cache_kwargs, kv_logprobs

    model, tok = load_float(source)
    _, windows = text_windows(tok, "wiki", "text", seq_len, eval_max=max_windows)
    arch = arch_from_hf_config(model.config.to_dict())
    rows = []
    for fmt, gran in ((None, "-"), ("int8", "token"), ("int8", "head"), ("fp8", "token"), ("fp8", "head")):
        nll = kl = agree = n = 0.0
        for b in windows.split(2):
            ref = kv_logprobs(model, b, None)
            lp = ref if fmt is None else kv_logprobs(model, b, fmt, gran)
            t = b[:, 1:].unsqueeze(-1)
            nll += float(-lp.gather(-1, t).sum())
            kl_b, agree_b = kl_and_agreement(ref, lp)
            kl, agree = kl + kl_b, agree + agree_b
            n += t.numel()
        cache = QuantizedKVCache(model.config, fmt or "int8", gran if fmt else "token")
        with torch.no_grad():
            model(input_ids=windows[:1], **cache_kwargs(model, cache), use_cache=True)
        rows.append({"kv_cache": fmt or "fp16", "scales": gran, "perplexity": float(torch.tensor(nll / n).exp()),
                     "kl_divergence": kl / n, "top1_agreement": agree / n,
                     "bytes_per_token": (cache.nbytes() / seq_len) if fmt else kv_cache_bytes(arch, 1, 1, "fp16"),
                     "planner_bytes_per_token": kv_cache_bytes(arch, 1, 1, fmt or "fp16")})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--qat-steps", type=int, default=16)
    ap.add_argument("--only", help="comma-separated scheme groups (default: all of " + ",".join(VARIANTS) + ")")
    ap.add_argument("--no-kv", action="store_true", help="skip the KV-cache table")
    ap.add_argument("--out", default="results/methods.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    groups = args.only.split(",") if args.only else list(VARIANTS)
    variants = [mixed_3_5 if v == "mixed" else v for g in groups for v in VARIANTS[g]]
    t0 = time.time()
    res = compare("smollm2-135m", variants, samples=args.samples, seq_len=args.seq_len,
                  max_windows=args.max_windows, progress=not args.quiet,
                  method_options=MethodOptions(qat=QATOptions(steps=args.qat_steps, seq_len=128)))
    res["host"] = host_info()
    if not args.no_kv:
        res["kv_cache"] = kv_table("smollm2-135m", min(args.max_windows, 16), args.seq_len)
    res["total_seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(format_quality_table(res["rows"]), file=sys.stderr)
    for r in res.get("kv_cache", []):
        print(f"kv {r['kv_cache']:5s} {r['scales']:6s} ppl {r['perplexity']:.3f} KL {r['kl_divergence']:.5f} "
              f"top-1 {100 * r['top1_agreement']:.1f}% bytes/token {r['bytes_per_token']:.0f} "
              f"(planner {r['planner_bytes_per_token']:.0f})", file=sys.stderr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
