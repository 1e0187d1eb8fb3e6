"""Where the decoder blocks and their Linear layers sit, per architecture family."""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import UserError

# (attribute path of the block list, families that use it)
LAYER_PATHS = (
    ("model.layers", "Llama, Qwen2, Mistral, Gemma, Phi-3"),
    ("model.decoder.layers", "OPT"),
    ("transformer.h", "GPT-2, GPT-J, Falcon"),
    ("gpt_neox.layers", "GPT-NeoX, Pythia"),
)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, blocks) of a decoder-only causal LM, or a clear error."""
    for path, _ in LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    expected = "; ".join(f"{p} ({fam})" for p, fam in LAYER_PATHS)
    raise UserError(f"unsupported architecture {type(model).__name__}: cannot find its decoder blocks; expected one of: {expected}")


# Final norm before the LM head, same families as LAYER_PATHS.
FINAL_NORM_PATHS = ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f", "gpt_neox.final_layer_norm")


def final_norm(model: nn.Module) -> nn.Module | None:
    for path in FINAL_NORM_PATHS:
        m = _get(model, path)
        if isinstance(m, nn.Module):
            return m
    return None


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a Linear with a transposed weight)."""
    return isinstance(m, (nn.Linear, Conv1D))


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear layout [out_features, in_features]."""
    return m.weight.t() if isinstance(m, Conv1D) else m.weight


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    w = w.t() if isinstance(m, Conv1D) else w
    m.weight.data.copy_(w.to(m.weight.dtype))


def linear_modules(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of one block, by name relative to the block, in execution order."""
    found = {n: m for n, m in block.named_modules() if n and is_linear(m)}
    if not found:
        raise UserError(f"block {type(block).__name__} holds no nn.Linear layers; lowbit quantizes Linear weights")
    return found


# ---- where scales and rotations can be folded (Llama-style blocks) -------------------

def is_rms_norm(m: nn.Module) -> bool:
    """An RMSNorm that multiplies by its weight (Gemma's 1 + weight form would need another fold)."""
    name = type(m).__name__  # each family has its own RMSNorm class and no common base
    return name.endswith("RMSNorm") and "Gemma" not in name and isinstance(getattr(m, "weight", None), torch.Tensor)


def block_mlp(block: nn.Module) -> nn.Module | None:
    """A decoder block's MLP or MoE block (Llama 4 calls it feed_forward)."""
    return getattr(block, "mlp", None) or getattr(block, "feed_forward", None)


def llama_parts(block: nn.Module, what: str, mlp: bool = True) -> dict[str, nn.Module]:
    """The pieces of a Llama-style block (RMSNorm before attention and MLP, q/k/v/o, gate/up/down)
    that folding scales or rotations needs, or a clear error naming `what` cannot run.
    `mlp=False`: the attention half only (a mixture-of-experts block brings its own MLP parts)."""
    attn, ffn = getattr(block, "self_attn", None), block_mlp(block)
    parts = {
        "input_norm": getattr(block, "input_layernorm", None),
        "post_norm": getattr(block, "post_attention_layernorm", None),
        **{p: getattr(attn, f"{p}_proj", None) for p in ("q", "k", "v", "o")},
        **({p: getattr(ffn, f"{p}_proj", None) for p in ("gate", "up", "down")} if mlp else {}),
    }
    missing = [k for k, v in parts.items() if v is None]
    if missing or not (is_rms_norm(parts["input_norm"]) and is_rms_norm(parts["post_norm"])):
        raise UserError(f"{what} folds scales into Llama-style blocks (RMSNorm, q/k/v/o_proj, gate/up/down_proj); "
                        f"{type(block).__name__} is not one" + (f" (no {', '.join(missing)})" if missing else ""))
    return parts


def check_context(config, length: int, what: str) -> None:
    """Positions past the model's context are extrapolation at best and hours of work at worst."""
    ctx = getattr(config, "max_position_embeddings", None)
    if ctx and length > ctx:
        raise UserError(f"{what} = {length} tokens exceeds the model's context of {ctx} tokens (max_position_embeddings)")


def attention_heads(model_or_config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from a model config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    n = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or n
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
    return n, kv, hd
