"""What every Hugging Face-style quantized checkpoint shares: writing the directory
atomically, and rebuilding a model from its tensors with QuantLinears in place."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.core.layer import QuantizedLayer
from lowbit.errors import UserError
from lowbit.io.files import atomic_dir, check_output
from lowbit.models.disk_names import DiskNames, disk_names
from lowbit.models.moe import RoutedExperts, is_moe_config, unfuse_experts
from lowbit.runtime.qlinear import QUANT_BUFFERS, float_state, install


def float_tensors(model, skip_modules, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The float parts (embeddings, norms, float Linears), at `float_dtype`."""
    return {k: (v.to(float_dtype) if v.is_floating_point() else v).contiguous()
            for k, v in float_state(model).items() if k.rpartition(".")[0] not in skip_modules}


# families whose float checkpoints store experts fused but whose vLLM loader also reads one tensor
# per expert projection under the in-memory names (`feed_forward.experts.{e}.gate_proj`, Llama 4's
# unfused path, what llm-compressor writes); gpt-oss' loader does not
PER_EXPERT_LOADERS = {"llama4_text"}


def checkpoint_names(model, fmt: str) -> DiskNames | None:
    """How a checkpoint names this model's tensors where that differs from lowbit's in-memory
    names (mixture-of-experts models: one tensor per expert projection, under the family's own
    names, as transformers saves them and vLLM loads them); None where the names are the same."""
    if not any(isinstance(m, RoutedExperts) for m in model.modules()):
        return None
    names = disk_names(model.config)
    if names.fused_on_disk and model.config.model_type not in PER_EXPERT_LOADERS:
        key, held = next(iter(names.fused_on_disk.items()))
        raise UserError(f"{type(model).__name__}: its checkpoints store {len(held)} expert weights in one tensor ({key}); "
                        f"the {fmt} format holds one 2-D tensor per Linear (export gguf, or keep lowbit's own output)")
    return names


def write_checkpoint(out: str | Path, model, tokenizer, tensors: dict[str, torch.Tensor], quantization_config: dict,
                     float_dtype: torch.dtype, extra_json: dict[str, dict] | None = None,
                     names: DiskNames | None = None) -> Path:
    """model.safetensors + config.json (with quantization_config) + tokenizer, tensors under their
    checkpoint `names`; appears whole or not at all."""
    from safetensors.torch import save_file

    out = check_output(out)
    if names is not None:
        tensors = {names.disk(k): v for k, v in tensors.items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        cfg["dtype"] = str(float_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for fname, obj in (extra_json or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of every *.safetensors shard under lowbit's in-memory
    name: a mixture-of-experts checkpoint's per-expert tensors become `experts.{e}.gate_proj`, ...)."""
    from lowbit.io.files import read_safetensors

    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'config.json'}: unreadable ({e})") from None
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{path}: no .safetensors files")
    tensors = {}
    for f in shards:
        tensors.update(read_safetensors(f)[0])
    if is_moe_config(cfg):
        from transformers import AutoConfig

        names = disk_names(AutoConfig.from_pretrained(path, local_files_only=True))
        tensors = {names.memory(k): v for k, v in tensors.items()}
    return cfg, tensors


def quantization_config(path: Path, cfg: dict, side_file: str) -> dict:
    """config.json's quantization_config over the loader's own side file (e.g.
    quantize_config.json), which older checkpoints carry instead."""
    qc = cfg.get("quantization_config") or {}
    side = path / side_file
    if side.is_file():
        try:
            qc = {**json.loads(side.read_text()), **qc}
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{side}: unreadable ({e})") from None
    return qc


def take_qtensors(tensors: dict[str, torch.Tensor], leaves: tuple[str, ...], build) -> dict:
    """{module: build(module)} for every module with a `.qweight`; its packed `leaves`
    are removed from `tensors`, leaving the float parts for assemble()."""
    names = [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]
    qts = {n: build(n) for n in names}
    for n in names:
        for leaf in leaves:
            tensors.pop(f"{n}.{leaf}", None)
    return qts


def assemble(path: str | Path, qtensors: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """(model, tokenizer): the config's architecture, QuantLinears for `qtensors`, the rest from `tensors`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # lowbit runs the QuantLinears itself
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model, copy_weights=False)  # read_checkpoint named the experts per expert
    install(model, {n: QuantizedLayer(qt) for n, qt in qtensors.items()})
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    missing = [k for k in missing if k.rpartition(".")[2] not in QUANT_BUFFERS
               and not (getattr(config, "tie_word_embeddings", False) and k.startswith("lm_head."))]
    if missing or unexpected:
        raise UserError(f"{path}: tensors do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True) if (path / "tokenizer.json").is_file() else None
    return model, tok
