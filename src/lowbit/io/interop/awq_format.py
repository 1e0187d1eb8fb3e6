"""AWQ checkpoints (AutoAWQ "gemm" layout, as transformers and vLLM read them): import.

Per Linear, 4-bit codes, k = 8 per int32, packed along the *output* dim in AWQ's
interleaved order (word bits 4*i hold column ORDER[i] of each group of 8):

    qweight  int32 [in, out/8]
    qzeros   int32 [groups, out/8]     (same packing, stored as is)
    scales   fp16  [groups, out]
    w[o, i] = scales[g, o] * (code[i, o] - zero[g, o]),  g = i // group_size

which is lowbit's affine int4 with integer zero points: the import moves bits only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.core.scheme import Scheme
from lowbit.core.tensor import QuantizedTensor, pack_codes
from lowbit.errors import UserError
from lowbit.io.interop.checkpoint import assemble, quantization_config, read_checkpoint, take_qtensors

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack_cols(p: torch.Tensor) -> torch.Tensor:
    """int32 [n, m/8] -> [n, m] codes in natural column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    v = (p.unsqueeze(-1) >> shifts) & 0xF  # [n, m/8, 8]: nibble i is column ORDER[i]
    out = torch.empty_like(v)
    out[..., list(ORDER)] = v
    return out.reshape(p.shape[0], -1)


def qtensor_from_awq(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> QuantizedTensor:
    codes = _unpack_cols(tensors[f"{name}.qweight"]).t().contiguous()  # [out, in]
    zeros = _unpack_cols(tensors[f"{name}.qzeros"]).t().contiguous()   # [out, groups]
    scales = tensors[f"{name}.scales"].t().contiguous().to(torch.float16)
    out_f, in_f = codes.shape
    g = in_f if group_size in (-1, 0) else group_size
    if in_f % g or scales.shape != (out_f, in_f // g):
        raise UserError(f"{name}: AWQ scales {tuple(scales.shape)} do not match {out_f}x{in_f} with groups of {g}")
    gran = {"granularity": "group", "group_size": g} if g != in_f else {"granularity": "channel"}
    scheme = Scheme(format="int4", symmetric=False, **gran)
    qt = QuantizedTensor(pack_codes(codes.to(torch.uint8), 4), scales, pack_codes(zeros.to(torch.uint8), 4),
                         (out_f, in_f), scheme)
    qt.validate()
    return qt


def import_awq(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, {module: QuantizedTensor}) from an AutoAWQ GEMM checkpoint."""
    path = Path(path)
    cfg, tensors = read_checkpoint(path)
    qc = quantization_config(path, cfg, "quant_config.json")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise UserError(f"{path}: AWQ {bits}-bit '{version}' layout is not supported (4-bit gemm is)")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    qts = take_qtensors(tensors, ("qweight", "qzeros", "scales"), lambda n: qtensor_from_awq(tensors, n, group))
    model, tok = assemble(path, qts, tensors, dtype)
    return model, tok, qts
