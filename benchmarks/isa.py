"""Every build of lowbit's CPU kernels this host runs, measured in one run.

A CPU without AVX512-BF16 gets the AVX2 build (csrc/avx2.cpp). On an AVX-512 host this
times both builds on the same memory system, so the fallback's cost is a ratio, not a
guess about another machine:

1. The embedded SmolLM2-135M: decode tokens/s at batch 1 (lowbit's decode loop, the C++
   step) and prefill tokens/s (128-token prompt) of q4_0 (+ int8 head) per build, beside
   fp32 and bf16, round-robin over `--rounds` rounds, medians reported.
2. Llama-7B-shaped GEMV (4096x4096, 11008x4096) at batch 1 on cache-cold weights: lowbit's
   int4 (groups of 32, as q4_0) per build, beside fp32 and bf16 PyTorch.

Where the avx512 build runs, both also run its GEMVs on activations rounded to int8
(LOWBIT_GEMV_ACT=int8: AVX512-VNNI, llama.cpp's numerics), and 3. says what that rounding
costs: the q4_0 model decodes held-out text token by token (teacher-forced) with bf16 and
with int8 activations; KL divergence and top-1 agreement of each against the fp32 model.

    python benchmarks/isa.py [--out results/isa.json]
"""
import argparse
import json
import os
import statistics
import sys
from functools import partial

sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

import torch  # noqa: E402

from lowbit.evaluate.bench import (  # noqa: E402
    gemv_bench,
    prefill_tokens_per_s,
    read_bandwidth,
    round_robin,
    speed_variants,
)
from lowbit.evaluate.host import host_info  # noqa: E402
from lowbit.evaluate.quality import kl_and_agreement  # noqa: E402
from lowbit.io.text import split_text, tokenize, wiki_text  # noqa: E402
from lowbit.models import load_float  # noqa: E402
from lowbit.runtime.decode import Decoder  # noqa: E402
from lowbit.runtime.generate import generate  # noqa: E402
from lowbit.runtime.kernels import native  # noqa: E402


def pin(isa: str | None, act: str = "bf16"):
    """Dispatch on the `isa` build from now on (None: the best one the CPU runs), the int4
    GEMV on `act` activations."""
    native.isa.cache_clear()
    if isa is None:
        os.environ.pop("LOWBIT_ISA", None)
    else:
        os.environ["LOWBIT_ISA"] = isa
    os.environ["LOWBIT_GEMV_ACT"] = act


@torch.no_grad()
def teacher_forced_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[T, vocab] fp32 next-token logits, one token at a time through lowbit's decode loop."""
    dec = Decoder(model, ids.shape[1])
    return torch.cat([dec.forward(ids[:, t:t + 1]).float().reshape(1, -1) for t in range(ids.shape[1])])


def agreement(ref: torch.Tensor, logits: torch.Tensor) -> dict:
    kl, agree = kl_and_agreement(torch.log_softmax(ref, -1), torch.log_softmax(logits, -1))
    return {"kl": kl / len(ref), "top1": agree / len(ref)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/isa.json")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    builds = [i for i in native.BUILDS if native.build(i) is not None]
    if not builds:
        sys.exit("isa.py: no build of lowbit's CPU kernels runs on this host")
    _, tok = load_float("smollm2-135m")
    models = speed_variants("smollm2-135m", ["q4_0"], lm_head="int8")
    q4 = "q4_0 +int8 lm_head"
    runs = [("fp32", None, "bf16"), ("bf16", None, "bf16")] + [(q4, i, "bf16") for i in builds]
    if "avx512" in builds:
        runs.append((q4, "avx512", "int8"))
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    prompt = torch.randint(0, models["fp32"].config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    for name, isa, act in runs:  # warm-up (and the kernels' first-use costs)
        pin(isa, act)
        generate(models[name], ids, 8)

    def timed(model, isa, act):  # decode, then prefill of the 128-token prompt, on this build
        pin(isa, act)
        return generate(model, ids, args.tokens)["decode_tokens_per_s"], prefill_tokens_per_s(model, prompt, repeat=1)

    got = round_robin({r: partial(timed, models[r[0]], *r[1:]) for r in runs}, args.rounds)
    decode = {r: [d for d, _ in got[r]] for r in runs}
    prefill = {r: [p for _, p in got[r]] for r in runs}
    quality = []
    if "avx512" in builds:
        text = tokenize(tok, split_text(wiki_text())[1])[None, :args.quality_tokens]
        pin(None)
        ref = teacher_forced_logits(models["fp32"], text)
        for act in ("bf16", "int8"):
            pin("avx512", act)
            quality.append({"model": q4, "gemv_activations": act, "tokens": text.shape[1],
                            **agreement(ref, teacher_forced_logits(models[q4], text))})
    del models
    rows = []
    for r in runs:
        name, isa, act = r
        rows.append({"model": name, "kernels": isa, "gemv_activations": act,
                     "decode_tokens_per_s": statistics.median(decode[r]),
                     "prefill_tokens_per_s": statistics.median(prefill[r]),
                     "decode_rounds": decode[r], "prefill_rounds": prefill[r]})
    fp32 = rows[0]["decode_tokens_per_s"]
    for r in rows:
        r["decode_vs_fp32"] = r["decode_tokens_per_s"] / fp32
    stack = [(4096, 4096), (11008, 4096)]
    roof = read_bandwidth()
    pin(None)
    gemv = gemv_bench(stack, roof, group_size=32, variants=["=fp32", "=bf16"])
    for _, isa, act in runs[2:]:
        pin(isa, act)
        gemv += [dict(r, variant=f"{r['variant']} ({isa}{', int8 activations' if act == 'int8' else ''})")
                 for r in gemv_bench(stack, roof, group_size=32, variants=["lowbit-int4"])]
    pin(None)
    res = {"host": host_info(), "threads": torch.get_num_threads(), "read_roof_gb_per_s": roof,
           "embedded": rows, "gemv": gemv, "quality_vs_fp32": quality}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'embedded model':28s} {'kernels':8s} {'act':5s} {'decode tok/s':>12s} {'x fp32':>7s} {'prefill 128':>12s}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['model']:28s} {r['kernels'] or '-':8s} {r['gemv_activations']:5s} {r['decode_tokens_per_s']:12.1f} "
              f"{r['decode_vs_fp32']:7.2f} {r['prefill_tokens_per_s']:12.0f}", file=sys.stderr)
    for q in quality:
        print(f"{q['model']} ({q['gemv_activations']} activations) vs fp32 over {q['tokens']} tokens: "
              f"KL {q['kl']:.5f}, top-1 {100 * q['top1']:.1f}%", file=sys.stderr)
    print(f"\nGEMV, batch 1, cold weights (read roof {roof:.1f} GB/s)", file=sys.stderr)
    for r in gemv:
        print(f"{r['variant']:40s} {'x'.join(map(str, r['shape'])):11s} {r['us_per_call']:9.0f} us {r['gb_per_s']:6.1f} GB/s "
              f"{r['percent_of_roof']:5.0f}%", file=sys.stderr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
