"""quantize(): a model source + recipe + calibration text -> a quantized model (and its directory)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.rtn import rtn
from lowbit.core.method import Method
from lowbit.core.qparams import choose_qparams
from lowbit.core.scheme import Recipe, Scheme
from lowbit.core.tensor import QuantizedTensor, quantize_tensor
from lowbit.errors import UserError
from lowbit.models.adapters import is_linear
from lowbit.quantization.runner import run_sequential
from lowbit.runtime.qlinear import QuantLinear, install, model_bytes, round_float_parts


@dataclass
class GPTQOptions:
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    true_sequential: bool = False  # each stage of a block sees the stages before it quantized (measured: no gain here)
    weighted_mse: bool = True  # MSE scale search weighs columns by the Hessian diagonal


@dataclass
class QuantizeResult:
    model: nn.Module
    qtensors: dict[str, QuantizedTensor]
    seconds: float
    info: dict = field(default_factory=dict)
    tokenizer: object = None  # set by lowbit.quantize(), which loads the model itself


def target_modules(model: nn.Module, recipe: Recipe) -> dict[str, Scheme]:
    """Linear modules the recipe quantizes, with their schemes."""
    out = {}
    for name, mod in model.named_modules():
        if name and is_linear(mod):
            s = recipe.scheme_for(name)
            if s is not None:
                out[name] = s
    if not out:
        raise UserError("the recipe selects no Linear modules (check --include/--exclude patterns)")
    return out


@dataclass
class MethodOptions:
    smoothquant_alpha: float = 0.5  # SmoothQuant's migration strength
    outlier_threshold: float = 6.0  # LLM.int8(): input channels whose |x| reaches this stay in float
    rotation_seed: int = 0
    qat: "object | None" = None  # QATOptions; defaults when None


def static_act_scale(amax: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """One per-tensor scale that covers the calibrated range, rounded as stored."""
    from lowbit.core.qparams import qparams_from_range

    a = amax.max().reshape(1, 1)
    return qparams_from_range(-a, a, scheme)[0].reshape(1)


class BlockQuantizer:
    """The per-Linear work of a method, shared by the in-memory and the streaming pipelines:
    the smoothing `prepare`, the quantize function the runner calls, and the per-module
    extras (float outlier columns, static activation scales) the runtime needs."""

    def __init__(self, plan: Method, targets: dict[str, Scheme], heads: tuple[int, int, int] | None,
                 gptq_options: GPTQOptions, method_options: MethodOptions, float_dtype: torch.dtype):
        self.plan, self.targets, self.opts, self.mopts = plan, targets, gptq_options, method_options
        self.float_dtype = float_dtype
        self.extras: dict[str, dict] = {}
        self.latent: dict[str, torch.Tensor] = {}  # QAT's float starting points
        self.info: dict = {}
        self.prepare = None
        if plan.smooth:
            from lowbit.algorithms.smooth import make_prepare
            self.prepare, self.info[plan.smooth] = make_prepare(plan.smooth, targets, heads, method_options.smoothquant_alpha)
        self.static_acts = any(s.activations is not None and not s.activations.dynamic for s in targets.values())
        self.hessian = plan.quantizer == "gptq" or plan.smooth == "awq"

    def __call__(self, name: str, w: torch.Tensor, st) -> QuantizedTensor:
        plan, scheme, opts = self.plan, self.targets[name], self.opts
        H = st.H if st is not None else None
        if plan.outlier_split and st is not None:
            cols = torch.nonzero(st.amax >= self.mopts.outlier_threshold).flatten()
            if cols.numel():
                self.extras[name] = {"float_cols": cols, "float_weight": w[:, cols].detach().to(self.float_dtype)}
                w = w.detach().clone()
                w[:, cols] = 0  # those inputs multiply the float copy; nothing left to round
                if H is not None:
                    H = H.clone()
                    H[cols, :] = 0
                    H[:, cols] = 0
        if plan.quantizer == "qat":
            self.latent[name] = w.detach().clone()  # the float (folded) weight training starts from
        if H is None:
            return rtn(w, scheme, name)
        if plan.quantizer == "gptq":
            return gptq(w, H, scheme, blocksize=opts.blocksize, percdamp=opts.percdamp,
                        act_order=opts.act_order, weighted_mse=opts.weighted_mse, name=name)
        if plan.smooth == "awq" and scheme.granularity != "tensor":
            scale, zero_point = choose_qparams(w, scheme, hessian=H)
            return quantize_tensor(w, scheme, scale=scale, zero_point=zero_point, name=name)
        return rtn(w, scheme, name)

    def set_static_scales(self, act_amax: dict[str, torch.Tensor]) -> None:
        """Per-tensor activation scales from the calibrated ranges (outlier columns excluded)."""
        for name, amax in act_amax.items():
            acts = self.targets[name].activations
            if acts is not None and not acts.dynamic:
                a = amax.clone()
                if name in self.extras and "float_cols" in self.extras[name]:
                    a[self.extras[name]["float_cols"]] = 0
                self.extras.setdefault(name, {})["act_scale"] = static_act_scale(a, acts)

    def outlier_info(self, qts: dict[str, QuantizedTensor]) -> dict:
        total = sum(q.shape[1] for q in qts.values())
        kept = sum(int(e["float_cols"].numel()) for e in self.extras.values() if "float_cols" in e)
        return {"threshold": self.mopts.outlier_threshold, "float_input_channels": kept,
                "float_fraction": kept / max(total, 1)}


def check_rotation_targets(model: nn.Module, targets: dict) -> None:
    left = [n for n, m in model.named_modules() if getattr(m, "input_transform", None) and n not in targets]
    if left:
        raise UserError(f"rotate moves an online Hadamard into {left[0]}; the recipe must quantize it (it excludes {len(left)} such layers)")


def quantize_model(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None = None, *,
                   gptq_options: GPTQOptions | None = None, method_options: MethodOptions | None = None,
                   batch_size: int = 8, progress: bool = True,
                   float_dtype: torch.dtype = torch.float16) -> QuantizeResult:
    """Quantize `model` in place (its Linears become QuantLinears)."""
    from lowbit.models.adapters import attention_heads

    plan = Method.parse(recipe.method)
    mopts = method_options or MethodOptions()
    if plan.needs_calibration(recipe.scheme) and calib is None:
        raise UserError(f"{plan.name} with {recipe.scheme.name} needs calibration text")
    info: dict = {"method": plan.name}
    t0 = time.time()
    if plan.rotate:
        from lowbit.algorithms.rotate import rotate_model
        info["rotation"] = rotate_model(model, seed=mopts.rotation_seed)
    targets = target_modules(model, recipe)
    if plan.rotate:
        check_rotation_targets(model, targets)
    if not plan.needs_calibration(recipe.scheme):
        calib = None
    bq = BlockQuantizer(plan, targets, attention_heads(model) if plan.smooth else None, gptq_options or GPTQOptions(), mopts, float_dtype)
    info.update(bq.info)
    teacher = None
    if plan.quantizer == "qat":
        import copy
        teacher = copy.deepcopy(model).eval()  # the float model QAT distils from
    act_amax = {} if bq.static_acts else None
    qts = run_sequential(model, targets, bq, calib=calib, batch_size=batch_size, progress=progress,
                         desc=f"{plan.name} {recipe.scheme.name}", true_sequential=bq.opts.true_sequential,
                         prepare=bq.prepare, hessian=bq.hessian, act_amax=act_amax)
    bq.set_static_scales(act_amax or {})
    if plan.quantizer == "qat":
        from lowbit.algorithms.qat import qat_finetune
        act_scales = {n: e["act_scale"] for n, e in bq.extras.items() if "act_scale" in e}
        qts, info["qat"] = qat_finetune(model, teacher, qts, calib, bq.latent, mopts.qat, act_scales, progress=progress)
        del teacher
    install(model, qts, bq.extras)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and isinstance(out_emb, QuantLinear) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the input embedding stays a float table; the head is now its own tensor
    round_float_parts(model, float_dtype)
    seconds = time.time() - t0
    if plan.outlier_split:
        info["outlier_split"] = bq.outlier_info(qts)
    info.update({"recipe": recipe.to_dict(), "bytes": model_bytes(model, float_dtype),
                 "calibration": None if calib is None else {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])}})
    return QuantizeResult(model, qts, seconds, info)
