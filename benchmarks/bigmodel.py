"""Big models on a small machine: quantize a synthetic Llama-3-8B-shaped checkpoint from disk.

Writes a checkpoint with the exact tensor shapes of a Llama-3-8B-class model (or a
~1B Llama shape) with random bf16 weights of realistic scale (linears N(0, 0.02),
norms 1), in 2 GB shards with an index, then runs `lowbit quantize` on it in a child
process for each method and records the child's peak RSS (VmHWM, sampled), its wall
time, and the pre-flight prediction the run printed first. GPTQ through all 32 blocks
of an 8B takes hours of two CPU cores, so `--gptq-blocks K` runs it on the first K
blocks (same shapes, same per-block peak) through an index that lists only those.

    python benchmarks/bigmodel.py --shape 8b --dir /tmp/llama8b --json-out results/bigmodel-8b.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-3-8B: 32 x (4096, 14336), GQA 32/8, vocab 128256, untied head
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    # a ~1.2B Llama shape (TinyLlama's blocks: 22 x (2048, 5632), GQA 32/4; the embedded tokenizer's 49152 vocab)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=49152),
    # ~0.2B, for the default test suite: the pre-flight held to a measured run in seconds
    "200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=49152),
}


def write_checkpoint(shape: str, d: Path, shard_bytes: int = 2 << 30) -> dict:
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192,
                      torch_dtype="bfloat16")
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    return write_random(d, cfg, shapes, shard_bytes)


def write_random(d: Path, cfg, shapes: dict[str, tuple], shard_bytes: int) -> dict:
    """A checkpoint of random bf16 tensors (Linears N(0, 0.02), norms 1) with these names and
    shapes, in shards with an index, the config and the embedded tokenizer; reused if there."""
    from safetensors.torch import save_file

    from lowbit.models.load import embedded_dir

    params = sum(_numel(s) for s in shapes.values())
    if (d / "model.safetensors.index.json").is_file():
        return {"params": params, "seconds": 0.0, "reused": True}
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for k, s in shapes.items():
        if k.endswith("norm.weight"):
            t = torch.ones(s, dtype=torch.bfloat16)
        else:
            t = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
        shard[k] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(d)
    src = embedded_dir("smollm2-135m")  # any tokenizer whose ids fit the vocabulary
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    return {"params": params, "seconds": time.time() - t0, "reused": False}


def _numel(s) -> int:
    n = 1
    for x in s:
        n *= x
    return n


def first_blocks(d: Path, k: int) -> Path:
    """A view of the checkpoint with only its first k blocks (symlinked shards, filtered index)."""
    v = d.parent / f"{d.name}-first{k}"
    shutil.rmtree(v, ignore_errors=True)
    v.mkdir()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    keep = {t: f for t, f in index["weight_map"].items()
            if not t.startswith("model.layers.") or int(t.split(".")[2]) < k}
    for f in set(keep.values()):
        os.symlink(d / f, v / f)
    (v / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = k
    (v / "config.json").write_text(json.dumps(cfg))
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, v / f.name)
    return v


def run(argv: list[str], python: str | None = None) -> dict:
    """Run `lowbit <argv>` as a child (or, with `python`, that Python code with `argv` as its
    arguments); its peak RSS, wall time and the pre-flight prediction it printed, if any."""
    from lowbit.quantization.preflight import peak_rss

    t0 = time.time()
    cmd = [sys.executable, "-c", python, *argv] if python else [sys.executable, "-m", "lowbit", "--quiet", *argv]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:  # sampled every 50 ms; VmHWM only grows, so a late sample holds every earlier peak
        peak = max(peak, peak_rss(p.pid))
        time.sleep(0.05)
    out, err = p.stdout.read(), p.stderr.read()
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"lowbit {' '.join(argv) or python} failed ({p.returncode}): {err[-2000:]}")
    m = re.search(r"peak RAM ([\d.]+) GB .*?disk ([\d.]+) GB .*?time (\d+)s", out)
    pred = {"predicted_peak_gb": float(m.group(1)), "predicted_disk_gb": float(m.group(2)),
            "predicted_seconds": float(m.group(3))} if m else {}
    return {"peak_rss_gb": peak / 1e9, "seconds": wall, **pred, "stdout": out.strip().splitlines()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--dir", default="/tmp/lowbit-llama8b", help="where the synthetic checkpoint goes (reused if there)")
    ap.add_argument("--scheme", default="w4a16-g128")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--gptq-blocks", type=int, default=2, help="GPTQ runs on the first K blocks (0: all)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    d = Path(a.dir)
    ck = write_checkpoint(a.shape, d)
    from lowbit.evaluate.host import host_info

    res = {"host": host_info(), "shape": a.shape, "config": SHAPES[a.shape], "scheme": a.scheme, "checkpoint": ck,
           "checkpoint_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
           "threads": torch.get_num_threads(), "calibration": {"samples": a.samples, "seq_len": a.seq_len}, "runs": {}}
    for method in a.methods.split(","):
        src = d
        if method != "rtn" and a.gptq_blocks:
            src = first_blocks(d, a.gptq_blocks)
        out = d.parent / f"{d.name}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        args = ["quantize", str(src), "--method", method, "--scheme", a.scheme, "--samples", str(a.samples),
                "--seq-len", str(a.seq_len), "--batch-size", "2", "--out", str(out)]
        r = run(args)
        r["blocks"] = a.gptq_blocks if (method != "rtn" and a.gptq_blocks) else SHAPES[a.shape]["num_hidden_layers"]
        r["output_bytes"] = sum(f.stat().st_size for f in out.iterdir())
        r["rss_error"] = r["predicted_peak_gb"] / r["peak_rss_gb"] - 1
        r["time_error"] = r["predicted_seconds"] / r["seconds"] - 1
        res["runs"][method] = r
        print(json.dumps({method: {k: v for k, v in r.items() if k != "stdout"}}), flush=True)
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(res, indent=1) + "\n")
    if not a.keep:
        shutil.rmtree(d, ignore_errors=True)
        for v in d.parent.glob(f"{d.name}-first*"):
            shutil.rmtree(v, ignore_errors=True)


if __name__ == "__main__":
    main()
