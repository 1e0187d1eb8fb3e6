"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel "gptq" v1, as transformers and vLLM read it).

Per Linear, with b in {2, 4, 8} bits and k = 32 / b codes per int32:

    qweight  int32 [in/k, out]       codes packed along the input dim, code j of a word at bits b*j
    qzeros   int32 [groups, out/k]   zero points packed along the output dim, stored minus one (v1)
    scales   fp16  [groups, out]
    g_idx    int32 [in]              group of each input channel (i // group_size: static groups)

    w[o, i] = scales[g, o] * (code[i, o] - (qzeros[g, o] + 1)),  g = g_idx[i]

A lowbit symmetric code v is stored as v + 2^(b-1) with zero point 2^(b-1), an
affine one as it is, so integer schemes with groups tiling in_features convert
without touching a value. lowbit's act-order keeps groups contiguous, so g_idx is
always the plain i // group_size (desc_act false).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.core.scheme import Scheme
from lowbit.core.tensor import QuantizedTensor, pack_codes
from lowbit.errors import UserError
from lowbit.io.interop.checkpoint import (
    assemble,
    checkpoint_names,
    float_tensors,
    quantization_config,
    read_checkpoint,
    take_qtensors,
    write_checkpoint,
)

BITS = (2, 4, 8)


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] small ints -> int32 [n*bits/32, m], k consecutive rows per word."""
    k = 32 // bits
    n, m = v.shape
    v = v.to(torch.int64).reshape(n // k, k, m)
    shifts = (torch.arange(k, dtype=torch.int64) * bits).reshape(1, k, 1)
    word = (v << shifts).sum(dim=1)  # disjoint bit fields: sum == or
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's-complement wrap into int32


def _unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    k = 32 // bits
    shifts = (torch.arange(k, dtype=torch.int32) * bits).reshape(1, k, 1)
    v = (p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(-1, p.shape[-1])


def check_gptq_scheme(scheme: Scheme, shape: tuple[int, int], name: str) -> int:
    """group size for the GPTQ layout, or a UserError saying why it cannot hold `scheme`."""
    out_f, in_f = shape
    if scheme.number_format.kind != "int" or scheme.bits not in BITS or scheme.float_zero:
        raise UserError(f"{name}: the GPTQ format holds 2/4/8-bit integer codes with integer zero points, not {scheme.name}")
    if scheme.scale_dtype != "float16":
        raise UserError(f"{name}: GPTQ stores fp16 scales; {scheme.name} has {scheme.scale_dtype}")
    g = scheme.group_size if scheme.granularity == "group" else in_f
    if scheme.granularity not in ("group", "channel") or in_f % g:
        raise UserError(f"{name}: GPTQ groups must tile in_features ({in_f}); {scheme.name} does not")
    k = 32 // scheme.bits
    if in_f % k or out_f % k:
        raise UserError(f"{name}: {tuple(shape)} is not divisible by {k} codes per int32")
    return g


def gptq_tensors(qt: QuantizedTensor, name: str) -> dict[str, torch.Tensor]:
    s = qt.scheme
    g = check_gptq_scheme(s, qt.shape, name)
    out_f, in_f = qt.shape
    half = 1 << (s.bits - 1)
    codes = qt.unpacked_codes().to(torch.int32)  # symmetric codes are already v + half
    zeros = qt.zero_points()
    zeros = torch.full(qt.scale.shape, half, dtype=torch.int32) if zeros is None else zeros.to(torch.int32)
    if bool((zeros == 0).any()):  # v1 stores z - 1: a zero point of 0 reads back as 2^b
        raise UserError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (it keeps z - 1); "
                        "use a symmetric scheme or export compressed-tensors")
    return {
        f"{name}.qweight": _pack_rows(codes.t().contiguous(), s.bits),
        # zero points pack along the output dim; v1 stores z - 1
        f"{name}.qzeros": _pack_rows(zeros - 1, s.bits).t().contiguous(),
        f"{name}.scales": qt.scale.t().contiguous().to(torch.float16),
        f"{name}.g_idx": (torch.arange(in_f, dtype=torch.int32) // g),
    }


def qtensor_from_gptq(tensors: dict[str, torch.Tensor], name: str, bits: int, group_size: int, sym: bool) -> QuantizedTensor:
    """One module's GPTQ tensors -> QuantizedTensor (codes bit-exact)."""
    qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
    codes = _unpack_rows(qweight, bits).t()  # [out, in]
    out_f, in_f = codes.shape
    g = in_f if group_size in (-1, 0, None) else group_size
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(in_f) // g):
        raise UserError(f"{name}: g_idx is not i // group_size (desc_act with a permuted group order); "
                        "lowbit imports static-group GPTQ checkpoints")
    zeros = (_unpack_rows(qzeros.t().contiguous(), bits) + 1) & ((1 << bits) - 1)  # [out, groups]
    half = 1 << (bits - 1)
    gran = {"granularity": "group", "group_size": g} if g != in_f else {"granularity": "channel"}
    if sym and bool((zeros == half).all()):
        scheme = Scheme(format=f"int{bits}", **gran)
        zp = None
    else:
        scheme = Scheme(format=f"int{bits}", symmetric=False, **gran)
        zp = pack_codes(zeros.contiguous().to(torch.uint8), bits)
    qt = QuantizedTensor(pack_codes(codes.contiguous().to(torch.uint8), bits), scales.t().contiguous().to(torch.float16),
                         zp, (out_f, in_f), scheme)
    qt.validate()
    return qt


def export_gptq(model, tokenizer, out: str | Path, *, float_dtype: torch.dtype = torch.float16) -> dict:
    """Write an HF checkpoint directory in the GPTQ format (quantize_config.json + config)."""
    from lowbit.runtime.qlinear import quantized_modules

    qmods = quantized_modules(model)
    if not qmods:
        raise UserError("the model has no quantized modules to export")
    kinds = {(m.scheme.bits, m.scheme.group_size or -1, m.scheme.symmetric) for m in qmods.values()}
    if len(kinds) > 1:
        raise UserError(f"a GPTQ checkpoint has one bits/group size/symmetry; this model mixes {sorted(kinds)}")
    bits, group_size, sym = kinds.pop()
    tensors = float_tensors(model, qmods, float_dtype)
    for name, m in qmods.items():
        tensors.update(gptq_tensors(m.qweight, name))
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(float_dtype)
    qcfg = {"bits": bits, "group_size": group_size, "desc_act": False, "sym": sym, "static_groups": False,
            "true_sequential": True, "checkpoint_format": "gptq", "quant_method": "gptq", "damp_percent": 0.01}
    write_checkpoint(out, model, tokenizer, tensors, qcfg, float_dtype, {"quantize_config.json": qcfg},
                     names=checkpoint_names(model, "gptq"))
    return {"format": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "modules": len(qmods)}


def import_gptq(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, {module: QuantizedTensor}) from a GPTQ-format checkpoint."""
    path = Path(path)
    cfg, tensors = read_checkpoint(path)
    qc = quantization_config(path, cfg, "quantize_config.json")
    if qc.get("quant_method", "gptq") != "gptq" or qc.get("checkpoint_format", "gptq") != "gptq":
        raise UserError(f"{path}: not a GPTQ v1 checkpoint (quant_method {qc.get('quant_method')!r}, "
                        f"checkpoint_format {qc.get('checkpoint_format')!r})")
    bits, group, sym = int(qc.get("bits", 0)), int(qc.get("group_size", -1)), bool(qc.get("sym", True))
    if bits not in BITS:
        raise UserError(f"{path}: {bits}-bit GPTQ packing is not supported (2, 4, 8)")
    qts = take_qtensors(tensors, ("qweight", "qzeros", "scales", "g_idx"),
                        lambda n: qtensor_from_gptq(tensors, n, bits, group, sym))
    model, tok = assemble(path, qts, tensors, dtype)
    return model, tok, qts
