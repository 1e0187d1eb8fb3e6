"""lowbit's GGUF files against llama.cpp's own quantizer, judged by llama.cpp itself.

For each GGUF type: `llama-quantize --pure` (every block tensor at that type; token
embedding and head Q8_0, as lowbit writes them), the same with an importance matrix that
`llama-imatrix` made from lowbit's calibration windows, and lowbit's own file (RTN or
GPTQ on the type's exact grid, exported to GGUF). Each file is scored by
`llama-perplexity --kl-divergence` against llama.cpp's F32 run of the float model on
held-out text: KLD, same top token, perplexity, and the file's size.

    python benchmarks/gguf.py --types q4_0,q4_k,iq4_nl --methods rtn,rtn+imatrix,gptq --json-out results/gguf.json

Needs llama.cpp's tools (python -m lowbit.io.interop.llamacpp builds them, ~8 minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# this file's own folder would shadow the `gguf` package with this script: put src/ in its place
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

from lowbit.api import quantize  # noqa: E402
from lowbit.evaluate.host import host_info  # noqa: E402
from lowbit.io.interop import llamacpp  # noqa: E402
from lowbit.io.interop.gguf_io import export_gguf  # noqa: E402
from lowbit.io.text import calibration_windows, load_text, split_text, tokenize  # noqa: E402
from lowbit.models import load_float  # noqa: E402
from lowbit.models.load import embedded_gguf  # noqa: E402
from lowbit.quantization.job import MethodOptions  # noqa: E402

MODEL = "smollm2-135m"


def kld(model: Path, base: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    out = llamacpp.run("llama-perplexity", "-m", model, "-f", text, "-c", ctx, "--chunks", chunks,
                       "--kl-divergence-base", base, "--kl-divergence", threads=threads)
    log = out.stdout + out.stderr
    get = lambda pat: float(re.search(pat, log).group(1))  # noqa: E731
    return {"kld": get(r"Mean\s+KLD:\s+([-0-9.]+)"), "same_top": get(r"Same top p:\s+([0-9.]+)"),
            "ppl": get(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"), "bytes": model.stat().st_size}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="q8_0,q6_k,q5_k,q5_0,q4_k,q4_0,iq4_nl,iq4_xs,q3_k,q2_k")
    ap.add_argument("--methods", default="rtn,rtn+imatrix,gptq",
                    help="lowbit's methods: rtn, rtn+imatrix (llama-imatrix's own file), gptq")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=64, help="held-out chunks of --seq-len tokens")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json-out")
    a = ap.parse_args()
    llamacpp.build()
    model, tok = load_float(MODEL)
    calib, heldout = split_text(load_text("wiki"))
    res = {"host": host_info(), "model": MODEL, "methods": a.methods.split(","), "samples": a.samples, "seq_len": a.seq_len,
           "chunks": a.chunks, "llama_cpp": llamacpp.SDIST, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "heldout.txt"
        text.write_text(heldout, encoding="utf-8")
        # llama-imatrix sees exactly the token windows lowbit calibrates on (decoded back to text)
        windows = calibration_windows(tokenize(tok, calib), a.samples, a.seq_len, seed=0)
        calib_txt = tmp / "calib.txt"
        calib_txt.write_text("".join(tok.decode(w) for w in windows), encoding="utf-8")
        f32, base, imatrix = tmp / "f32.gguf", tmp / "base.kld", tmp / "imatrix.gguf"
        export_gguf(model, None, f32, source_gguf=embedded_gguf(MODEL), embed_type="f32", float_type="f32")
        llamacpp.run("llama-perplexity", "-m", f32, "-f", text, "-c", a.seq_len, "--chunks", a.chunks,
                     "--kl-divergence-base", base, threads=a.threads)
        llamacpp.run("llama-imatrix", "-m", f32, "-f", calib_txt, "-c", a.seq_len, "--chunks", a.samples,
                     "-o", imatrix, threads=a.threads)
        for t in a.types.split(","):
            row = {"type": t}
            for label, extra in (("llama-quantize", []), ("llama-quantize+imatrix", ["--imatrix", imatrix])):
                out = tmp / f"{t}-{len(extra)}.gguf"
                llamacpp.run("llama-quantize", "--pure", "--token-embedding-type", "q8_0", "--output-tensor-type",
                             "q8_0", *extra, f32, out, t.upper(), a.threads)
                row[label] = kld(out, base, text, a.seq_len, a.chunks, a.threads)
                out.unlink()
            for m in a.methods.split(","):
                t0 = time.perf_counter()
                mopts = MethodOptions(imatrix=str(imatrix)) if m.endswith("+imatrix") else None
                q = quantize(MODEL, scheme=t, method=m.removesuffix("+imatrix"), samples=a.samples, seq_len=a.seq_len,
                             method_options=mopts, progress=False)
                secs = time.perf_counter() - t0
                out = tmp / f"{t}-lowbit.gguf"
                export_gguf(q.model, None, out, source_gguf=embedded_gguf(MODEL))
                row[f"lowbit {m}"] = {**kld(out, base, text, a.seq_len, a.chunks, a.threads), "seconds": round(secs, 1)}
                out.unlink()
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(table(res))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))


def table(res: dict) -> str:
    cols = ["llama-quantize", "llama-quantize+imatrix", *(f"lowbit {m}" for m in res["methods"])]
    lines = [f"{res['model']}, llama.cpp's KLD vs its F32 run ({res['chunks']} x {res['seq_len']} held-out tokens); "
             f"calibration {res['samples']} x {res['seq_len']}; host: {res['host']['cpu']}",
             "| type | " + " | ".join(f"{c} KLD (same top)" for c in cols) + " | MiB |", "|---" * (len(cols) + 2) + "|"]
    for r in res["rows"]:
        cells = [f"{r[c]['kld']:.4f} ({r[c]['same_top']:.1f}%)" for c in cols]
        sizes = sorted({r[c]["bytes"] for c in cols})
        lines.append(f"| {r['type'].upper()} | " + " | ".join(cells) + f" | {' / '.join(f'{b / 2**20:.1f}' for b in sizes)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
