"""A Mixtral-shaped model quantized by streaming, then decoded: measured figures beside the planner's.

Writes a checkpoint with Mixtral's layout (8 experts, top-2, GQA; experts stored per
expert as `block_sparse_moe.experts.{e}.w1/w2/w3`, the names transformers saves) with
random bf16 weights at a smaller width, then in child processes: `lowbit quantize` (the
default streamed run: peak RSS, wall time, the pre-flight prediction), and batch-1 greedy
decode through lowbit's decode loop of the W4 output and of the bf16 float model with
the same per-expert Linears. Beside each measured figure, the planner's: total and
active parameters, stored bytes, and decode tokens/s at this host's measured DRAM read
bandwidth (decode at batch 1 reads the dense weights and the 2 routed experts per layer).

    python benchmarks/moe.py --dir /tmp/lowbit-mixtral --json-out results/moe.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from bigmodel import run, write_random  # noqa: E402  (this folder is sys.path[0])

SHAPES = {
    # Mixtral-8x7B's structure (8 experts, top-2, GQA 32/8 -> 16/4) at a quarter of its width: 1.19 B parameters, 2.4 GB bf16
    "mixtral-1.2b": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=49152),
    # for a quick look
    "mixtral-0.2b": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=49152),
}

DECODE = r"""
import json, sys, time, torch
import lowbit
from lowbit.models.moe import unfuse_experts
from lowbit.runtime.generate import generate
path, dtype, new = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
model, _ = lowbit.load(path, dtype)
unfuse_experts(model)  # the float model runs the same per-expert Linears as the quantized one (a no-op there)
ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
generate(model, ids, 4)  # warm-up
r = generate(model, ids, new)
print(json.dumps({"engine": r["engine"], "decode_tokens_per_s": r["decode_tokens_per_s"]}))
"""


def write_checkpoint(shape: str, d: Path, shard_bytes: int = 1 << 30) -> dict:
    """Random bf16 weights under the names transformers saves Mixtral with (per-expert w1/w2/w3)."""
    from accelerate import init_empty_weights
    from transformers import MixtralConfig, MixtralForCausalLM

    from lowbit.models.disk_names import DiskNames
    from lowbit.models.moe import unfuse_experts

    cfg = MixtralConfig(**SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=4096, sliding_window=None,
                        torch_dtype="bfloat16")
    with init_empty_weights():
        model = MixtralForCausalLM(cfg)
    names = DiskNames(model)
    unfuse_experts(model, copy_weights=False)
    return write_random(d, cfg, {names.disk(k): tuple(v.shape) for k, v in model.state_dict().items()}, shard_bytes)


def predicted(d: Path, scheme: str | None, bw: float) -> dict:
    from lowbit.core.scheme import Recipe, Scheme
    from lowbit.plan.planner import _stored_bytes, read_model

    arch, _ = read_model(str(d))
    wb, expert_b = _stored_bytes(arch, Recipe(scheme=Scheme.parse(scheme)) if scheme else None)
    stored = sum(wb.values())
    step = stored - expert_b * (1 - arch.experts_read(1))  # batch 1 reads the dense weights and k of E experts
    return {"parameters": arch.parameters, "active_parameters": arch.active_parameters, "stored_bytes": stored,
            "decode_bytes_per_token": step, "decode_tokens_per_s": bw * 1e9 / step}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="mixtral-1.2b")
    ap.add_argument("--dir", default="/tmp/lowbit-mixtral", help="where the synthetic checkpoint goes (reused if there)")
    ap.add_argument("--scheme", default="w4a16-g128")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    from lowbit.evaluate.host import host_info

    d, out = Path(a.dir), Path(f"{a.dir}-{a.scheme}")
    ck = write_checkpoint(a.shape, d)
    from lowbit.evaluate.bench import read_bandwidth

    bw = read_bandwidth()
    res = {"host": host_info(), "threads": torch.get_num_threads(), "shape": a.shape, "config": SHAPES[a.shape],
           "scheme": a.scheme, "checkpoint": ck, "checkpoint_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
           "dram_read_gb_s": bw}
    shutil.rmtree(out, ignore_errors=True)
    q = run(["quantize", str(d), "--method", "rtn", "--scheme", a.scheme, "--out", str(out)])
    q["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    res["quantize"] = {k: v for k, v in q.items() if k != "stdout"} | {"summary": q["stdout"][-1]}
    res["planner"] = {"bf16": predicted(d, None, bw), a.scheme: predicted(out, a.scheme, bw)}
    res["decode"] = {}
    for label, path, dtype in (("bf16", d, "bfloat16"), (a.scheme, out, "bfloat16")):
        r = run([str(path), dtype, str(a.new_tokens)], python=DECODE)
        res["decode"][label] = {**json.loads(r["stdout"][-1]), "peak_rss_gb": r["peak_rss_gb"]}
    res["decode"]["w4_over_bf16"] = res["decode"][a.scheme]["decode_tokens_per_s"] / res["decode"]["bf16"]["decode_tokens_per_s"]
    print(json.dumps({k: v for k, v in res.items() if k != "host"}, indent=1))
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(res, indent=1) + "\n")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
