"""What a benchmark ran on: CPU model, the ISA extensions that pick kernels, cache sizes.

Speed figures do not transfer between hosts (a 480 MiB L3 holds a whole small model; a
32 MiB one does not), so every benchmark's JSON carries this."""
from __future__ import annotations

import os
import platform
from pathlib import Path

ISA = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
       "avx512vbmi", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    out = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def cache_sizes() -> dict[str, int]:
    """Bytes per cache level of CPU 0 (sysfs), e.g. {'L1d': 49152, 'L2': 2097152, 'L3': 503316480}."""
    sizes = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        name = f"L{level}" + ({"Data": "d", "Instruction": "i"}.get(kind, ""))
        sizes[name] = int(size.rstrip("KMG")) * mult
    return sizes


def host_info() -> dict:
    info = _cpuinfo()
    flags = cpu_flags()
    return {"cpu": info.get("model name", platform.processor() or platform.machine()),
            "isa": [f for f in ISA if f in flags], "caches": cache_sizes(),
            "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
            "transparent_hugepage": transparent_hugepage(), "lowbit_kernels": _kernels()}


def transparent_hugepage() -> str | None:
    """Linux's THP mode ("always", "madvise", "never"): whether the kernels' weight copies
    (native.on_huge_pages) get 2 MiB pages; None where the OS does not say."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory on transparent huge pages (None off Linux)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _kernels() -> dict:
    """Which build of lowbit's own CPU kernels dispatch uses (None: PyTorch's), and whether prefill uses AMX."""
    from lowbit.runtime.kernels import native

    return {"isa": native.isa(), "amx": native.amx()}
