"""GGUF (llama.cpp) in and out, with the `gguf` package.

Every GGUF block type lowbit writes is a lowbit scheme exactly (gguf_blocks.py: Q8_0,
Q5_0, Q5_1, Q4_0, Q4_1, IQ4_NL and the K-quants Q6_K, Q5_K, Q4_K, IQ4_XS, Q3_K, Q2_K), so
export and import only move bits; tensors of those types are imported bit-exactly and
re-exported byte for byte. A scheme GGUF cannot hold is re-rounded only when asked
(`requantize=`, with lowbit's own scale search), with the error reported.

llama.cpp stores Llama-style q/k projections with rows permuted for its rotary
layout (convert_hf_to_gguf.py's `permute`); rows move with their codes and scales,
so that permutation is lossless too.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lowbit.core.layer import QuantizedLayer
from lowbit.core.scheme import GGUF_PRESETS, fitting
from lowbit.core.tensor import QuantizedTensor, pack_codes, quantize_tensor
from lowbit.errors import UserError
from lowbit.io.files import GGUF_WRITER_KEY, atomic_path, check_output
from lowbit.io.interop.gguf_blocks import LAYOUT, NotExact, blocks_from_qtensor, qtensor_from_blocks, type_name_for
from lowbit.models.moe import EXPERT_COUNT_KEYS

BLOCK = 32

# Hugging Face model_type -> (GGUF architecture, q/k rows permuted)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "mixtral": ("llama", True), "qwen2": ("qwen2", False),
          "qwen3": ("qwen3", False), "qwen3_moe": ("qwen3moe", False)}


def _gguf():
    import gguf

    return gguf


def ggml_type(tname: str):
    return _gguf().GGMLQuantizationType[tname]


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


def gguf_arch(config) -> tuple[str, bool]:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHES:
        raise UserError(f"GGUF export/import covers {', '.join(sorted(ARCHES))} models; this one is {mt!r}")
    return ARCHES[mt]


def tensor_name_map(config):
    gguf = _gguf()
    arch, _ = gguf_arch(config)
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)


# ---- import -------------------------------------------------------------------

def import_gguf(path: str | Path):
    """(model, tokenizer, {module: QuantizedTensor}) from a GGUF file.

    Linear weights stored in a type lowbit states exactly (gguf_blocks.LAYOUT) become
    QuantLinears holding exactly those values; everything else (norms, embeddings, other
    types) is loaded in float by transformers' GGUF reader.
    """
    from lowbit.models.adapters import is_linear
    from lowbit.runtime.qlinear import install

    path = Path(path)
    model, tok = _float_model(path)
    _, permuted = gguf_arch(model.config)
    tmap = tensor_name_map(model.config)
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
        if t is None or t.tensor_type.name not in LAYOUT:
            continue
        rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF lists dimensions innermost first
        qt = qtensor_from_blocks(t.data, t.tensor_type.name, (rows, cols))
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
                requantize: str | None = None, embed_type: str = "q8_0", float_type: str = "f16",
                name: str = "lowbit") -> dict:
    """Write `model` (QuantLinears + float parts) as a GGUF file llama.cpp and transformers load.

    Tokenizer and general metadata are copied from `source_gguf` when the model came
    from one (bit-identical vocabulary); otherwise the tokenizer directory is converted
    with gguf's own BpeVocab/SpecialVocab. Float matrices are written as `float_type`
    (f16, or f32 for a reference llama.cpp can compare against). Returns a report: per tensor type counts,
    and for re-quantized tensors their relative error.
    """
    gguf = _gguf()
    from lowbit.runtime.qlinear import quantized_modules

    config = model.config
    arch, permuted = gguf_arch(config)
    tmap = tensor_name_map(config)
    qmods = quantized_modules(model)
    if requantize is not None and requantize.lower() not in GGUF_PRESETS:
        raise UserError(f"--requantize {requantize!r}: choose one of {', '.join(GGUF_PRESETS)}")

    tensors, report = [], {"types": {}, "requantized": {}}
    experts: dict[str, dict[int, tuple]] = {}  # "...experts.gate_proj" -> {expert: (array, raw type)}

    def put(name: str, arr, raw) -> None:
        m = _EXPERT.match(name)
        if m:  # one 3-D tensor per expert projection and layer, written once all experts are in
            experts.setdefault(f"{m['prefix']}.{m['proj']}", {})[int(m["e"])] = (arr, raw)
            return
        gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise UserError(f"{name}: no GGUF name for this module in the {arch} layout")
        tensors.append((gname, arr, raw))

    for pname, p in model.state_dict().items():
        mod_name, _, leaf = pname.rpartition(".")
        if mod_name in qmods and leaf in ("codes", "scale", "zero_point"):
            continue
        if pname == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        if _EXPERT.match(mod_name) and leaf == "weight":
            put(mod_name, *_float_array(p, float_type, pname))
            continue
        gname = tmap.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            if "rotary_emb" in pname:
                continue
            raise UserError(f"{pname}: no GGUF name for this tensor in the {arch} layout")
        ftype = embed_type if "embed" in pname or pname == "lm_head.weight" else ("f32" if p.dim() == 1 else float_type)
        arr, raw = _float_array(p, ftype, pname)
        if raw is None and p.dim() == 2 and _qk_heads(config, mod_name) and permuted:
            arr = arr[_row_permutation(_qk_heads(config, mod_name), arr.shape[0]).numpy()]
        tensors.append((gname, arr, raw))
    for mod_name, m in qmods.items():
        qt = m.qweight
        heads = _qk_heads(config, mod_name) if permuted else None
        if heads:
            qt = _permute_rows(qt, _row_permutation(heads, qt.shape[0]))
        try:
            arr, tname = blocks_from_qtensor(qt)
        except NotExact as e:
            if requantize is None:
                raise UserError(f"{mod_name}: {e}; quantize with a GGUF scheme (--scheme q4_k, q4_0, ...), "
                                "or pass --requantize TYPE to re-round (the error is reported)") from None
            w = qt.dequantize()
            rq = quantize_tensor(w, fitting(GGUF_PRESETS[requantize.lower()], w.shape[-1]), name=mod_name)
            arr, tname = blocks_from_qtensor(rq)
            report["requantized"][mod_name] = float(torch.linalg.norm(rq.dequantize() - w) / torch.linalg.norm(w).clamp(min=1e-30))
        put(mod_name, arr, ggml_type(tname))
        if m.bias is not None:  # Qwen2's q/k/v biases stay float beside the codes
            if _EXPERT.match(mod_name):
                raise UserError(f"{mod_name}: expert biases (gpt-oss) have no GGUF layout in lowbit's export yet")
            tensors.append((tmap.get_name(mod_name + ".bias", try_suffixes=(".bias",)), m.bias.detach().float().numpy(), None))
    for name, by_expert in experts.items():
        tensors.append(_stacked_experts(tmap, name, by_expert, arch))
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


# per-expert Linears (models.moe.RoutedExperts): `...mlp.experts.{e}.gate_proj`
_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>[0-9]+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def _stacked_experts(tmap, name: str, by_expert: dict, arch: str) -> tuple:
    """llama.cpp's `ffn_{gate,up,down}_exps`: every expert's [rows, row_bytes] stacked into one
    [experts, rows, row_bytes] tensor (all experts at one type)."""
    n = len(by_expert)
    if sorted(by_expert) != list(range(n)):
        raise UserError(f"{name}: experts {sorted(set(range(max(by_expert) + 1)) - set(by_expert))[:3]} are missing")
    types = {raw.name if raw is not None else str(arr.dtype) for arr, raw in by_expert.values()}
    if len(types) > 1:
        raise UserError(f"{name}: GGUF holds all experts of a projection in one tensor of one type; "
                        f"these experts have {sorted(types)}")
    gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
    if gname is None:
        raise UserError(f"{name}: no GGUF name for experts in the {arch} layout")
    return gname, np.stack([by_expert[e][0] for e in range(n)]), by_expert[0][1]


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
    head_dim = getattr(config, "head_dim", None)
    if head_dim and head_dim != config.hidden_size // heads:  # Qwen3: 128 regardless of hidden / heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    n_experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS if (getattr(config, k, None) or 0) > 1), None)
    if n_experts:
        if getattr(config, "norm_topk_prob", True) is False:
            raise UserError("llama.cpp renormalizes the top-k router weights of this architecture; this model's "
                            "norm_topk_prob is false, so llama.cpp would compute another model")
        w.add_expert_count(n_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(config.moe_intermediate_size)
    kinds = {type_name_for(m.scheme) for m in qmods.values()}
    ftype = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}.get(*kinds, *kinds) if len(kinds) == 1 else None
    if ftype is not None and f"MOSTLY_{ftype}" in gguf.LlamaFileType.__members__:  # a label only: each tensor has its type
        w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{ftype}"])
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
