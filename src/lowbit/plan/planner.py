"""Deployment planner: bytes, fit, GPUs and roofline speed, from the architecture.

Every byte figure follows lowbit's own storage: per quantized Linear, packed codes
ceil(out*in*bits/8), one scale per (row, group) in the scale dtype, zero points
packed at the code width; float parts (embeddings, norms, biases, an untied
lm_head unless quantized) at `float_dtype`. KV cache = 2 x layers x kv_heads x
head_dim x seq x batch x bytes (GQA aware), plus per-(token, head) scales for an
INT8/FP8 cache.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit.core.qparams import num_groups
from lowbit.core.scheme import Recipe, Scheme, fitting
from lowbit.core.tensor import packed_nbytes, scale_nbytes
from lowbit.errors import UserError
from lowbit.models.moe import EXPERT_COUNT_KEYS
from lowbit.plan.devices import Device

GIB = 1024**3
MAX_LAYERS, MAX_EXPERTS = 10_000, 65_536
KV_BYTES = {"fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}


@dataclass
class Arch:
    """The numbers of a decoder-only transformer that bytes and FLOPs follow from.

    Mixture-of-experts: `experts` routed experts of width `expert_intermediate` in the
    layers `moe_layers` names (all layers when None), `experts_per_token` of them run per
    token, plus `shared_intermediate` columns of always-on shared experts; the other layers
    keep a dense MLP of width `intermediate`. Multi-head latent attention (DeepSeek-V2/V3)
    when `kv_lora_rank` is set."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    gated_mlp: bool = True          # SwiGLU-style gate/up/down (3 matrices) vs up/down (2)
    qkv_bias: bool = False
    name: str = "model"
    params_override: int | None = None  # "a 70B model": a parameter count without shapes
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    moe_layers: tuple[int, ...] | None = None
    expert_bias: bool = False       # gpt-oss: every expert projection has a bias
    q_lora_rank: int = 0            # MLA; 0 = queries projected directly
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        # the byte count walks the layers (and experts) one by one: refuse what no model has
        if not 0 < self.layers <= MAX_LAYERS or self.experts > MAX_EXPERTS:
            raise UserError(f"{self.name}: {self.layers} layers and {self.experts} experts per layer; lowbit plans models "
                            f"of 1..{MAX_LAYERS} layers and at most {MAX_EXPERTS} experts")

    def is_moe_layer(self, i: int) -> bool:
        return self.experts > 0 and (self.moe_layers is None or i in self.moe_layers)

    def _attention(self) -> list[tuple[str, int, int, int]]:
        if not self.kv_lora_rank:
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return [("q_proj", q, self.hidden, 1), ("k_proj", kv, self.hidden, 1), ("v_proj", kv, self.hidden, 1),
                    ("o_proj", self.hidden, q, 1)]
        qk = self.head_dim  # MLA: head_dim is the query/key width, nope + rope parts
        q = [("q_a_proj", self.q_lora_rank, self.hidden, 1), ("q_b_proj", self.heads * qk, self.q_lora_rank, 1)] \
            if self.q_lora_rank else [("q_proj", self.heads * qk, self.hidden, 1)]
        return q + [("kv_a_proj_with_mqa", self.kv_lora_rank + self.qk_rope_head_dim, self.hidden, 1),
                    ("kv_b_proj", self.heads * (qk - self.qk_rope_head_dim + self.v_head_dim), self.kv_lora_rank, 1),
                    ("o_proj", self.hidden, self.heads * self.v_head_dim, 1)]

    def _mlp(self, width: int, count: int, prefix: str = "") -> list[tuple[str, int, int, int]]:
        up = [(f"{prefix}gate_proj", width, self.hidden, count)] if self.gated_mlp else []
        return up + [(f"{prefix}up_proj", width, self.hidden, count), (f"{prefix}down_proj", self.hidden, width, count)]

    def linears(self, layer: int = 0) -> list[tuple[str, int, int, int]]:
        """(name, out_features, in_features, copies) of every Linear in block `layer`;
        routed experts are one entry with `copies` = the number of experts."""
        lin = self._attention()
        if self.is_moe_layer(layer):
            lin += self._mlp(self.expert_intermediate, self.experts, "experts.")
            lin += [("router", self.experts, self.hidden, 1)]
            if self.shared_intermediate:
                lin += self._mlp(self.shared_intermediate, 1, "shared_experts.")
        else:
            lin += self._mlp(self.intermediate, 1)
        return lin

    def module_name(self, layer: int, name: str, copy: int = 0) -> str:
        """The module name a recipe matches (Llama/Mixtral-style naming)."""
        part = "self_attn" if name in {n for n, *_ in self._attention()} else "mlp"
        if name.startswith("experts."):
            name = f"experts.{copy}.{name.split('.', 1)[1]}"
        return f"model.layers.{layer}.{part}.{name}"

    def components(self) -> dict[str, int]:
        """Parameters per component."""
        comp = {"embeddings": self.vocab * self.hidden, "attention": 0, "mlp": 0, "experts": 0, "norms": 0,
                "lm_head": 0 if self.tied else self.vocab * self.hidden}
        attn_names = {n for n, *_ in self._attention()}
        for i in range(self.layers):
            for name, o, n, copies in self.linears(i):
                key = "attention" if name in attn_names else "experts" if name.startswith("experts.") else "mlp"
                comp[key] += o * n * copies + (o * copies if name.startswith("experts.") and self.expert_bias else 0)
            if self.qkv_bias:
                comp["attention"] += (self.heads + 2 * self.kv_heads) * self.head_dim
        comp["norms"] = (2 * self.layers + 1) * self.hidden + self.layers * (self.q_lora_rank + self.kv_lora_rank)
        if not self.experts:
            del comp["experts"]
        return comp

    @property
    def parameters(self) -> int:
        return self.params_override or sum(self.components().values())

    @property
    def active_parameters(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to."""
        if not self.experts or self.params_override:
            return self.parameters
        return self.parameters - round(self.components()["experts"] * (1 - self.experts_per_token / self.experts))

    def experts_read(self, batch: int) -> float:
        """Expected fraction of the routed experts a decode step of `batch` tokens reads
        (uniform routing: each expert is missed by a token with probability 1 - k/E)."""
        if not self.experts:
            return 1.0
        return 1 - (1 - self.experts_per_token / self.experts) ** batch


# ---- reading architectures ----------------------------------------------------------------

def _moe_fields(cfg: dict, g) -> dict:
    """The MoE and MLA fields of an HF config, from each family's own keys."""
    experts = g(*EXPERT_COUNT_KEYS, default=0) or 0
    if not experts:
        return {}
    layers = g("num_hidden_layers")
    if cfg.get("mlp_only_layers") or cfg.get("first_k_dense_replace") or g("decoder_sparse_step", "moe_layer_freq",
                                                                            "interleave_moe_layer_step", default=1) != 1:
        step = g("decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step", default=1) or 1
        first = cfg.get("first_k_dense_replace") or 0
        dense = set(cfg.get("mlp_only_layers") or [])
        moe = tuple(i for i in range(layers) if i >= first and i not in dense and (i + 1) % step == 0)
    else:
        moe = None
    width = g("moe_intermediate_size", "expert_intermediate_size", default=None) or g("intermediate_size")
    shared = g("shared_expert_intermediate_size", "shared_intermediate_size", default=0) or 0
    n_shared = g("n_shared_experts", "num_shared_experts", default=0) or 0
    if n_shared and not shared:
        shared = n_shared * width
    if cfg.get("model_type") in ("llama4_text", "llama4"):
        shared = width  # one shared expert as wide as a routed one
    return {"experts": experts, "experts_per_token": g("num_experts_per_tok", "experts_per_token", "moe_topk", default=1),
            "expert_intermediate": width, "shared_intermediate": shared, "moe_layers": moe,
            "expert_bias": cfg.get("model_type") == "gpt_oss"}


def arch_from_hf_config(cfg: dict, name: str = "model") -> Arch:
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:  # multimodal wrappers (Llama 4): the text model
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", cfg["text_config"].get("tie_word_embeddings"))}
    g = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)  # noqa: E731
    hidden = g("hidden_size", "n_embd", "d_model")
    layers = g("num_hidden_layers", "n_layer", "num_layers")
    heads = g("num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        raise UserError(f"{name}: config lacks hidden_size / num_hidden_layers / num_attention_heads")
    mtype = cfg.get("model_type", "")
    mla = {}
    if cfg.get("kv_lora_rank"):
        mla = {"q_lora_rank": cfg.get("q_lora_rank") or 0, "kv_lora_rank": cfg["kv_lora_rank"],
               "qk_rope_head_dim": cfg["qk_rope_head_dim"], "v_head_dim": cfg["v_head_dim"]}
    moe = _moe_fields(cfg, g)
    return Arch(
        layers=layers, hidden=hidden, heads=heads,
        kv_heads=g("num_key_value_heads", default=heads),
        head_dim=(cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) if mla else g("head_dim", default=hidden // heads),
        intermediate=g("intermediate_size_mlp", "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab=g("vocab_size"),
        tied=bool(cfg.get("tie_word_embeddings", mtype in ("gpt2", "opt"))),
        gated_mlp=mtype not in ("gpt2", "opt", "gpt_neox", "gptj", "falcon", "bloom", "phi"),
        qkv_bias=mtype in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
        name=name, **mla, **moe,
    )


def arch_from_gguf(path: Path) -> Arch:
    from lowbit.models.load import read_gguf

    r = read_gguf(path)

    def val(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        v = f.parts[f.data[0]]
        return v.tobytes().decode() if f.types and f.types[0].name == "STRING" else int(v[0]) if v.size == 1 else v

    arch = val("general.architecture")
    if arch is None:
        raise UserError(f"{path}: GGUF has no general.architecture")
    hidden = val(f"{arch}.embedding_length")
    heads = val(f"{arch}.attention.head_count")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in r.tensors}
    return Arch(
        layers=val(f"{arch}.block_count"), hidden=hidden, heads=heads,
        kv_heads=val(f"{arch}.attention.head_count_kv", heads),
        head_dim=val(f"{arch}.attention.key_length", hidden // heads),
        intermediate=val(f"{arch}.feed_forward_length"),
        vocab=len(tokens.data) if tokens is not None else val(f"{arch}.vocab_size"),
        tied="output.weight" not in names, gated_mlp=any(n.endswith("ffn_gate.weight") for n in names),
        qkv_bias=any(n.endswith("attn_q.bias") for n in names), name=path.name,
    )


def read_model(source: str) -> tuple[Arch, Recipe | None]:
    """Arch (and the recipe of a lowbit output) from a directory, config.json or GGUF file."""
    from lowbit.models.load import EMBEDDED, embedded_dir

    p = embedded_dir(source) if source in EMBEDDED else Path(source).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return arch_from_gguf(p), None
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise UserError(f"{source!r}: give a model directory, a config.json, a .gguf file, an embedded name, "
                        "or a parameter count (e.g. 8e9) with --layers/--hidden/--heads")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg})") from None
    recipe = None
    lb = cfg_path.parent / "lowbit.json"
    if lb.is_file():
        recipe = Recipe.from_dict(json.loads(lb.read_text())["recipe"])
    return arch_from_hf_config(cfg, cfg_path.parent.name), recipe


# ---- bytes ------------------------------------------------------------------------------------

def linear_bytes(out_f: int, in_f: int, scheme: Scheme | None, float_bytes: int) -> tuple[int, int, int]:
    """(code bytes, scale + zero-point bytes, float bytes) of one Linear as its format stores it
    (a K-quant as GGUF stores it; lowbit's own directory keeps its scales as fp32 products)."""
    if scheme is None:
        return 0, 0, out_f * in_f * float_bytes
    scheme = fitting(scheme, in_f)  # a K-quant on a row 256 does not divide: llama-quantize's fallback
    rows, groups = num_groups(scheme, out_f, in_f)
    return packed_nbytes(out_f * in_f, scheme.bits), scale_nbytes(scheme, rows, groups, in_f), 0


def weight_bytes(arch: Arch, recipe: Recipe | None, float_dtype_bytes: int = 2) -> dict:
    """Codes, scales (+ zero points) and float bytes of the whole model."""
    return _stored_bytes(arch, recipe, float_dtype_bytes)[0]


def _stored_bytes(arch: Arch, recipe: Recipe | None, float_dtype_bytes: int = 2) -> tuple[dict, int]:
    """(weight_bytes' dict, the bytes of the routed experts within it)."""
    codes = scales = floats = 0
    if arch.params_override:  # no shapes: every parameter in Linears with in_features = hidden
        s = recipe.scheme if recipe else None
        if s is None:
            return {"weight_bytes": 0, "scale_bytes": 0, "float_bytes": arch.params_override * float_dtype_bytes}, 0
        per_row = arch.hidden
        rows = arch.params_override // per_row
        c, sc, _ = linear_bytes(rows, per_row, s, float_dtype_bytes)
        return {"weight_bytes": c, "scale_bytes": sc, "float_bytes": 0}, 0
    expert_bytes = 0
    for i in range(arch.layers):
        for name, o, n, copies in arch.linears(i):
            for e in range(copies):
                scheme = None
                if recipe and name != "router":  # routers stay float, like lm_head, unless named
                    scheme = recipe.scheme_for(arch.module_name(i, name, e))
                c, sc, f = linear_bytes(o, n, scheme, float_dtype_bytes)
                codes, scales, floats = codes + c, scales + sc, floats + f
                if name.startswith("experts."):
                    bias = o * float_dtype_bytes if arch.expert_bias else 0  # gpt-oss: float biases beside the codes
                    floats += bias
                    expert_bytes += c + sc + f + bias
    comp = arch.components()
    floats += (comp["embeddings"] + comp["norms"]) * float_dtype_bytes
    if arch.qkv_bias:
        floats += arch.layers * (arch.heads + 2 * arch.kv_heads) * arch.head_dim * float_dtype_bytes
    if not arch.tied:
        head_scheme = recipe.scheme_for("lm_head") if recipe else None
        c, sc, f = linear_bytes(arch.vocab, arch.hidden, head_scheme, float_dtype_bytes)
        codes, scales, floats = codes + c, scales + sc, floats + f
    return {"weight_bytes": codes, "scale_bytes": scales, "float_bytes": floats}, expert_bytes


def kv_cache_bytes(arch: Arch, seq_len: int, batch: int, kv_dtype: str = "fp16") -> int:
    if kv_dtype not in KV_BYTES:
        raise UserError(f"--kv-dtype {kv_dtype!r}: choose one of {', '.join(KV_BYTES)}")
    elems = 2 * arch.layers * arch.kv_heads * arch.head_dim * seq_len * batch
    scales = 2 * arch.layers * arch.kv_heads * seq_len * batch * 2 if KV_BYTES[kv_dtype] == 1 else 0  # fp16 per (token, head)
    return elems * KV_BYTES[kv_dtype] + scales


def activation_bytes(arch: Arch, batch: int, seq_len: int, chunk: int = 2048) -> int:
    """Peak workspace: a prefill chunk's hidden/MLP activations (bf16) plus fp32 logits of
    the last token of each sequence. An estimate: engines differ."""
    tokens = batch * min(seq_len, chunk)
    return tokens * (4 * arch.hidden + 2 * arch.intermediate) * 2 + batch * arch.vocab * 4


# ---- plan ------------------------------------------------------------------------------------

@dataclass
class PlanInput:
    arch: Arch
    scheme: Scheme | None
    recipe: Recipe | None
    device: Device
    batch: int = 8
    seq_len: int = 8192
    kv_dtype: str = "fp16"
    headroom: float = 0.3
    replicas: int | None = None
    target_tokens_per_s: float | None = None
    max_gpus_per_replica: int = 8


@dataclass
class Plan:
    inputs: dict
    parameters: int
    active_parameters: int  # per token: differs from `parameters` for mixture-of-experts models
    components: dict
    weight_bytes: int
    scale_bytes: int
    float_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    total_bytes: int
    fp16_total_bytes: int
    saved_vs_fp16_percent: float
    usable_bytes_per_gpu: int
    tensor_parallel: int
    pipeline_stages: int
    gpus_per_replica: int
    per_gpu_bytes: int
    fits: bool
    shortfall_bytes: int
    replicas: int
    fleet_gpus: int
    roofline: dict
    suggestions: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compute_format(scheme: Scheme | None) -> str:
    """What the matmuls run in: weight-only schemes dequantize to bf16."""
    if scheme is None or scheme.activations is None:
        return "bf16"
    a = scheme.activations.format
    return "fp8" if a.startswith("fp8") else "int8" if a in ("int8",) else "fp4" if a == "fp4_e2m1" else "int8"


def roofline(arch: Arch, device: Device, stored_weight_bytes: int, kv_bytes_per_seq_token: float, scheme: Scheme | None,
             batch: int, seq_len: int, tp: int, expert_bytes: int = 0) -> dict:
    """Decode: bytes moved per step / bandwidth vs FLOPs / peak; prefill: FLOPs / peak.
    MoE: FLOPs follow the active parameters; a decode step reads the dense weights and the
    routed experts its batch's tokens reach (`Arch.experts_read`)."""
    P = arch.active_parameters - arch.components().get("embeddings", 0)  # embedding lookup is a gather, not a matmul
    if arch.tied:
        P += arch.vocab * arch.hidden  # the tied lm_head still multiplies
    fmt = compute_format(scheme)
    peak = device.peak_tflops(fmt) * 1e12 * tp
    bw = device.bandwidth_gb_s * 1e9 * tp
    # decode at mean context seq/2: read the weights once per step, and the batch's KV so far
    kv_read = kv_bytes_per_seq_token * batch * seq_len / 2
    attn_flops_decode = 4 * arch.layers * arch.heads * arch.head_dim * (seq_len / 2) * batch
    weights_read = stored_weight_bytes - expert_bytes * (1 - arch.experts_read(batch))
    t_mem = (weights_read + kv_read) / bw
    t_cmp = (2 * P * batch + attn_flops_decode) / peak
    step = max(t_mem, t_cmp)
    prefill_flops = batch * (2 * P * seq_len + 2 * arch.layers * arch.heads * arch.head_dim * seq_len**2)
    return {
        "compute_format": fmt,
        "native_format": device.native(fmt),
        "decode_step_ms": step * 1e3,
        "decode_bound": "memory" if t_mem >= t_cmp else "compute",
        "decode_tokens_per_s": batch / step,
        "decode_weight_bytes_per_step": weights_read,
        "prefill_seconds": prefill_flops / peak,
        "prefill_tokens_per_s": batch * seq_len / (prefill_flops / peak),
        # batch where weight traffic stops dominating: 2*P*B/peak = weight_bytes/bw
        "compute_bound_batch": math.ceil(stored_weight_bytes * peak / (2 * P * bw)),
    }


def plan(inp: PlanInput) -> Plan:
    arch = inp.arch
    recipe = inp.recipe or (Recipe(scheme=inp.scheme) if inp.scheme else None)
    wb, expert_b = _stored_bytes(arch, recipe)
    stored = wb["weight_bytes"] + wb["scale_bytes"] + wb["float_bytes"]
    kv = kv_cache_bytes(arch, inp.seq_len, inp.batch, inp.kv_dtype)
    act = activation_bytes(arch, inp.batch, inp.seq_len)
    total = stored + kv + act
    fp16 = weight_bytes(arch, None)["float_bytes"] + kv_cache_bytes(arch, inp.seq_len, inp.batch, "fp16") + act
    usable = int(inp.device.memory_gb * 1e9 * (1 - inp.headroom))

    def per_gpu(tp: int, pp: int, kv_b: int) -> int:
        # weights and KV shard over tp x pp; KV heads cannot split finer than one head per GPU
        kv_split = min(tp, arch.kv_heads) * pp
        return math.ceil(stored / (tp * pp)) + math.ceil(kv_b / kv_split) + act

    tp, pp = 1, 1
    while per_gpu(tp, pp, kv) > usable and tp * pp < inp.max_gpus_per_replica:
        if tp < 8:
            tp *= 2
        else:
            pp += 1
    gpus = tp * pp
    need = per_gpu(tp, pp, kv)
    fits = need <= usable
    shortfall = max(0, need - usable)
    s_for_roof = recipe.scheme if recipe else None
    kv_per_tok = kv / max(inp.seq_len * inp.batch, 1)
    roof = roofline(arch, inp.device, stored, kv_per_tok, s_for_roof, inp.batch, inp.seq_len, tp, expert_b)
    roof["pipeline_stages"] = pp
    if inp.target_tokens_per_s:
        replicas = math.ceil(inp.target_tokens_per_s / roof["decode_tokens_per_s"])
    else:
        replicas = inp.replicas or 1
    suggestions = []
    if not fits:
        gpus_needed = gpus
        while per_gpu(min(gpus_needed, 8), max(1, math.ceil(gpus_needed / 8)), kv) > usable and gpus_needed < 1024:
            gpus_needed *= 2
        if per_gpu(min(gpus_needed, 8), max(1, math.ceil(gpus_needed / 8)), kv) <= usable:
            suggestions.append(f"short by {shortfall / GIB:.2f} GiB per GPU at {gpus} GPU(s): {gpus_needed} GPUs per replica would fit")
        else:  # what does not shard (activations, a KV head per GPU) does not fit even on 1024 GPUs
            suggestions.append(f"short by {shortfall / GIB:.2f} GiB per GPU at {gpus} GPU(s), and still short at 1024 GPUs per replica")
        if inp.kv_dtype in ("fp16", "bf16"):
            kv8 = kv_cache_bytes(arch, inp.seq_len, inp.batch, "fp8")
            if per_gpu(tp, pp, kv8) <= usable:
                suggestions.append("an FP8 KV cache (--kv-dtype fp8) would fit")
        for name in ("w8a16", "w4a16-g128", "w3a16-g64"):
            s = Scheme.parse(name)
            b = weight_bytes(arch, Recipe(scheme=s))
            if sum(b.values()) < stored and math.ceil(sum(b.values()) / gpus) + math.ceil(kv / min(gpus, arch.kv_heads)) + act <= usable:
                suggestions.append(f"fewer bits: {name} would fit on {gpus} GPU(s)")
                break
        lo, hi = 0, inp.seq_len
        while lo < hi:  # longest context that fits
            mid = (lo + hi + 1) // 2
            if per_gpu(tp, pp, kv_cache_bytes(arch, mid, inp.batch, inp.kv_dtype)) <= usable:
                lo = mid
            else:
                hi = mid - 1
        if lo > 0:
            suggestions.append(f"shorter context: up to {lo} tokens per sequence fits at batch {inp.batch}")
    return Plan(
        inputs={"model": arch.name, "scheme": recipe.scheme.name if recipe else "fp16", "device": inp.device.name,
                "batch": inp.batch, "seq_len": inp.seq_len, "kv_dtype": inp.kv_dtype, "headroom": inp.headroom},
        parameters=arch.parameters, active_parameters=arch.active_parameters, components=arch.components() if not arch.params_override else {},
        weight_bytes=wb["weight_bytes"], scale_bytes=wb["scale_bytes"], float_bytes=wb["float_bytes"],
        kv_cache_bytes=kv, activation_bytes=act, total_bytes=total, fp16_total_bytes=fp16,
        saved_vs_fp16_percent=100.0 * (1 - total / fp16), usable_bytes_per_gpu=usable,
        tensor_parallel=tp, pipeline_stages=pp, gpus_per_replica=gpus, per_gpu_bytes=need, fits=fits,
        shortfall_bytes=shortfall, replicas=replicas, fleet_gpus=replicas * gpus, roofline=roof, suggestions=suggestions,
    )


def decision_matrix(inp: PlanInput, schemes: list[str], quality: dict[str, float] | None = None) -> list[dict]:
    """One row per scheme: memory, GPUs, decode/prefill throughput per GPU vs fp16, measured quality cost if known.

    Roofline only: weight-only kernels also pay for dequantization, which the
    roofline does not see and which makes them slower than this at large batch."""
    base = plan(PlanInput(**{**inp.__dict__, "scheme": None, "recipe": None}))
    rows = []
    for name in ["fp16", *schemes]:
        p = base if name == "fp16" else plan(PlanInput(**{**inp.__dict__, "scheme": Scheme.parse(name), "recipe": None}))
        # per GPU: replicas of different sizes (fp16 on 4 GPUs, 4-bit on 1) are compared at equal fleet cost
        per_gpu = lambda q, key: q.roofline[key] / q.gpus_per_replica  # noqa: E731
        rows.append({
            "scheme": name, "total_gb": p.total_bytes / 1e9, "gpus_per_replica": p.gpus_per_replica, "fits": p.fits,
            "decode_tokens_per_s": p.roofline["decode_tokens_per_s"],
            "decode_speedup": per_gpu(p, "decode_tokens_per_s") / per_gpu(base, "decode_tokens_per_s"),
            "prefill_speedup": per_gpu(p, "prefill_tokens_per_s") / per_gpu(base, "prefill_tokens_per_s"),
            "native": p.roofline["native_format"],
            "measured_ppl_increase_percent": (quality or {}).get(name),
        })
    return rows


def format_plan(p: Plan) -> str:
    def gb(b):
        return f"{b / 1e9:8.2f} GB" if b >= 1e9 or b == 0 else f"{b / 1e6:8.2f} MB"

    i = p.inputs
    lines = [
        f"{i['model']}: {p.parameters / 1e9:.3f}B parameters"
        + (f" ({p.active_parameters / 1e9:.3f}B active per token)" if p.active_parameters != p.parameters else "")
        + f", scheme {i['scheme']}, {i['device']}, "
        f"batch {i['batch']} x {i['seq_len']} tokens, KV {i['kv_dtype']}",
        f"  weights (codes)     {gb(p.weight_bytes)}",
        f"  scales + zeros      {gb(p.scale_bytes)}",
        f"  float parts         {gb(p.float_bytes)}",
        f"  KV cache            {gb(p.kv_cache_bytes)}",
        f"  activations (est.)  {gb(p.activation_bytes)}",
        f"  total               {gb(p.total_bytes)}   ({p.saved_vs_fp16_percent:.1f}% less than fp16: {p.fp16_total_bytes / 1e9:.2f} GB)",
        f"  per GPU             {gb(p.per_gpu_bytes)} of {p.usable_bytes_per_gpu / 1e9:.2f} GB usable "
        f"-> {'fits' if p.fits else 'DOES NOT FIT'} with TP={p.tensor_parallel}"
        + (f" x PP={p.pipeline_stages}" if p.pipeline_stages > 1 else ""),
        f"  GPUs per replica {p.gpus_per_replica}, replicas {p.replicas}, fleet {p.fleet_gpus} GPUs",
    ]
    r = p.roofline
    lines.append(f"  roofline: decode {r['decode_tokens_per_s']:.0f} tok/s ({r['decode_step_ms']:.2f} ms/step, {r['decode_bound']}-bound), "
                 f"prefill {r['prefill_seconds']:.2f} s per batch, compute-bound from batch {r['compute_bound_batch']}, "
                 f"matmuls in {r['compute_format']}{'' if r['native_format'] else ' (NOT native: runs at bf16 speed)'}")
    lines += [f"  suggestion: {s}" for s in p.suggestions]
    return "\n".join(lines)
