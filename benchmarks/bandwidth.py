"""Decode where DRAM is the limit: a Llama-3.2-3B-shaped model, lowbit beside llama.cpp.

The embedded model (88 MB at 4 bits) can sit in a large L3; this one cannot (~1.7 GB at
4 bits). Random weights (transformers' own initialization, seed 0) in Llama-3.2-3B's
block shapes: 28 layers, hidden 3072, MLP 8192, 24 query / 8 KV heads of 128, tied
embeddings; the vocabulary is the embedded tokenizer's 49152 (not 128256) so that the
GGUF export carries a real tokenizer llama.cpp loads. Speed does not depend on the values.

In one run: lowbit fp32 decode (the Python loop: PyTorch's GEMV), then round-robin
(`--rounds`, one run each per round): the DRAM read roof, llama.cpp's llama-bench on lowbit's
Q4_0 export of the same codes (head Q8_0), lowbit q4_0 with an int8 head (the C++ step) with
bf16 activations and, where the avx512 build runs, with the int4 GEMV on int8 activations
(LOWBIT_GEMV_ACT=int8: llama.cpp's numerics), and lowbit's default weight-only scheme
w4a16-g64 (4.25 bits per weight against Q4_0's 4.5: not the same format, so not the
like-for-like ratio). Reported: tokens/s (medians of the rounds), bytes read per token and
that rate as a share of the DRAM read roof (of the largest of the rounds', and the median of
each round's own), and lowbit over llama.cpp taken round by round, so that the host's drift
over minutes moves both sides of each ratio alike.

    python benchmarks/bandwidth.py [--out results/bandwidth.json] [--tokens 32] [--rounds 5]
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file's folder holds gguf.py, which would shadow the `gguf` package: put src/ in its place
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

import torch  # noqa: E402

from lowbit.evaluate.bench import environment, ratio_by_round, read_bandwidth, round_robin  # noqa: E402
from lowbit.evaluate.host import host_info, huge_page_bytes, transparent_hugepage  # noqa: E402
from lowbit.io.interop import llamacpp  # noqa: E402
from lowbit.runtime.kernels import native  # noqa: E402

Q4, A8, LLAMA = "q4_0 +int8 lm_head", "q4_0 +int8 lm_head, int8 activations", "llama.cpp Q4_0"
G64 = "w4a16-g64 +int8 lm_head"
SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
             num_key_value_heads=8, head_dim=128, vocab_size=49152, tie_word_embeddings=True,
             rope_theta=500000.0, max_position_embeddings=8192)


def decode_rate(model, tokens: int, env: dict[str, str] | None = None) -> dict:
    """Tokens/s of lowbit's decoder at batch 1 after a 4-token prompt, and whether the C++
    step ran them."""
    from lowbit.runtime.generate import generate

    with environment(env or {}):
        r = generate(model, torch.arange(4)[None], tokens + 1, engine="lowbit")
    return {"decode_tokens_per_s": r["decode_tokens_per_s"], "native_step": r["native_step"]}


def weight_bytes(model) -> int:
    """Bytes a decoded token reads: every Linear's stored weight (codes, scales, zero points),
    not the embedding table (one row per token) unless it is also the head."""
    from lowbit.runtime.qlinear import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bandwidth.json")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.api import make_recipe, quantize
    from lowbit.core.scheme import Scheme
    from lowbit.io.interop.gguf_io import export_gguf
    from lowbit.models.load import embedded_gguf

    llamacpp.build()

    def float_model():  # the same weights each time (seed 0): two fp32 copies would need 24 GB
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()

    def quantized(scheme: str):
        recipe = make_recipe(scheme, "rtn")
        # absmax scales: the codes do not change the speed, and q4_0's MSE search takes minutes per block here
        recipe.scheme = dataclasses.replace(recipe.scheme, scale_method="absmax")
        recipe.overrides["lm_head"] = Scheme.parse("w8a16")
        return quantize(float_model(), recipe=recipe, progress=True, float_dtype=torch.bfloat16).model.to(torch.bfloat16)

    model = float_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e9:.2f} B parameters", file=sys.stderr)
    rows = {"fp32": decode_rate(model, max(2, args.tokens // 8))}  # fp32 reads 12 GB a token: a few suffice
    rows["fp32"]["bytes_per_token"] = weight_bytes(model)
    print(f"fp32 {rows['fp32']['decode_tokens_per_s']:.2f} tok/s", file=sys.stderr)
    del model
    model, g64 = quantized("q4_0"), quantized("w4a16-g64")
    models = {Q4: model, A8: model, G64: g64}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "lowbit-q4_0.gguf"
        export_gguf(model, None, gguf, source_gguf=embedded_gguf("smollm2-135m"), requantize="q8_0")
        # round-robin, one run each per round (llama-bench: one repetition after its warm-up);
        # a read roof per round, as the host's bandwidth drifts by minutes
        tasks = {"read roof": read_bandwidth, LLAMA: lambda: llamacpp.bench(gguf, prompt=0, gen=args.tokens, reps=1,
                                                                            threads=args.threads),
                 Q4: lambda: decode_rate(model, args.tokens)}
        with environment({"LOWBIT_GEMV_ACT": "int8"}):
            if native.gemv_act_int8():
                tasks[A8] = lambda: decode_rate(model, args.tokens, {"LOWBIT_GEMV_ACT": "int8"})
        tasks[G64] = lambda: decode_rate(g64, args.tokens)
        for name in (Q4, A8, G64):  # warm-up: the first call builds the C++ step
            if name in tasks:
                tasks[name]()
        huge = huge_page_bytes()  # the kernels' weight copies (both models) on 2 MiB pages
        print(f"on 2 MiB pages: {(huge or 0) / 1e9:.2f} GB of {(weight_bytes(model) + weight_bytes(g64)) / 1e9:.2f} GB "
              f"of weights (THP {transparent_hugepage()})", file=sys.stderr)
        got = round_robin(tasks, args.rounds)
        gguf_bytes = gguf.stat().st_size
    roofs = got.pop("read roof")
    read_roof = max(roofs)
    for name, runs in got.items():
        per_round = [r["decode_tokens_per_s"] for r in runs]
        rows[name] = {"decode_tokens_per_s": statistics.median(per_round), "decode_tokens_per_s_rounds": per_round}
        if name != LLAMA:
            nbytes = weight_bytes(models[name])
            rows[name].update(bytes_per_token=nbytes, native_step=runs[-1]["native_step"],
                              # each round's rate over the roof read just before it (the host's
                              # bandwidth flips between ~30 and ~65 GB/s within seconds)
                              percent_of_round_roof=statistics.median(
                                  100 * t * nbytes / 1e9 / r for t, r in zip(per_round, roofs, strict=True)))
    peer = rows.pop(LLAMA)
    for r in rows.values():
        r["read_gb_per_s"] = r["decode_tokens_per_s"] * r["bytes_per_token"] / 1e9
        r["percent_of_read_roof"] = 100 * r["read_gb_per_s"] / read_roof
    versus = {n: ratio_by_round(rows[n]["decode_tokens_per_s_rounds"], peer["decode_tokens_per_s_rounds"])
              for n in (Q4, A8, G64) if n in rows}
    res = {"host": host_info(), "threads": args.threads, "shape": SHAPE, "params": params,
           "huge_page_bytes": huge, "kernel_weight_bytes": weight_bytes(model) + weight_bytes(g64),
           "read_roof_gb_per_s": read_roof, "read_roofs_by_round": roofs, "variants": rows,
           "llama_cpp": {"sdist": llamacpp.SDIST, "file": "lowbit's Q4_0 export (head Q8_0)", "file_bytes": gguf_bytes,
                         **peer},
           "q4_0_vs_fp32": rows[Q4]["decode_tokens_per_s"] / rows["fp32"]["decode_tokens_per_s"],
           "vs_llama_cpp_q4_0": versus,
           "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    for n, r in rows.items():
        print(f"lowbit {n:24s} {r['decode_tokens_per_s']:7.2f} tok/s  {r['bytes_per_token'] / 1e9:5.2f} GB/token  "
              f"{r['read_gb_per_s']:5.1f} GB/s = {r['percent_of_read_roof']:.0f}% of the read roof ({read_roof:.1f} GB/s)"
              + (f", median {r['percent_of_round_roof']:.0f}% of its round's" if "percent_of_round_roof" in r else ""),
              file=sys.stderr)
    print(f"llama.cpp Q4_0 (lowbit's file)  {peer['decode_tokens_per_s']:.2f} tok/s "
          f"(rounds {', '.join(f'{x:.2f}' for x in peer['decode_tokens_per_s_rounds'])}); "
          f"lowbit q4_0 / fp32 {res['q4_0_vs_fp32']:.2f}x", file=sys.stderr)
    for n, v in versus.items():
        print(f"lowbit {n} / llama.cpp Q4_0: {v['median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in v['by_round'])})",
              file=sys.stderr)


if __name__ == "__main__":
    main()
