"""GGUF (llama.cpp) in and out, with the `gguf` package.

Block formats map onto lowbit schemes exactly (blocks of 32 along a row, fp16 scales):

    Q8_0  34 bytes: d, int8 q[32]            w = d * q            -> scheme q8_0 (int8-g32)
    Q4_0  18 bytes: d, 16 bytes of nibbles   w = d * (q - 8)      -> scheme q4_0 (int4-g32)
    Q4_1  20 bytes: d, m, 16 bytes           w = d * q + m        -> scheme q4_1 (int4-g32-asym-fzero)

Nibbles: byte j holds element j in its low half and element j + 16 in its high half.

K-quants are read losslessly too (import only: their two-level scales do not come
back from one scale per group). Q4_K (super-blocks of 256: w = d*sc*q - dmin*m per 32)
becomes int4-g32 with a float zero and fp32 scales d*sc, zeros -dmin*m; Q6_K
(w = d*sc*(q - 32) per 16) becomes symmetric int6-g16 with fp32 scales d*sc. Both
products are exact in fp32, so dequantization matches gguf's own bit for bit.
A lowbit symmetric int4 code is stored as v + 8, exactly Q4_0's nibble, so these
conversions only move bytes. Any other scheme is not expressible without
re-quantizing, which happens only when asked (`requantize=`), with the error reported.

llama.cpp stores Llama-style q/k projections with rows permuted for its rotary
layout (convert_hf_to_gguf.py's `permute`); rows move with their codes and scales,
so that permutation is lossless too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowbit.core.layer import QuantizedLayer
from lowbit.core.scheme import GGUF_PRESETS, Scheme
from lowbit.core.tensor import QuantizedTensor, pack_codes
from lowbit.errors import UserError
from lowbit.io.files import GGUF_WRITER_KEY, atomic_path, check_output

BLOCK = 32

# Hugging Face model_type -> (GGUF architecture, q/k rows permuted)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def _gguf():
    import gguf

    return gguf


def _types():
    T = _gguf().GGMLQuantizationType
    return {T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q4_1: "q4_1"}


def _storage_key(s: Scheme) -> tuple:
    """What a scheme stores (how its scales were chosen does not matter)."""
    return (s.format, s.symmetric, s.granularity, s.group_size, s.scale_dtype, s.zero_domain, s.activations)


def gguf_type_for(scheme: Scheme):
    """The GGUF type that holds `scheme` bit for bit, or None."""
    for qtype, name in _types().items():
        if _storage_key(GGUF_PRESETS[name]) == _storage_key(scheme):
            return qtype
    return None


# ---- one tensor ---------------------------------------------------------------

def _k_types():
    T = _gguf().GGMLQuantizationType
    return {T.Q4_K: _q4_k, T.Q6_K: _q6_k}


def importable(qtype) -> bool:
    return qtype in _types() or qtype in _k_types()


def _q4_k(b: np.ndarray, rows: int, cols: int) -> QuantizedTensor:
    """Q4_K super-blocks [n, 144] -> int4-g32, float zero, fp32 scales."""
    gguf = _gguf()
    n = b.shape[0]
    d = b[:, 0:2].view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].view(np.float16).astype(np.float32)
    sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])  # the package's own 6-bit unpacking
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(rows, cols)
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)
    zero = -(dmin * m.astype(np.float32)).reshape(rows, -1)
    scheme = Scheme(format="int4", symmetric=False, zero_domain="float", granularity="group", group_size=32,
                    scale_dtype="float32", name="q4_k")
    return QuantizedTensor(pack_codes(torch.from_numpy(codes.copy()), 4), torch.from_numpy(scale.copy()),
                           torch.from_numpy(zero.copy()), (rows, cols), scheme)


def _q6_k(b: np.ndarray, rows: int, cols: int) -> QuantizedTensor:
    """Q6_K super-blocks [n, 210] -> symmetric int6-g16, fp32 scales (its code q is lowbit's v + 32)."""
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = b[:, 208:210].view(np.float16).astype(np.float32)
    ql = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    qh = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    codes = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).reshape(rows, cols)
    scale = (d * sc).reshape(rows, -1)
    scheme = Scheme(format="int6", granularity="group", group_size=16, scale_dtype="float32", name="q6_k")
    return QuantizedTensor(pack_codes(torch.from_numpy(codes.copy()), 6), torch.from_numpy(scale.copy()), None,
                           (rows, cols), scheme)


def qtensor_from_blocks(raw: np.ndarray, qtype, shape: tuple[int, int]) -> QuantizedTensor:
    """GGUF block bytes [rows, row_bytes] -> QuantizedTensor, without touching a value."""
    rows, cols = shape
    if qtype in _k_types():
        if cols % 256:
            raise UserError(f"GGUF K-quant tensor with {cols} columns is not made of 256-element super-blocks")
        qt = _k_types()[qtype](np.array(raw, dtype=np.uint8).reshape(rows * cols // 256, -1), rows, cols)
        qt.validate()
        return qt
    name = _types().get(qtype)
    if name is None:
        raise UserError(f"GGUF type {getattr(qtype, 'name', qtype)} has no exact lowbit scheme "
                        "(Q8_0, Q4_0, Q4_1, and for reading Q4_K, Q6_K do)")
    if cols % BLOCK:
        raise UserError(f"GGUF tensor with {cols} columns is not made of {BLOCK}-element blocks")
    nb = cols // BLOCK
    b = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(rows, nb, -1)
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(rows, nb)
    zero = None
    if name == "q8_0":
        codes = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    else:
        qs = b[..., 4:] if name == "q4_1" else b[..., 2:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
        if name == "q4_1":
            zero = b[..., 2:4].contiguous().view(torch.float16).reshape(rows, nb)
    scheme = GGUF_PRESETS[name]
    qt = QuantizedTensor(pack_codes(codes.reshape(rows, cols), scheme.bits), d.contiguous(), zero, (rows, cols), scheme)
    qt.validate()
    return qt


def blocks_from_qtensor(qt: QuantizedTensor) -> tuple[np.ndarray, object]:
    """QuantizedTensor -> (GGUF block bytes [rows, row_bytes], type); exact or UserError."""
    qtype = gguf_type_for(qt.scheme)
    rows, cols = qt.shape if len(qt.shape) == 2 else (1, qt.shape[0])
    if qtype is None or cols % BLOCK:
        raise NotExact(f"{qt.scheme.name} on {tuple(qt.shape)} has no exact GGUF type "
                       "(exact: q8_0, q4_0, q4_1 on rows divisible by 32)")
    name = _types()[qtype]
    nb = cols // BLOCK
    codes = qt.unpacked_codes().reshape(rows, nb, BLOCK)
    d = qt.scale.reshape(rows, nb, 1).contiguous().view(torch.uint8)
    if name == "q8_0":
        body = [d, (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)]
    else:
        nibbles = codes[..., :16] | (codes[..., 16:] << 4)
        body = [d, nibbles]
        if name == "q4_1":
            body.insert(1, qt.zero_point.reshape(rows, nb, 1).contiguous().view(torch.uint8))
    raw = torch.cat(body, dim=-1).reshape(rows, -1)
    return raw.numpy(), qtype


class NotExact(UserError):
    pass


def _row_permutation(n_head: int, rows: int) -> torch.Tensor:
    """gguf row i holds HF row perm[i] (convert_hf_to_gguf's q/k permute, on indices)."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _permute_rows(qt: QuantizedTensor, perm: torch.Tensor) -> QuantizedTensor:
    """The same tensor with rows reordered (codes, scales and zero points move together)."""
    s = qt.scheme
    codes = qt.unpacked_codes()[perm]
    scale = qt.scale[perm]
    zero = qt.zero_point
    if zero is not None:
        zero = zero[perm] if s.float_zero else pack_codes(qt.zero_points()[perm].to(torch.uint8), s.bits)
    return QuantizedTensor(pack_codes(codes, s.bits), scale.contiguous(), zero, qt.shape, s)


def _qk_heads(config, hf_name: str) -> int | None:
    if hf_name.endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _arch(config) -> tuple[str, bool]:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHES:
        raise UserError(f"GGUF export/import covers {', '.join(sorted(ARCHES))} models; this one is {mt!r}")
    return ARCHES[mt]


def _name_map(config):
    gguf = _gguf()
    arch, _ = _arch(config)
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)


# ---- import -------------------------------------------------------------------

def import_gguf(path: str | Path):
    """(model, tokenizer, {module: QuantizedTensor}) from a GGUF file.

    Linear weights stored as Q8_0/Q4_0/Q4_1/Q4_K/Q6_K become QuantLinears holding exactly
    those values; everything else (norms, embeddings, other types) is loaded in float by
    transformers' GGUF reader.
    """
    from lowbit.models.adapters import is_linear
    from lowbit.runtime.qlinear import install

    path = Path(path)
    model, tok = _float_model(path)
    _, permuted = _arch(model.config)
    tmap = _name_map(model.config)
    try:
        reader = _gguf().GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    by_name = {t.name: t for t in reader.tensors}
    qts = {}
    for name, mod in model.named_modules():
        if not name or not is_linear(mod):
            continue
        t = by_name.get(tmap.get_name(name + ".weight", try_suffixes=(".weight",)) or "")
        if t is None or not importable(t.tensor_type):
            continue
        rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF lists dimensions innermost first
        qt = qtensor_from_blocks(t.data, t.tensor_type, (rows, cols))
        heads = _qk_heads(model.config, name) if permuted else None
        if heads:
            qt = _permute_rows(qt, torch.argsort(_row_permutation(heads, rows)))
        qts[name] = qt
    install(model, {n: QuantizedLayer(qt) for n, qt in qts.items()})
    model.eval()
    return model, tok, qts


def _float_model(path: Path):
    """transformers' float reading of the GGUF (the embedded model's cached conversion when it is that file)."""
    from lowbit.models.load import EMBEDDED, _load_gguf, embedded_gguf, load_float

    for name in EMBEDDED:
        try:
            if embedded_gguf(name).resolve() == path.resolve():
                return load_float(name)
        except UserError:
            pass
    return _load_gguf(path, torch.float32)


# ---- export -------------------------------------------------------------------

def _float_array(t: torch.Tensor, ftype: str, what: str):
    """(array, raw GGML type or None) for a float tensor written as f32/f16/q8_0."""
    gguf = _gguf()
    a = t.detach().to(torch.float32).numpy()
    if ftype == "f32":
        return a, None
    if ftype == "f16":
        return a.astype(np.float16), None
    if ftype == "q8_0":
        if a.shape[-1] % BLOCK:
            return a.astype(np.float16), None
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    raise UserError(f"{what}: unknown GGUF float type {ftype!r} (f32, f16, q8_0)")


def export_gguf(model, tokenizer_dir: str | Path | None, out: str | Path, *, source_gguf: str | Path | None = None,
                requantize: str | None = None, embed_type: str = "q8_0", name: str = "lowbit") -> dict:
    """Write `model` (QuantLinears + float parts) as a GGUF file llama.cpp and transformers load.

    Tokenizer and general metadata are copied from `source_gguf` when the model came
    from one (bit-identical vocabulary); otherwise the tokenizer directory is converted
    with gguf's own BpeVocab/SpecialVocab. Returns a report: per tensor type counts,
    and for re-quantized tensors their relative error.
    """
    gguf = _gguf()
    from lowbit.runtime.qlinear import quantized_modules

    config = model.config
    arch, permuted = _arch(config)
    tmap = _name_map(config)
    qmods = quantized_modules(model)
    rq_type = None
    if requantize is not None:
        rq_type = {v: k for k, v in _types().items()}.get(requantize.lower())
        if rq_type is None:
            raise UserError(f"--requantize {requantize!r}: choose q8_0, q4_0 or q4_1")

    tensors, report = [], {"types": {}, "requantized": {}}
    for pname, p in model.state_dict().items():
        mod_name, _, leaf = pname.rpartition(".")
        if mod_name in qmods and leaf in ("codes", "scale", "zero_point"):
            continue
        if pname == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        gname = tmap.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            if "rotary_emb" in pname:
                continue
            raise UserError(f"{pname}: no GGUF name for this tensor in the {arch} layout")
        ftype = embed_type if "embed" in pname or pname == "lm_head.weight" else ("f32" if p.dim() == 1 else "f16")
        arr, raw = _float_array(p, ftype, pname)
        if raw is None and p.dim() == 2 and _qk_heads(config, mod_name) and permuted:
            arr = arr[_row_permutation(_qk_heads(config, mod_name), arr.shape[0]).numpy()]
        tensors.append((gname, arr, raw))
    for mod_name, m in qmods.items():
        qt = m.qweight
        heads = _qk_heads(config, mod_name) if permuted else None
        if heads:
            qt = _permute_rows(qt, _row_permutation(heads, qt.shape[0]))
        gname = tmap.get_name(mod_name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise UserError(f"{mod_name}: no GGUF name for this module in the {arch} layout")
        try:
            arr, raw = blocks_from_qtensor(qt)
        except NotExact as e:
            if rq_type is None:
                raise UserError(f"{mod_name}: {e}; quantize with --scheme q4_1/q4_0/q8_0, "
                                "or pass --requantize TYPE to re-round (the error is reported)") from None
            w = qt.dequantize().numpy()
            arr, raw = gguf.quants.quantize(w, rq_type), rq_type
            back = gguf.quants.dequantize(arr, rq_type)
            report["requantized"][mod_name] = float(np.linalg.norm(back - w) / max(np.linalg.norm(w), 1e-30))
        tensors.append((gname, arr, raw))
        if m.bias is not None:
            tensors.append((gname.removesuffix(".weight") + ".bias", m.bias.detach().float().numpy(), None))

    out = check_output(out, file=True)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        _write_metadata(w, config, tokenizer_dir, source_gguf, name, qmods)
        for gname, arr, raw in tensors:
            w.add_tensor(gname, arr, raw_dtype=raw)  # block bytes: the writer derives the element shape
            t = raw.name if raw is not None else str(arr.dtype)
            report["types"][t] = report["types"].get(t, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return report


def _write_metadata(w, config, tokenizer_dir, source_gguf, name, qmods) -> None:
    gguf = _gguf()
    heads = config.num_attention_heads
    w.add_name(name)
    w.add_string(GGUF_WRITER_KEY, "lowbit")  # marks the file as lowbit's: a later export may replace it
    w.add_context_length(getattr(config, "max_position_embeddings", 2048))
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    w.add_vocab_size(config.vocab_size)
    kinds = {gguf_type_for(m.scheme) for m in qmods.values()}
    ftypes = {"q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    if len(kinds) == 1 and None not in kinds:
        w.add_file_type(ftypes[_types()[kinds.pop()]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if source_gguf is not None:
        reader = gguf.GGUFReader(source_gguf)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), vtype, sub)
        return
    if tokenizer_dir is None:
        raise UserError("GGUF export needs the tokenizer (a tokenizer.json beside the model)")
    try:
        vocab = gguf.vocab.BpeVocab(Path(tokenizer_dir))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{tokenizer_dir}: GGUF export handles GPT-2 style BPE tokenizers ({e})") from None
    toks, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        toks.append(text)
        types.append(ttype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    gguf.vocab.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(toks)).add_to_gguf(w, quiet=True)
