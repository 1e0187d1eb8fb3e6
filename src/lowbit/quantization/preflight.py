"""Pre-flight: predict a streamed quantization's peak RAM, disk and wall time, and refuse
a job this machine cannot hold before any of it runs.

The prediction comes from the checkpoint's tensor shapes (read from the safetensors
headers), the recipe, the calibration size and quick measurements of this machine (a
float32 GEMM, GPTQ's factorisation and column loop, one checkpoint tensor read, rounded and
dequantized, a float tensor copied as the output's float shards are, a read from the
checkpoint) plus the seconds the process has already run. Memory is
counted term by term after the streaming pipeline (quantization.stream): the process as it is
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

from lowbit.core.tensor import CHUNK_ELEMENTS
from lowbit.errors import UserError
from lowbit.models.lazy import LazyCheckpoint, numel
from lowbit.plan.planner import linear_bytes

GB = 1e9


@dataclass
class Machine:
    gflops: float  # float32 GEMM throughput
    read_gb_s: float  # reading the checkpoint
    quant_ns: dict = field(default_factory=dict)  # (ns per weight, ns per column) of GPTQ, by input width
    pipeline_ns: dict = field(default_factory=dict)  # ns per weight to read, round and unpack, by input width
    factor_s_per_n3: float = 0.0  # GPTQ's cols^3 factorisation
    copy_ns: float = 0.0  # ns per element to copy a float tensor outside the blocks to the output
    started_s: float = 0.0  # seconds this process has already run (imports, reading the model's layout)

    @classmethod
    def measure(cls, ckpt: LazyCheckpoint, scheme, quantizer: str, widths: dict[int, str]) -> "Machine":
        """`widths`: input width -> one checkpoint tensor of that width (measured on its first rows)."""
        import psutil

        a = torch.randn(2048, 2048)
        torch.mm(a, a)
        t = time.perf_counter()
        for _ in range(2):
            torch.mm(a, a)
        gflops = 2 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9
        factor = _factor_s_per_n3() if quantizer == "gptq" else 0.0
        gptq_ns = {w: _quant_ns(scheme, w, gflops, factor) for w in widths} if quantizer == "gptq" else {}
        return cls(gflops, _read_speed(ckpt), gptq_ns, {w: _pipeline_ns(ckpt, k, scheme) for w, k in widths.items()}, factor,
                   _copy_ns(ckpt), time.time() - psutil.Process().create_time())


def _copy_ns(ckpt: LazyCheckpoint) -> float:
    """ns per element to read, check, cast and serialise a float tensor as the output's
    float shards are written (lowbit.stream.copy_float_shard), on a 64 MB slice of the
    largest one."""
    key = max(ckpt.keys(), key=lambda k: ckpt.nbytes([k]))
    rows, cols = ckpt.shapes[key][0], numel(ckpt.shapes[key][1:])
    take = min(rows, max(1, (64 << 20) // (2 * cols)))
    t = time.perf_counter()
    w = ckpt.read_rows(key, 0, take)
    if w.is_floating_point():
        bool(torch.isfinite(w).all())
        w.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()
    return (time.perf_counter() - t) / max(w.numel(), 1) * 1e9


def _factor_s_per_n3(n: int = 2048) -> float:
    """Seconds per n^3 of GPTQ's inverse-Hessian factorisation (Cholesky, inverse, Cholesky),
    which runs well below the GEMM rate."""
    from lowbit.algorithms.gptq import _inverse_hessian_factor

    x = torch.randn(2 * n, n)
    H = x.t() @ x / x.shape[0]
    t = time.perf_counter()
    _inverse_hessian_factor(H, 0.01)
    return (time.perf_counter() - t) / n ** 3


def _pipeline_ns(ckpt: LazyCheckpoint, key: str, scheme) -> float:
    """ns per weight to read a tensor, cast it, round it to the scheme and dequantize it
    (what every weight costs in the streamed run), on a slice large enough (64 MB in
    float32) to fall out of the caches as the real tensors do."""
    from lowbit.algorithms.rtn import rtn

    rows, cols = ckpt.shapes[key][0], numel(ckpt.shapes[key][1:])
    take = min(rows, max(1, (64 << 20) // (4 * cols)))
    t = time.perf_counter()
    w = ckpt.read_rows(key, 0, take).float()
    rtn(w, scheme).dequantize()
    return (time.perf_counter() - t) / w.numel() * 1e9


def _read_speed(ckpt: LazyCheckpoint, size: int = 128 << 20) -> float:
    f = max(set(ckpt.where.values()), key=lambda p: p.stat().st_size)
    t = time.perf_counter()
    with open(f, "rb", buffering=0) as h:
        n = 0
        while n < size and (chunk := h.read(16 << 20)):
            n += len(chunk)
    return max(n / (time.perf_counter() - t) / GB, 0.05)


def _quant_ns(scheme, cols: int, gflops: float, factor: float) -> tuple[float, float]:
    """(ns per weight, ns per input column) for the parts of quantization that scale with
    rows x cols (rounding, scale search) and with cols alone (GPTQ's column loop), fitted
    on two row counts of a column slice. GPTQ's rows x cols^2 update and cols^3
    factorisation come from the GEMM rate instead."""
    from lowbit.algorithms.gptq import gptq

    group = scheme.group_size or 64
    cols_m = min(cols, 2048) // group * group or group
    x = torch.randn(4 * cols_m, cols_m)
    H = x.t() @ x / x.shape[0]
    times = []
    for rows in (256, 1024):
        w = torch.randn(rows, cols_m) * 0.02
        t = time.perf_counter()
        gptq(w, H, scheme)
        times.append(max(time.perf_counter() - t - 2 * rows * cols_m ** 2 / (gflops * 1e9) - factor * cols_m ** 3, 1e-6))
    per_weight = max((times[1] - times[0]) / (768 * cols_m), 0.0)
    per_col = max(times[0] - 256 * cols_m * per_weight, 0.0) / cols_m
    return per_weight * 1e9, per_col * 1e9


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
           "tensor as stored": max((ck.nbytes([k]) for b in blocks for k in b), default=0),
           # codes (1 byte per weight), the dequantized float32 copy, unpacked codes, and the
           # float32 temporaries of one row slice (core.tensor.CHUNK_ELEMENTS)
           "quantizer": 6 * big + 6 * 4 * CHUNK_ELEMENTS}
    outside = [k for k in ck.keys() if not k.startswith(f"{job.prefix}.")]
    quantized_outside = [k for k in outside if k.removesuffix(".weight") in job.targets]
    # float tensors outside the blocks are copied 64 MB at a time; one the recipe quantizes is loaded whole in float32
    ram["outside tensors"] = max([3 * (64 << 20)] + [4 * 4 * ck.nbytes([k]) // _itemsize(ck, k) for k in quantized_outside])
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
    # resident at once: the largest of the phases, never all of them, nor less than the process has
    # already held (the pre-flight's own measurements, on a small model, can be the run's peak)
    block_phase = sum(v for k, v in ram.items() if k != "outside tensors")
    finish_phase = ram["process now"] + ram["outside tensors"]
    peak = max(block_phase, finish_phase, peak_rss())

    out_bytes = 0
    for n, s in linears:
        c, sc, _ = linear_bytes(s[0], s[1], job.targets[n], job.float_bytes)
        out_bytes += c + sc
    float_numel = sum(ck.nbytes([k]) / _itemsize(ck, k) for k in ck.keys() if k.removesuffix(".weight") not in job.targets)
    out_bytes += float_numel * job.float_bytes
    disk = out_bytes + (2 * 4 * job.tokens * job.hidden if job.tokens else 0)

    # reading the blocks is inside the per-weight pipeline cost; the rest of the checkpoint is copied;
    # the time the process has run so far (imports, pre-flight measurements) is part of the wall time
    secs = {"start-up": machine.started_s,
            "outside tensors": sum(ck.nbytes([k]) / _itemsize(ck, k) for k in outside) * machine.copy_ns * 1e-9,
            "write": out_bytes / (machine.read_gb_s * GB)}
    quant = 0.0
    for _, s in linears:
        rows, cols = s
        quant += rows * cols * _by_width(machine.pipeline_ns, cols) * 1e-9
        if job.quantizer == "gptq" and job.tokens:
            ns_w, ns_c = _by_width(machine.quant_ns, cols)
            quant += (rows * cols * ns_w + cols * ns_c) * 1e-9 + 2 * rows * cols ** 2 / G + machine.factor_s_per_n3 * cols ** 3
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


def peak_rss(pid: int | str = "self") -> int:
    """A process's peak resident set so far, this one by default (Linux VmHWM: reset at exec,
    so a child does not count the parent's memory that fork() briefly shares; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _by_width(table: dict, cols: int):
    return table[cols] if cols in table else table[min(table, key=lambda w: abs(w - cols))]


def _itemsize(ck: LazyCheckpoint, key: str) -> int:
    return ck.nbytes([key]) // max(1, numel(ck.shapes[key]))


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
