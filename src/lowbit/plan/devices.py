"""Device catalog for the planner: memory, bandwidth and dense peak compute per format.

Figures are dense (no 2:4 sparsity), from the vendors' datasheets named in
`source`. `fp8_tflops`/`fp4_tflops` are None where the device has no native
support (the planner then computes that format at bf16 speed). CPU entries are
bandwidth-first estimates (compute from cores x clock x SIMD width) and say so.
A user file (JSON list of objects with the same keys) extends or overrides it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit.errors import UserError


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float          # usable device memory, GB (1e9 bytes)
    bandwidth_gb_s: float     # peak memory bandwidth, GB/s
    bf16_tflops: float        # dense FP16/BF16 tensor throughput
    int8_tops: float | None
    fp8_tflops: float | None
    fp4_tflops: float | None = None
    source: str = ""

    def peak_tflops(self, compute: str) -> float:
        """Dense peak for the format the matmuls run in ('bf16', 'int8', 'fp8', 'fp4')."""
        v = {"bf16": self.bf16_tflops, "int8": self.int8_tops, "fp8": self.fp8_tflops, "fp4": self.fp4_tflops}[compute]
        return v if v else self.bf16_tflops

    def native(self, compute: str) -> bool:
        return compute == "bf16" or bool({"int8": self.int8_tops, "fp8": self.fp8_tflops, "fp4": self.fp4_tflops}[compute])


_NV = "NVIDIA {} datasheet (dense figures: half the sparsity numbers)"
CATALOG: dict[str, Device] = {d.name: d for d in [
    Device("a100-40gb", 40, 1555, 312, 624, None, None, _NV.format("A100 Tensor Core GPU (SXM4 40GB)")),
    Device("a100-80gb", 80, 2039, 312, 624, None, None, _NV.format("A100 Tensor Core GPU (SXM4 80GB)")),
    Device("h100-sxm", 80, 3350, 989, 1979, 1979, None, _NV.format("H100 Tensor Core GPU (SXM5)")),
    Device("h100-pcie", 80, 2000, 756, 1513, 1513, None, _NV.format("H100 Tensor Core GPU (PCIe)")),
    Device("h200", 141, 4800, 989, 1979, 1979, None, _NV.format("H200 Tensor Core GPU (SXM)")),
    Device("b200", 180, 8000, 2250, 4500, 4500, 9000, _NV.format("HGX B200 (per GPU)")),
    Device("l4", 24, 300, 121, 242.5, 242.5, None, _NV.format("L4 Tensor Core GPU")),
    Device("l40s", 48, 864, 362, 733, 733, None, _NV.format("L40S GPU")),
    Device("rtx-4090", 24, 1008, 165.2, 660.6, 330.3, None, "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090, FP32 accumulate)"),
    Device("mi300x", 192, 5300, 1307.4, 2614.9, 2614.9, None, "AMD Instinct MI300X datasheet (dense)"),
    Device("cpu-epyc-genoa-12ch", 384, 460.8, 14.7, 14.7, None, None,
           "12 x DDR5-4800 channels (peak); compute estimated: 96 Zen 4 cores x 2.4 GHz x AVX-512 BF16"),
    Device("cpu-server-8ch-ddr4", 256, 204.8, 4.0, 4.0, None, None, "8 x DDR4-3200 channels (peak); compute estimated"),
    Device("cpu-desktop-2ch-ddr5", 64, 89.6, 1.5, 1.5, None, None, "2 x DDR5-5600 channels (peak); compute estimated"),
    Device("cpu-2core-vm", 24, 30, 0.2, 0.2, None, None, "lowbit's CI machine: ~30 GB/s measured copy bandwidth, 2 cores (estimate)"),
]}


def load_catalog(user_file: str | None = None) -> dict[str, Device]:
    cat = dict(CATALOG)
    if user_file:
        try:
            entries = json.loads(Path(user_file).read_text())
            for e in entries if isinstance(entries, list) else [entries]:
                d = Device(**e)
                cat[d.name] = d
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{user_file}: not a device list (JSON objects with keys {', '.join(asdict(CATALOG['l4']))}): {e}") from None
    return cat


def get_device(name: str, catalog: dict[str, Device]) -> Device:
    try:
        return catalog[name]
    except KeyError:
        raise UserError(f"unknown device {name!r}; known: {', '.join(catalog)} (add your own with --devices FILE)") from None
