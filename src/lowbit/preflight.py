"""Pre-flight: predict a streamed quantization's peak RAM, disk and wall time, and refuse
a job this machine cannot hold before any of it runs.

The prediction comes from the checkpoint's tensor shapes (read from the safetensors
headers), the recipe, the calibration size and three quick measurements of this machine
(a float32 GEMM, one representative quantization, a read from the checkpoint). Memory is
counted term by term after the streaming pipeline (lowbit.stream): the process as it is
now, one block in float32, the calibration hidden states (current, next and the resume
checkpoint), one batch's intermediates, the input statistics (float64 Hessians) and the
quantizer's working set.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .models.lazy import LazyCheckpoint
from .plan import linear_bytes

GB = 1e9


@dataclass
class Machine:
    gflops: float  # float32 GEMM throughput
    read_gb_s: float  # reading the checkpoint
    quant_ns: dict = field(default_factory=dict)  # ns per weight of the quantizer, by input width

    @classmethod
    def measure(cls, ckpt: LazyCheckpoint, scheme, quantizer: str, widths: list[int]) -> "Machine":
        a = torch.randn(1024, 1024)
        torch.mm(a, a)
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, a)
        gflops = 4 * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e9
        return cls(gflops, _read_speed(ckpt), {w: _quant_ns(scheme, quantizer, w, gflops) for w in sorted(set(widths))})


def _read_speed(ckpt: LazyCheckpoint, size: int = 128 << 20) -> float:
    f = max(set(ckpt.where.values()), key=lambda p: p.stat().st_size)
    t = time.perf_counter()
    with open(f, "rb", buffering=0) as h:
        n = 0
        while n < size and (chunk := h.read(16 << 20)):
            n += len(chunk)
    return max(n / (time.perf_counter() - t) / GB, 0.05)


def _quant_ns(scheme, quantizer: str, cols: int, gflops: float) -> float:
    """Nanoseconds per weight for the parts of quantization that scale with rows x cols (the
    rounding, scale search and GPTQ's per-column work), measured on a slice of rows. GPTQ's
    rows x cols^2 update and cols^3 factorisation are added from the GEMM rate instead."""
    from .algorithms.gptq import gptq
    from .algorithms.rtn import rtn

    group = scheme.group_size or 64
    cols_m = min(cols, 1024) // group * group or group
    rows = 128
    w = torch.randn(rows, cols_m) * 0.02
    if quantizer == "gptq":
        x = torch.randn(4 * cols_m, cols_m)
        H = x.t() @ x / x.shape[0]
        t = time.perf_counter()
        gptq(w, H, scheme)
        dt = time.perf_counter() - t - (2 * rows * cols_m ** 2 + cols_m ** 3) / (gflops * 1e9)
    else:
        t = time.perf_counter()
        rtn(w, scheme)
        dt = time.perf_counter() - t
    return max(dt, 1e-6) / (rows * cols_m) * 1e9


@dataclass
class Prediction:
    peak_ram: float  # bytes
    disk: float  # bytes: the output plus the work folder at its largest
    seconds: float
    ram_parts: dict
    time_parts: dict
    available_ram: float
    free_disk: float

    def lines(self) -> list[str]:
        top = sorted(self.ram_parts.items(), key=lambda kv: -kv[1])[:3]
        return [f"pre-flight: peak RAM {self.peak_ram / GB:.2f} GB of {self.available_ram / GB:.1f} GB available "
                f"({', '.join(f'{k} {v / GB:.2f}' for k, v in top)}); disk {self.disk / GB:.2f} GB of "
                f"{self.free_disk / GB:.1f} GB free; time {self.seconds:.0f}s "
                f"({', '.join(f'{k} {v:.0f}s' for k, v in self.time_parts.items() if v >= 1)})"]

    def to_dict(self) -> dict:
        return {"peak_ram_bytes": self.peak_ram, "disk_bytes": self.disk, "seconds": self.seconds,
                "ram_parts": self.ram_parts, "time_parts": self.time_parts,
                "available_ram_bytes": self.available_ram, "free_disk_bytes": self.free_disk}


@dataclass
class Job:
    """What the prediction needs to know about the run."""
    ckpt: LazyCheckpoint
    prefix: str  # where the decoder blocks are ("model.layers")
    n_blocks: int
    targets: dict  # module name -> Scheme
    hidden: int
    intermediate: int
    heads: int
    tokens: int  # calibration tokens this process runs (0 without calibration)
    seq_len: int
    batch_size: int
    quantizer: str  # 'rtn' | 'gptq'
    hessian: bool
    float_bytes: int = 2


def predict(job: Job, machine: Machine, out: Path) -> Prediction:
    import psutil

    ck, G = job.ckpt, machine.gflops * 1e9
    blocks = [[k for k in ck.keys() if k.startswith(f"{job.prefix}.{i}.")] for i in range(job.n_blocks)]
    block_numel = max(ck.nbytes(b) / _itemsize(ck, b[0]) for b in blocks) if blocks else 0
    linears = [(n, ck.shapes[f"{n}.weight"]) for n in job.targets if f"{n}.weight" in ck.shapes]
    in_block = [(n, s) for n, s in linears if n.startswith(f"{job.prefix}.")]
    per_block = [[(n, s) for n, s in in_block if n.startswith(f"{job.prefix}.{i}.")] for i in range(job.n_blocks)]
    big = max((s[0] * s[1] for _, s in linears), default=0)
    rss = psutil.Process().memory_info().rss

    ram = {"process now": rss, "block float32": 4 * block_numel,
           "block as stored": max(ck.nbytes(b) for b in blocks) if blocks else 0,
           "quantizer": 4 * big * 3}
    outside = [k for k in ck.keys() if not k.startswith(f"{job.prefix}.")]
    largest_outside = max((ck.nbytes([k]) for k in outside), default=0)
    ram["outside tensors"] = largest_outside * (1 + job.float_bytes / _itemsize(ck, outside[0])) if outside else 0
    if job.tokens:
        hidden_b = 4 * job.tokens * job.hidden
        bt = job.batch_size * job.seq_len
        ram["hidden states"] = 3 * hidden_b  # this block's inputs, its outputs, the resume checkpoint
        ram["batch intermediates"] = 4 * bt * (3 * job.intermediate + 4 * job.hidden) + 4 * job.batch_size * job.heads * job.seq_len ** 2
        stats = max((sum(8 * s[1] ** 2 for _, s in mods) for mods in per_block), default=0) if job.hessian else 0
        gptq_ws = max((4 * (4 * s[1] ** 2 + 2 * s[0] * s[1]) for _, s in in_block), default=0) if job.quantizer == "gptq" else 0
        ram["statistics"] = stats
        ram["quantizer"] = max(ram["quantizer"], gptq_ws)
        # the embedding table is only held while the calibration windows enter block 0
        emb = max((ck.nbytes([k]) for k in outside), default=0)
        ram["block float32"] = max(ram["block float32"], emb - ram["hidden states"] / 3)
    # resident at once: the largest of the phases, never all of them
    block_phase = sum(v for k, v in ram.items() if k != "outside tensors")
    finish_phase = ram["process now"] + ram["outside tensors"]
    peak = max(block_phase, finish_phase)

    out_bytes = 0
    for n, s in linears:
        c, sc, _ = linear_bytes(s[0], s[1], job.targets[n], job.float_bytes)
        out_bytes += c + sc
    float_numel = sum(ck.nbytes([k]) / _itemsize(ck, k) for k in ck.keys() if k.removesuffix(".weight") not in job.targets)
    out_bytes += float_numel * job.float_bytes
    disk = out_bytes + (2 * 4 * job.tokens * job.hidden if job.tokens else 0)

    secs = {"read": ck.nbytes() / (machine.read_gb_s * GB), "write": out_bytes / (machine.read_gb_s * GB)}
    quant = 0.0
    for _, s in linears:
        rows, cols = s
        ns = machine.quant_ns.get(cols) or next(iter(machine.quant_ns.values()))
        quant += rows * cols * ns * 1e-9
        if job.quantizer == "gptq" and job.tokens:
            quant += (2 * rows * cols ** 2 + cols ** 3) / G
    secs["quantize"] = quant
    if job.tokens:
        lin = sum(s[0] * s[1] for _, s in in_block)
        passes = 2
        secs["calibration forward"] = passes * (2 * lin * job.tokens + 4 * job.n_blocks * job.tokens * job.seq_len * job.hidden) / G
        secs["statistics"] = sum(2 * job.tokens * s[1] ** 2 for _, s in in_block) / G if job.hessian else 0.0
        secs["checkpoints"] = job.n_blocks * 4 * job.tokens * job.hidden / (machine.read_gb_s * GB)
    try:
        free_disk = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    except OSError:
        free_disk = float("inf")
    available = psutil.virtual_memory().available + rss
    return Prediction(peak, disk, sum(secs.values()), ram, secs, available, free_disk)


def _itemsize(ck: LazyCheckpoint, key: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}.get(ck.dtypes[key], 2)


def check_fits(pred: Prediction, samples: int | None, shrink) -> None:
    """Refuse, naming what would fit, when the predicted peak or output exceeds the machine.
    `shrink(samples) -> Prediction` re-predicts with fewer calibration windows."""
    if pred.disk > pred.free_disk:
        raise UserError(f"the output needs {pred.disk / GB:.1f} GB but {pred.free_disk / GB:.1f} GB of disk is free; "
                        f"free space or choose another --out")
    if pred.peak_ram <= 0.95 * pred.available_ram:
        return
    hint = ""
    if samples:
        n = samples
        while n > 1:
            n //= 2
            if shrink(n).peak_ram <= 0.95 * pred.available_ram:
                hint = f"; --samples {n} would fit ({shrink(n).peak_ram / GB:.1f} GB)"
                break
    raise UserError(f"predicted peak RAM {pred.peak_ram / GB:.1f} GB exceeds the {pred.available_ram / GB:.1f} GB available "
                    f"(largest parts: " + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in
                                                   sorted(pred.ram_parts.items(), key=lambda kv: -kv[1])[:3]) + ")" + hint)


def env_skip() -> bool:
    """LOWBIT_SKIP_PREFLIGHT=1 runs a job the pre-flight would refuse (at the user's risk)."""
    return os.environ.get("LOWBIT_SKIP_PREFLIGHT") == "1"
