"""compressed-tensors (the checkpoint format vLLM and transformers load), in and out.

The `compressed-tensors` package defines the format: its pydantic QuantizationConfig
writes `quantization_config`, its pack_to_int32 / unpack_from_int32 pack the codes.
What lowbit adds is the lossless mapping between its QuantizedTensor and that layout:

    integer weights  -> format "pack-quantized": weight_packed (int32), weight_scale
                        [rows, groups], weight_shape, and for affine schemes a packed
                        weight_zero_point. compressed-tensors codes are signed:
                        v = lowbit code - 2^(b-1), and so is its zero point.
    FP8 E4M3 weights -> format "float-quantized": weight as float8_e4m3fn + weight_scale.

Groups must tile the rows exactly (compressed-tensors has no short last group).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from lowbit.core.scheme import Scheme
from lowbit.core.tensor import QuantizedTensor, pack_codes
from lowbit.errors import UserError
from lowbit.io.interop.checkpoint import assemble, checkpoint_names, float_tensors, read_checkpoint, write_checkpoint
from lowbit.models.disk_names import DiskNames
from lowbit.models.moe import is_moe_config, unfuse_experts


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UserError("compressed-tensors export/import needs the package: pip install compressed-tensors") from None
    import compressed_tensors.compressors.pack_quantized.helpers as packing
    import compressed_tensors.quantization as q

    return q, packing


def _strategy(scheme: Scheme) -> dict:
    if scheme.granularity == "group":
        return {"strategy": "group", "group_size": scheme.group_size}
    if scheme.granularity == "channel":
        return {"strategy": "channel"}
    if scheme.granularity == "tensor":
        return {"strategy": "tensor"}
    raise UserError(f"{scheme.name}: per-token granularity is for activations, not stored weights")


def weight_args(scheme: Scheme):
    """compressed-tensors QuantizationArgs for a stored lowbit weight scheme (and its format)."""
    q, _ = _ct()
    fmt = scheme.number_format
    if scheme.float_zero or scheme.is_mx:
        raise UserError(f"{scheme.name}: compressed-tensors has no float zero points or E8M0 scales; "
                        "export it as GGUF, or quantize with an integer scheme")
    if fmt.kind == "int":
        args = q.QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=scheme.symmetric, **_strategy(scheme))
        return args, "pack-quantized"
    if scheme.format == "fp8_e4m3":
        return q.QuantizationArgs(num_bits=8, type="float", symmetric=True, **_strategy(scheme)), "float-quantized"
    raise UserError(f"{scheme.name}: compressed-tensors export covers int2..int8 and FP8 E4M3 weights")


def _module_tensors(qt: QuantizedTensor, prefix: str) -> dict[str, torch.Tensor]:
    _, packing = _ct()
    s = qt.scheme
    rows, cols = qt.shape
    if s.granularity == "group" and cols % s.group_size:
        raise UserError(f"{prefix}: {cols} columns do not divide into groups of {s.group_size} "
                        "(compressed-tensors has no short last group); choose a group size dividing it")
    scale = qt.scales().to(qt.scale.dtype) if not s.is_mx else qt.scales()
    if s.granularity == "tensor":
        scale = scale.reshape(1)
    out = {f"{prefix}.weight_scale": scale.contiguous()}
    if s.number_format.kind == "int":
        half = 1 << (s.bits - 1)
        v = (qt.unpacked_codes().to(torch.int16) - half).to(torch.int8)
        out[f"{prefix}.weight_packed"] = packing.pack_to_int32(v, s.bits)
        out[f"{prefix}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if s.has_zero_point:
            zp = (qt.zero_points() - half).to(torch.int8)
            out[f"{prefix}.weight_zero_point"] = packing.pack_to_int32(zp, s.bits, packed_dim=0).contiguous()
    else:
        out[f"{prefix}.weight"] = qt.unpacked_codes().view(torch.float8_e4m3fn).contiguous()
    return out


def export_compressed_tensors(model, tokenizer, out: str | Path, *, float_dtype: torch.dtype = torch.float16) -> dict:
    """Write an HF checkpoint directory with `quantization_config` for vLLM / transformers."""
    from lowbit.models.adapters import is_linear
    from lowbit.runtime.qlinear import quantized_modules

    q, _ = _ct()
    qmods = quantized_modules(model)
    if not qmods:
        raise UserError("the model has no quantized modules to export")
    names = checkpoint_names(model, "compressed-tensors")
    disk = names.disk_module if names is not None else (lambda n: n)
    groups: dict[str, list[str]] = {}
    formats = set()
    tensors = float_tensors(model, qmods, float_dtype)
    for name, m in qmods.items():
        args, fmt = weight_args(m.scheme)
        formats.add(fmt)
        groups.setdefault(json.dumps(args.model_dump(), sort_keys=True, default=str), []).append(name)
        tensors.update(_module_tensors(m.qweight, name))
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to(float_dtype)
    if len(formats) > 1:
        raise UserError(f"one checkpoint holds one compressed-tensors format; this model mixes {sorted(formats)}")
    if len(groups) == 1:  # the usual case: every Linear but a few (lm_head) shares one scheme
        only = weight_args(next(iter(qmods.values())).scheme)[0]
        config_groups = {"group_0": q.QuantizationScheme(targets=["Linear"], weights=only)}
        ignore = [disk(n) for n, mod in model.named_modules() if n and is_linear(mod) and n not in qmods]
    else:  # mixed precision: one group per scheme, naming its modules
        config_groups = {f"group_{i}": q.QuantizationScheme(targets=[disk(n) for n in mods],
                                                            weights=weight_args(qmods[mods[0]].scheme)[0])
                         for i, mods in enumerate(groups.values())}
        ignore = []
    qconfig = q.QuantizationConfig(config_groups=config_groups, format=formats.pop(), ignore=ignore,
                                   quantization_status="compressed")
    write_checkpoint(out, model, tokenizer, tensors, _config_dict(qconfig), float_dtype, names=names)
    return {"format": qconfig.format, "modules": len(qmods), "ignored": ignore}


def _config_dict(qconfig) -> dict:
    """quantization_config exactly as compressed-tensors' own ModelCompressor writes it."""
    from compressed_tensors.compressors import ModelCompressor

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text("{}")
        ModelCompressor(quantization_config=qconfig).update_config(d)
        return json.loads((Path(d) / "config.json").read_text())["quantization_config"]


# ---- import -------------------------------------------------------------------

def qtensor_from_compressed(tensors: dict[str, torch.Tensor], prefix: str, args) -> QuantizedTensor:
    """One module's compressed-tensors weights -> QuantizedTensor (codes bit-exact)."""
    _, packing = _ct()
    strategy = str(getattr(args.strategy, "value", args.strategy))
    gran = {"group": "group", "channel": "channel", "tensor": "tensor"}.get(strategy)
    if gran is None:
        raise UserError(f"{prefix}: compressed-tensors strategy {strategy!r} has no lowbit equivalent")
    typ = str(getattr(args.type, "value", args.type))
    scale = tensors[f"{prefix}.weight_scale"]
    sdt = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(scale.dtype)
    if sdt is None:
        raise UserError(f"{prefix}: weight_scale dtype {scale.dtype} is not fp16/bf16/fp32")
    if typ == "int":
        scheme = Scheme(format=f"int{args.num_bits}", symmetric=bool(args.symmetric), granularity=gran,
                        group_size=args.group_size if gran == "group" else None, scale_dtype=sdt)
        rows, cols = (int(x) for x in tensors[f"{prefix}.weight_shape"].tolist())
        packed = tensors[f"{prefix}.weight_packed"]
        want = [rows, -(-cols // (32 // args.num_bits))]  # 32 // bits codes per int32 along each row
        if list(packed.shape) != want:
            raise UserError(f"{prefix}: weight_packed is {list(packed.shape)}, but {args.num_bits}-bit codes of a [{rows}, {cols}] "
                            f"weight pack to {want}: the quantization_config does not match the tensors")
        v = packing.unpack_from_int32(packed, args.num_bits, torch.Size([rows, cols]))
        half = 1 << (args.num_bits - 1)
        codes = (v.to(torch.int16) + half).to(torch.uint8)
        zp = None
        if not args.symmetric:
            zshape = torch.Size([rows, scale.shape[-1]])
            z = packing.unpack_from_int32(tensors[f"{prefix}.weight_zero_point"], args.num_bits, zshape, packed_dim=0)
            zp = pack_codes((z.to(torch.int16) + half).to(torch.uint8), args.num_bits)
    elif typ == "float" and args.num_bits == 8:
        w = tensors[f"{prefix}.weight"]
        if w.dtype != torch.float8_e4m3fn:
            raise UserError(f"{prefix}: float-quantized weight of dtype {w.dtype}, expected float8_e4m3fn")
        scheme = Scheme(format="fp8_e4m3", granularity=gran, group_size=args.group_size if gran == "group" else None,
                        scale_dtype=sdt)
        rows, cols = w.shape
        codes, zp = w.view(torch.uint8), None
    else:
        raise UserError(f"{prefix}: compressed-tensors {typ} {args.num_bits}-bit weights have no lowbit equivalent")
    scale = scale.reshape(1, 1) if gran == "tensor" else scale.reshape(rows, -1)
    qt = QuantizedTensor(pack_codes(codes.reshape(rows, cols), scheme.bits), scale.contiguous(), zp, (rows, cols), scheme)
    qt.validate()
    return qt


def import_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, {module: QuantizedTensor}) from a compressed-tensors checkpoint."""
    _ct()
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg, tensors = read_checkpoint(path)
    qc = QuantizationConfig.model_validate(cfg.get("quantization_config") or {})
    if qc.format not in ("pack-quantized", "float-quantized"):
        raise UserError(f"{path}: compressed-tensors format {qc.format!r} is not supported (pack-quantized, float-quantized)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):  # only the module names matter here
        skeleton = AutoModelForCausalLM.from_config(config)
    names = DiskNames(skeleton) if is_moe_config(config) else None  # from this skeleton: no second meta model
    unfuse_experts(skeleton, copy_weights=False)  # read_checkpoint named the experts per expert
    memory = (lambda ts: [names.memory_module(t) for t in ts]) if names is not None else (lambda ts: ts)  # module names only
    qts = {}
    for group in qc.config_groups.values():
        if group.weights is None:
            continue
        if group.input_activations is not None:
            raise UserError(f"{path}: activation quantization ({group.input_activations.type}) is not run by this lowbit")
        for name, _mod in match_named_modules(skeleton, memory(group.targets), memory(qc.ignore or [])):
            if f"{name}.weight_scale" in tensors:
                qts[name] = qtensor_from_compressed(tensors, name, group.weights)
    for name in qts:
        for k in [k for k in tensors if k.startswith(name + ".weight")]:
            del tensors[k]
    model, tok = assemble(path, qts, tensors, dtype)
    return model, tok, qts
