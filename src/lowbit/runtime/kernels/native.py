"""lowbit's own CPU kernels (csrc/), compiled on first use for the ISA the CPU has.

PyTorch's int4pack kernel reaches a fraction of the memory roof at batch 1; these
unpack codes in registers next to the multiply and read each weight byte once. Two
builds of one set of ops (csrc/ops.cpp) over one packed layout:

- "avx512" (csrc/avx512.cpp): AVX-512 with AVX512-BF16, nibbles turned into bf16 by one
  logic op and multiplied by a bf16 dot-product instruction (vdpbf16ps); prefill on AMX-BF16
  tiles (csrc/amx_gemm.cpp) where the kernel grants them, else on a vdpbf16ps GEMM
  (csrc/bf16_gemm.cpp), W dequantized 32 rows at a time for either; and, opt-in
  (`LOWBIT_GEMV_ACT=int8`, `gemv_act_int8()`), a GEMV on activations rounded to int8
  (AVX512-VNNI integer dot products: llama.cpp's numerics, faster where vdpbf16ps is slow).
- "avx2" (csrc/avx2.cpp): AVX2 + FMA, codes multiplied in fp32, for CPUs without
  AVX512-BF16.

`module()` builds the best the CPU runs (`LOWBIT_ISA=avx2` forces the fallback); where no
build applies or compiles, `available()` is False and dispatch falls back to PyTorch's
kernels. A build (about a minute, once) lands in torch's extension cache.

Numerics: sums in fp32 and the group scale applied in fp32, so the only roundings are
fp32 sums and the bf16 output; the reference path rounds the dequantized weight to bf16 first.
With int8 activations, x is first rounded to int8 in blocks of 32 columns (scale amax/127)
and the kernel computes dequant(W) @ x_hat: exact integer products, fp32 from there on.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from lowbit.core.tensor import QuantizedTensor

CSRC = Path(__file__).parent / "csrc"  # + common.h, lowbit_cpu.h: headers only


class Build:
    def __init__(self, isa: str, cpu_flags: tuple[str, ...], sources: tuple[str, ...], cflags: tuple[str, ...]):
        self.isa, self.cpu_flags = isa, cpu_flags
        self.sources = [CSRC / s for s in ("ops.cpp", "decode_step.cpp") + sources]
        self.cflags = ["-O3", "-fopenmp", *cflags]
        self.name = f"lowbit_cpu_{isa}"  # torch's extension cache rebuilds it when a source changes


BUILDS = {  # best first
    "avx512": Build("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "f16c", "fma"),
                    ("avx512.cpp", "amx_gemm.cpp", "bf16_gemm.cpp", "vnni_gemm.cpp"),
                    ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mf16c", "-mfma",
                     "-DLOWBIT_PREFILL")),
    "avx2": Build("avx2", ("avx2", "fma", "f16c"), ("avx2.cpp",), ("-mavx2", "-mfma", "-mf16c")),
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runs(isa: str) -> bool:
    """Whether this CPU runs the `isa` build's instructions."""
    return sys.platform == "linux" and set(BUILDS[isa].cpu_flags) <= _cpu_flags()


@lru_cache(maxsize=None)
def build(isa: str):
    """The compiled `isa` build, or None (the CPU lacks its ISA, or no compiler)."""
    if not runs(isa):
        return None
    b = BUILDS[isa]
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        out = Path(_get_build_directory(b.name, verbose=False))
        with _build_lock(out):
            if not any(out.glob("*.so")):
                print(f"lowbit: compiling its {isa} CPU kernels (once, ~60 s)", file=sys.stderr, flush=True)
            return load(name=b.name, sources=[str(p) for p in b.sources], extra_cflags=b.cflags,
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler must not break inference: PyTorch's kernels remain
        warnings.warn(f"lowbit: native {isa} CPU kernels unavailable ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); using PyTorch's packed kernels", stacklevel=2)
        return None


@lru_cache(maxsize=1)
def isa() -> str | None:
    """The build dispatch uses: the best one this CPU runs that compiled, or the one LOWBIT_ISA
    names; None with LOWBIT_NATIVE_KERNELS=0."""
    if os.environ.get("LOWBIT_NATIVE_KERNELS", "1") == "0":
        return None
    forced = os.environ.get("LOWBIT_ISA")
    if forced is not None and forced not in BUILDS:
        raise ValueError(f"LOWBIT_ISA={forced!r}: expected one of {', '.join(BUILDS)}")
    for name in BUILDS if forced is None else (forced,):
        if build(name) is not None:
            return name
    if forced is not None:
        warnings.warn(f"lowbit: LOWBIT_ISA={forced}, but this CPU does not run that build; using PyTorch's packed kernels",
                      stacklevel=2)
    return None


def module():
    """The compiled build dispatch uses, or None (then PyTorch's kernels run)."""
    name = isa()
    return build(name) if name else None


@contextmanager
def _build_lock(build: Path):
    """An flock around torch's build. torch's own lock is a plain file that a killed build
    leaves behind, and every later load then waits on it forever; the kernel drops an flock
    with its holder, so while we hold ours a `lock` file left in `build` is stale."""
    from lowbit.io.files import wait_lock

    build.mkdir(parents=True, exist_ok=True)
    with wait_lock(build.parent / f".{build.name}.lowbit-build-lock"):
        (build / "lock").unlink(missing_ok=True)  # stale: no lowbit build holds our lock
        yield


def available() -> bool:
    return module() is not None


def amx() -> bool:
    """Prefill on AMX tiles (csrc/amx_gemm.cpp): the avx512 build runs, the CPU has AMX-BF16,
    the kernel lets this process use the tile state, and LOWBIT_AMX is not 0. Otherwise the
    avx512 build's prefill runs on AVX512-BF16 (csrc/bf16_gemm.cpp), and the avx2 build's
    dequantizes blocks for PyTorch's bf16 GEMM."""
    return isa() == "avx512" and _amx_granted()


@lru_cache(maxsize=1)
def _amx_granted() -> bool:
    return (os.environ.get("LOWBIT_AMX", "1") != "0" and {"amx_tile", "amx_bf16"} <= _cpu_flags()
            and build("avx512").amx_ready())


GEMV_ACTS = ("bf16", "int8")


def gemv_act_int8() -> bool:
    """Whether lowbit's int4 and int8 GEMVs (up to GEMV_MAX_ROWS activation rows, so decode)
    and its prefill GEMMs round their activations to int8 in blocks of 32 first:
    `LOWBIT_GEMV_ACT=int8`, and the avx512 build runs. llama.cpp does this for every
    quantized type; lowbit keeps bf16 activations unless asked, because it changes the
    numbers (benchmarks/isa.py measures the KL it adds and the speed it buys). Read at each
    call, so a benchmark can switch."""
    act = os.environ.get("LOWBIT_GEMV_ACT", "bf16")
    if act not in GEMV_ACTS:
        raise ValueError(f"LOWBIT_GEMV_ACT={act!r}: expected one of {', '.join(GEMV_ACTS)}")
    if act == "int8" and isa() != "avx512":
        _warn_no_int8_gemv()
        return False
    return act == "int8"


@lru_cache(maxsize=1)
def _warn_no_int8_gemv():
    warnings.warn(f"lowbit: LOWBIT_GEMV_ACT=int8 needs the avx512 build of lowbit's kernels (this process uses "
                  f"{isa() or 'none'}); the GEMVs keep bf16 activations", stacklevel=3)


# ---- int4: every <= 4-bit integer scheme; groups of any multiple of 32 -------------

def _group_size(qt: QuantizedTensor) -> int:
    s = qt.scheme
    return s.group_size if s.granularity == "group" else qt.shape[-1]


def int4_supports(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> bool:
    s = qt.scheme
    if not (device.type == "cpu" and dtype == torch.bfloat16 and s.number_format.kind == "int" and s.bits <= 4
            and s.granularity in ("group", "channel") and len(qt.shape) == 2):
        return False
    k, g = qt.shape[1], _group_size(qt)
    return k % 64 == 0 and k % g == 0 and g % 32 == 0 and available()


TILE = 4  # weight rows interleaved per tile (csrc/common.h)


BLOCK = 512  # columns per block of the avx512 build's blocked region (csrc/avx512.cpp)


def pack_int4(codes: torch.Tensor, blocks: int = 0) -> torch.Tensor:
    """uint8 codes [n, k] (values < 16) -> the kernel's tiled layout, flat uint8.

    Rows are padded to a multiple of 4 and grouped in tiles of 4. Per tile: for each
    128-column chunk, 4 rows x 64 bytes, the row's 16-bit word l = col l | col l+32 << 4 |
    col l+64 << 8 | col l+96 << 12 (little endian); then, if k % 128 == 64, 4 rows x 32
    bytes, byte j = col j | col j+32 << 4. Before that, in each of the first `blocks`
    512-column blocks (the build's `int4_blocks`), column 32 p + 2 t + e moves to
    32 t + 2 p + e (p, t < 16, e < 2), so that a GEMV's lane p holds columns of run p alone."""
    n, k = codes.shape
    if blocks:
        head = codes[:, :BLOCK * blocks].reshape(n, blocks, 16, 16, 2).transpose(2, 3).reshape(n, BLOCK * blocks)
        codes = torch.cat([head, codes[:, BLOCK * blocks:]], dim=1)
    c = _pad_rows(codes.to(torch.uint8))
    n_pad = c.shape[0]
    k128 = k - k % 128
    main = c[:, :k128].reshape(n_pad, k128 // 128, 4, 32)
    words = torch.stack([main[:, :, 0] | (main[:, :, 1] << 4), main[:, :, 2] | (main[:, :, 3] << 4)], dim=-1)
    tiles = [words.reshape(n_pad // TILE, TILE, k128 // 128, 64).transpose(1, 2).reshape(n_pad // TILE, -1)]
    if k % 128:
        tail = c[:, k128:].reshape(n_pad, 2, 32)
        tiles.append((tail[:, 0] | (tail[:, 1] << 4)).reshape(n_pad // TILE, TILE * 32))
    return torch.cat(tiles, dim=1).reshape(-1).contiguous()


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0]
    n_pad = -(-n // TILE) * TILE
    return torch.cat([t, t.new_zeros(n_pad - n, *t.shape[1:])]).contiguous() if n_pad != n else t.contiguous()


def _scale_tensor(t: torch.Tensor) -> torch.Tensor:
    """fp16 when that is exact (the usual stored dtype: half the bytes), else fp32."""
    t = t.float()
    h = t.half()
    return h.contiguous() if torch.equal(h.float(), t) else t.contiguous()


def int4_prepare(qt: QuantizedTensor, dtype: torch.dtype) -> dict:
    s = qt.scheme
    scale = qt.scales()
    z = qt.zero_points()
    if z is None:  # symmetric: codes are v + 2^(b-1)
        mode, zero, zconst = 0, torch.empty(0), float(1 << (s.bits - 1))
    elif s.float_zero:  # w = scale * code + offset
        mode, zero, zconst = 2, z, 0.0
    else:  # w = scale * (code - z)
        mode, zero, zconst = 1, z.to(torch.uint8).contiguous(), 0.0
    scale = _scale_tensor(scale)
    if mode == 2:
        zero = zero.to(scale.dtype).contiguous()
        if not torch.equal(zero.float(), z):  # offsets not exact in fp16: keep both in fp32
            scale, zero = qt.scales().contiguous(), z.contiguous()
    g = _group_size(qt)
    return {"codes": on_huge_pages(pack_int4(qt.unpacked_codes(), module().int4_blocks(qt.shape[1], g))),
            "scale": on_huge_pages(_pad_rows(scale)), "zero": on_huge_pages(_pad_rows(zero)) if mode else zero,
            "mode": mode, "zconst": zconst, "group": g, "n": qt.shape[0]}


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels keep what a GEMV reads once per token: from 2 MiB up, a copy on 2 MiB
    pages where the OS grants them (csrc/ops.cpp huge_page_copy)."""
    return module().huge_page_copy(t)


GEMV_MAX_ROWS = 16     # up to this many activation rows: the fused GEMV kernel (measured crossover ~20)
PREFILL_BLOCK = 1 << 21  # beyond: dequantize ~2 MB of bf16 rows at a time (cache-resident), bf16 GEMM


def int4_run(x: torch.Tensor, st: dict) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    args = (st["codes"], st["scale"], st["zero"])
    n, k = st["n"], x2.shape[1]
    if x2.shape[0] <= GEMV_MAX_ROWS:
        y = module().int4_mm(x2, *args, n, st["group"], st["mode"], st["zconst"], gemv_act_int8())
    elif gemv_act_int8():  # (only ever true in the avx512 build)
        y = module().int4_mm_prefill_a8(x2, *args, n, st["group"], st["mode"], st["zconst"])
    elif isa() == "avx512":
        y = module().int4_mm_prefill(x2, *args, n, st["group"], st["mode"], st["zconst"], amx())
    else:
        y = blocked_mm(x2, n, lambda r0, r1, out: module().int4_dequant(
            *args, n, k, st["group"], st["mode"], st["zconst"], r0, -(-r1 // TILE) * TILE, out))
    return y.reshape(*x.shape[:-1], n)


_scratch = threading.local()


def blocked_mm(x2: torch.Tensor, n: int, dequant) -> torch.Tensor:
    """x2 @ W^T for many rows in the avx2 build: compute-bound, so the weight read is
    amortized and PyTorch's bf16 GEMM does the work on ~2 MB blocks of W that
    `dequant(r0, r1, scratch)` writes as bf16 rows (at least r0..r1) into one reused,
    cache-resident buffer per thread."""
    k = x2.shape[1]
    rows = max(TILE, PREFILL_BLOCK // (2 * k) // TILE * TILE)
    scratch = getattr(_scratch, "buf", None)
    if scratch is None or scratch.numel() < rows * k:
        scratch = _scratch.buf = torch.empty(max(rows * k, PREFILL_BLOCK // 2), dtype=torch.bfloat16)
    if n <= rows:  # one block: no copy into a slice of y
        return x2 @ dequant(0, n, scratch)[:n].t()
    y = x2.new_empty(x2.shape[0], n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(x2, dequant(r0, r1, scratch)[: r1 - r0].t(), out=y[:, r0:r1])
    return y


# ---- int8: symmetric per-channel ---------------------------------------------------

# lowbit's bf16-activation int8 GEMV is instruction-bound, more so in the avx2 build (fp32 FMA on
# widened codes): there it is ahead of PyTorch's int8pack up to ~3k columns (the embedded model's
# 49152 x 576 head: 1.6 vs 2.7 ms on the Xeon host) and behind on 4096-wide rows. The avx512
# build (nibbles into vdpbf16ps) is ahead up to 4096 columns (Zen 4, cold: 49152 x 576 28.9 vs
# 13.6 GB/s, 4096 x 4096 32.6 vs 24.5) and 0.85-0.9x int8pack at 8192-14336. Wider rows on bf16
# activations go to int8pack; the int8-activation GEMV (~the read roof at every width) and the
# prefill GEMM (3x int8pack at 128 rows of 3072-4096 columns) stay lowbit's.
def int8_gemv_max_k() -> int:
    return 4096 if isa() == "avx512" else 3072


def int8_supports(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> bool:
    s = qt.scheme
    return (device.type == "cpu" and dtype == torch.bfloat16 and s.format == "int8" and s.symmetric
            and s.granularity == "channel" and len(qt.shape) == 2 and qt.shape[1] % 64 == 0 and available())


def int8_prepare(qt: QuantizedTensor, dtype: torch.dtype) -> dict:
    from lowbit.runtime.kernels.cpu import int8_codes

    scale = qt.scales()[:, 0].contiguous()  # fp32
    st = {"w": on_huge_pages(int8_codes(qt)), "scale": scale, "n": qt.shape[0]}
    if qt.shape[1] > int8_gemv_max_k():  # int8pack takes its scales in the activations' dtype
        st["scale_act"] = scale.to(dtype)
    return st


def int8_run(x: torch.Tensor, st: dict) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[0] <= GEMV_MAX_ROWS:
        if "scale_act" in st and not gemv_act_int8():
            y = torch._weight_int8pack_mm(x2, st["w"], st["scale_act"])
        else:
            y = module().int8_mm(x2, st["w"], st["scale"], gemv_act_int8())
    elif gemv_act_int8():
        y = module().int8_mm_prefill_a8(x2, st["w"], st["scale"])
    elif isa() == "avx512":
        y = module().int8_mm_prefill(x2, st["w"], st["scale"], amx())
    else:  # the fp32 kernel converts every code once per row: 10x a bf16 GEMM at 128 rows (the head)
        y = blocked_mm(x2, st["n"], lambda r0, r1, out: module().int8_dequant(st["w"], st["scale"], r0, r1, out))
    return y.reshape(*x.shape[:-1], st["n"])
