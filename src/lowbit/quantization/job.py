"""The one quantize job: source -> recipe -> calibration -> blocks -> sink.

Every caller (the CLI, lowbit.quantize(), compare, analyze, bench) runs `run()`. A run
either holds the whole float model in memory (rotation and QAT need it; so does a model
object handed in) or streams it: the model is a skeleton on the meta device, each block
is filled from the checkpoint's shards, quantized, written to the work folder and
dropped (quantization.stream). Both go through the same runner, the same per-Linear
quantizer, the same handling of Linears outside the blocks, the same byte tally and the
same lowbit.json writer; they differ only in where blocks come from and where they go.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.rtn import rtn
from lowbit.core.layer import QuantizedLayer
from lowbit.core.method import Method
from lowbit.core.qparams import choose_qparams, qparams_from_range
from lowbit.core.scheme import Recipe, Scheme, fitting
from lowbit.core.tensor import QuantizedTensor, quantize_tensor
from lowbit.errors import UserError
from lowbit.io.files import check_output, output_lock
from lowbit.io.text import check_text_source, text_windows
from lowbit.models.adapters import attention_heads, check_context, decoder_layers, is_linear, linear_weight
from lowbit.models.disk_names import disk_names
from lowbit.models.load import load_float
from lowbit.models.moe import RoutedExperts, is_moe_config, unfuse_experts
from lowbit.quantization.runner import Blocks, RunOptions, dist_rank_world, run_sequential
from lowbit.runtime.qlinear import QuantLinear, install, quantized_modules, round_float_parts


@dataclass
class GPTQOptions:
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    true_sequential: bool = False  # each stage of a block sees the stages before it quantized (measured: no gain here)
    weighted_mse: bool = True  # MSE scale search weighs columns by the Hessian diagonal


@dataclass
class Calibration:
    """Where calibration windows come from (used only when the method or scheme needs them)."""
    text: str = "wiki"
    text_field: str = "text"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8


class QuantizeResult:
    """A finished job: .info (recipe, bytes; what lowbit.json holds), .seconds, .out, and the
    quantized .model / .tokenizer (a streamed run reads them back from .out on first use)."""

    def __init__(self, info: dict, seconds: float, out: Path | None, model: nn.Module | None = None, tokenizer=None):
        self.info, self.seconds, self.out = info, seconds, out
        self._model, self._tokenizer = model, tokenizer

    def _load(self) -> None:
        if self._model is None:
            from lowbit.io.lowbit_dir import load_quantized

            self._model, self._tokenizer, _ = load_quantized(self.out)

    @property
    def model(self) -> nn.Module:
        self._load()
        return self._model

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    @property
    def layers(self) -> dict[str, QuantizedLayer]:
        return {n: m.layer for n, m in quantized_modules(self.model).items()}


def target_modules(model: nn.Module, recipe: Recipe) -> dict[str, Scheme]:
    """Linear modules the recipe quantizes, with their schemes."""
    out = {}
    for name, mod in model.named_modules():
        if name and is_linear(mod):
            s = recipe.scheme_for(name)
            if s is not None:
                cols = linear_weight(mod).shape[1]
                if s.group_size and s.group_size > cols:  # every row would be padded to the group: memory for nothing
                    raise UserError(f"{name} has {cols} input columns, fewer than {s.name}'s group size {s.group_size}; "
                                    f"use a group size <= {cols}")
                out[name] = fitting(s, cols)
    if not out:
        raise UserError("the recipe selects no Linear modules (check --include/--exclude patterns)")
    return out


def check_coverage(model: nn.Module, recipe: Recipe, targets: dict[str, Scheme]) -> float:
    """The fraction of weight-matrix parameters (embedding tables aside) the recipe quantizes.

    A weight of two or more dimensions that is not one of the `targets` Linears but sits in
    a module the recipe would quantize is an error naming it (say, the fused 3-D experts of
    a mixture-of-experts block): it would stay float with nobody having asked for that."""
    quantized = total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            continue  # a lookup table, not a matmul; float unless lowbit's head untying says otherwise
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() < 2:
                continue  # norms, biases
            total += p.numel()
            if name in targets:
                quantized += p.numel()
            elif recipe.scheme_for(name) is not None:
                raise UserError(f"{name}.{pname} ({type(mod).__name__}, shape {list(p.shape)}) is a weight lowbit cannot "
                                f"quantize yet and would stay float; exclude it on purpose (--exclude '{name}' or a pattern "
                                f"such as '*.{name.rsplit('.', 1)[-1]}')")
    return quantized / max(total, 1)


@dataclass
class MethodOptions:
    smoothquant_alpha: float = 0.5  # SmoothQuant's migration strength
    outlier_threshold: float = 6.0  # LLM.int8(): input channels whose |x| reaches this stay in float
    rotation_seed: int = 0
    qat: "object | None" = None  # QATOptions; defaults when None
    imatrix: str | None = None  # read: llama.cpp importance matrix weighting RTN's scale search
    imatrix_out: str | None = None  # write: the calibration's sum x^2 per input channel, as an imatrix
    # MoE calibration statistics: "all-tokens" (every expert sees every calibration token) or "routed" (only
    # the tokens its router sends, down_proj's inputs weighted by the router). all-tokens gave the lower held-out
    # per-expert output error and KL in tests/test_moe.py's measurement, so it is the default
    expert_calibration: str = "all-tokens"


def static_act_scale(amax: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """One per-tensor scale that covers the calibrated range, rounded as stored."""
    a = amax.max().reshape(1, 1)
    return qparams_from_range(-a, a, scheme)[0].reshape(1)


class BlockQuantizer:
    """The per-Linear work of a method: the smoothing `prepare`, the quantize function the
    runner calls (a QuantizedLayer per Linear, with the extras the method adds) and the
    static activation scales set once a block's quantized outputs are known."""

    def __init__(self, plan: Method, targets: dict[str, Scheme], heads: tuple[int, int, int] | None,
                 gptq_options: GPTQOptions, method_options: MethodOptions, float_dtype: torch.dtype):
        self.plan, self.targets, self.opts, self.mopts = plan, targets, gptq_options, method_options
        self.float_dtype = float_dtype
        self.latent: dict[str, torch.Tensor] = {}  # QAT's float starting points
        self.expert_tokens: dict[str, int] = {}  # MoE: calibration tokens routed to each expert
        self.importance: dict[str, torch.Tensor] = {}  # an imatrix's mean x^2 per input channel
        self.sqsums: dict[str, tuple[torch.Tensor, int]] = {}  # (sum x^2, tokens): an imatrix to write
        self.info: dict = {}
        self.prepare = None
        if plan.smooth:
            from lowbit.algorithms.smooth import make_prepare
            self.prepare, self.info[plan.smooth] = make_prepare(plan.smooth, targets, heads, method_options.smoothquant_alpha)
        self.static_acts = any(s.activations is not None and not s.activations.dynamic for s in targets.values())
        self.hessian = plan.quantizer == "gptq" or plan.smooth == "awq"

    def __call__(self, name: str, w: torch.Tensor, st, input_transform: str | None = None) -> QuantizedLayer:
        if st is not None and ".experts." in name and name.endswith(".gate_proj"):
            self.expert_tokens[name.rsplit(".", 1)[0]] = st.routed  # what the router sent it
        H = st.H if st is not None else None
        if st is not None:
            self.sqsums[name] = (st.sqsum, st.n)
        float_cols = float_weight = None
        if self.plan.outlier_split and st is not None:
            cols = torch.nonzero(st.amax >= self.mopts.outlier_threshold).flatten()
            if cols.numel():
                float_cols, float_weight = cols, w[:, cols].detach().to(self.float_dtype)
                w = w.detach().clone()
                w[:, cols] = 0  # those inputs multiply the float copy; nothing left to round
                if H is not None:
                    H = H.clone()
                    H[cols, :] = 0
                    H[:, cols] = 0
        if self.plan.quantizer == "qat":
            self.latent[name] = w.detach().clone()  # the float (folded) weight training starts from
        return QuantizedLayer(self._codes(name, w, H), input_transform=input_transform,
                              float_cols=float_cols, float_weight=float_weight)

    def _codes(self, name: str, w: torch.Tensor, H: torch.Tensor | None) -> QuantizedTensor:
        plan, scheme, opts = self.plan, self.targets[name], self.opts
        if H is None and name in self.importance:  # llama.cpp's way with an imatrix: weighted scale search
            scale, zero_point = choose_qparams(w, scheme, importance=self.importance[name])
            return quantize_tensor(w, scheme, scale=scale, zero_point=zero_point, name=name)
        if H is None:
            return rtn(w, scheme, name)
        if plan.quantizer == "gptq":
            return gptq(w, H, scheme, blocksize=opts.blocksize, percdamp=opts.percdamp,
                        act_order=opts.act_order, weighted_mse=opts.weighted_mse, name=name)
        if plan.smooth == "awq" and scheme.granularity != "tensor":
            scale, zero_point = choose_qparams(w, scheme, hessian=H)
            return quantize_tensor(w, scheme, scale=scale, zero_point=zero_point, name=name)
        return rtn(w, scheme, name)

    def set_static_scales(self, layers: dict[str, QuantizedLayer], act_amax: dict[str, torch.Tensor]) -> None:
        """Per-tensor activation scales from the calibrated ranges (outlier columns excluded)."""
        for name, amax in act_amax.items():
            acts = self.targets[name].activations
            if acts is not None and not acts.dynamic:
                a = amax.clone()
                if layers[name].float_cols is not None:
                    a[layers[name].float_cols] = 0
                layers[name].act_scale = static_act_scale(a, acts)


def check_rotation_targets(model: nn.Module, targets: dict) -> None:
    left = [n for n, m in model.named_modules() if getattr(m, "input_transform", None) and n not in targets]
    if left:
        raise UserError(f"rotate moves an online Hadamard into {left[0]}; the recipe must quantize it (it excludes {len(left)} such layers)")


@dataclass
class QuantizeJob:
    recipe: Recipe
    calibration: Calibration = field(default_factory=Calibration)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    float_dtype: torch.dtype = torch.float16
    progress: bool = True
    extra_info: dict = field(default_factory=dict)
    trust_remote_code: bool = False

    @property
    def plan(self) -> Method:
        return Method.parse(self.recipe.method)

    @property
    def calibrated(self) -> bool:
        return self.plan.needs_calibration(self.recipe.scheme)

    @property
    def streamable(self) -> bool:
        return not self.plan.rotate and self.plan.quantizer != "qat"


STREAMABLE = "rtn, gptq, awq, smoothquant, outlier-split and their compositions"


def run(job: QuantizeJob, source: str | nn.Module, out: str | os.PathLike | None = None, *, stream: bool | None = None,
        tokenizer=None, calib_ids: torch.Tensor | None = None, dry_run: bool = False) -> QuantizeResult | None:
    """Run `job` on `source` (a model source name/path, or a float model already in memory with
    its `tokenizer`); write the result to `out` if given.

    `stream`: None streams whenever it can (an `out`, a checkpoint directory or the embedded
    model, a method that works block by block); False holds the model in memory; True
    insists. `calib_ids` replaces the calibration text (windows already tokenized).
    With `dry_run` (streamed runs) the pre-flight prediction is printed and nothing else
    happens (None). Under torch.distributed only process 0 gets a result."""
    from lowbit.models.load import resolve_source

    plan = job.plan
    check_method_options(job)
    if job.calibrated and calib_ids is None:
        check_text_source(job.calibration.text)
    kind, path = (None, None) if isinstance(source, nn.Module) else resolve_source(source)
    fused = _experts_fused_on_disk(path, job.trust_remote_code) if kind == "hf" else None
    can_stream = job.streamable and kind in ("hf", "embedded") and out is not None and fused is None
    if stream and not can_stream:
        raise UserError(f"{plan.name} needs the whole model in memory; streaming runs {STREAMABLE}" if not job.streamable
                        else "streaming writes to an output directory; give one" if out is None
                        else f"{source}: {fused} holds several experts in one tensor; such checkpoints quantize in memory "
                             "for now (drop stream=True)" if fused
                        else f"{source}: streaming reads safetensors checkpoint directories; this is a {kind} source")
    stream = can_stream if stream is None else stream
    if dry_run and not stream:
        raise UserError("--dry-run predicts streamed runs; this one loads the whole model (rotate, qat, --in-memory or a GGUF source)")
    if out is None:
        return _run(job, source, None, stream, tokenizer, calib_ids, dry_run)
    out = check_output(out, sources=[path] if kind not in (None, "embedded") else [])  # before hours of work, not after
    # one run per output (and work folder) at a time; under torch.distributed, process 0 holds it for all
    with output_lock(out) if dist_rank_world()[0] == 0 else contextlib.nullcontext():
        return _run(job, source, out, stream, tokenizer, calib_ids, dry_run)


def _experts_fused_on_disk(path: Path, trust_remote_code: bool) -> str | None:
    """A checkpoint tensor holding several experts at once (gpt-oss stores them fused): streaming
    fills one expert Linear from one tensor, so such a checkpoint is loaded whole."""
    from transformers import AutoConfig

    try:
        if not is_moe_config(json.loads((path / "config.json").read_text())):
            return None
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        return next(iter(disk_names(config).fused_on_disk), None)
    except Exception:  # noqa: BLE001 - loading the checkpoint says what is wrong with it
        return None


def _run(job: QuantizeJob, source, out: Path | None, stream: bool, tokenizer, calib_ids, dry_run: bool):
    plan, t0 = job.plan, time.time()
    torch.manual_seed(job.calibration.seed)
    if stream:
        from lowbit.quantization.stream import CheckpointSource

        src = CheckpointSource(source, job)
    else:
        src = MemorySource(source, tokenizer, job)
    model = src.model
    info: dict = {"method": plan.name}
    if plan.rotate:
        from lowbit.algorithms.rotate import rotate_model
        info["rotation"] = rotate_model(model, seed=job.method.rotation_seed)
    targets = target_modules(model, job.recipe)
    info["quantized_weight_fraction"] = check_coverage(model, job.recipe, targets)
    if plan.rotate:
        check_rotation_targets(model, targets)
    bq = BlockQuantizer(plan, targets, attention_heads(model) if plan.smooth else None, job.gptq, job.method, job.float_dtype)
    info.update(bq.info)
    if job.method.imatrix:
        from lowbit.io.interop.imatrix import read_imatrix

        bq.importance = read_imatrix(job.method.imatrix, model.config, {n: linear_weight(model.get_submodule(n)).shape[1]
                                                                         for n in targets})
        info["imatrix"] = {"file": str(job.method.imatrix), "entries": len(bq.importance), "targets": len(targets)}
    if job.method.imatrix_out:  # every layer needs a GGUF name: known now, not after hours of work
        from lowbit.io.interop.imatrix import check_names

        check_names(model.config, targets)
    calib = None
    if job.calibrated:
        if calib_ids is None:
            check_context(model.config, job.calibration.seq_len, "--seq-len")
        calib = calib_ids if calib_ids is not None else calibration_windows(src.tokenizer, job.calibration)
        check_ids_fit(calib, model, src.name)
    blocks = src.blocks(bq, calib, out, dry_run)
    if blocks is None:  # a dry run: the prediction is printed
        return None
    teacher = copy.deepcopy(model).eval() if plan.quantizer == "qat" else None  # the float model QAT distils from
    # weak: a streamed run drops each block once written, and a list here would keep every block's experts
    moe_blocks = weakref.WeakSet(m for m in model.modules() if isinstance(m, RoutedExperts))
    for m in moe_blocks:
        m.calibrate_all_tokens = job.method.expert_calibration == "all-tokens"
    try:
        layers = run_sequential(model, bq, calib, RunOptions(job.calibration.batch_size, job.progress,
                                f"{plan.name} {job.recipe.scheme.name}", job.gptq.true_sequential), blocks)
    finally:
        for m in moe_blocks:
            m.calibrate_all_tokens = False
    if job.method.imatrix_out:
        info["imatrix_out"] = _write_imatrix(job, model, bq, targets, calib)
    if plan.quantizer == "qat":
        from lowbit.algorithms.qat import qat_finetune

        act_scales = {n: la.act_scale for n, la in layers.items() if la.act_scale is not None}
        codes, info["qat"] = qat_finetune(model, teacher, {n: la.weight for n, la in layers.items()}, calib, bq.latent,
                                          job.method.qat, act_scales, progress=job.progress)
        for n, qt in codes.items():
            layers[n].weight = qt
        del teacher
    info.update({"recipe": job.recipe.to_dict(), "source": src.name,
                 "calib": job.calibration.text if job.calibrated and calib_ids is None else None,
                 "seed": job.calibration.seed,
                 "calibration": None if calib is None else {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
                 **job.extra_info})

    def describe(payload) -> dict:
        """`info` with the figures of the finished output (what lowbit.json holds)."""
        info.update({"bytes": payload.bytes, "quantized_modules": len(payload.modules)})
        if plan.outlier_split:
            info["outlier_split"] = {"threshold": job.method.outlier_threshold,
                                     "float_input_channels": payload.float_input_channels,
                                     "float_fraction": payload.float_input_channels / max(payload.input_channels, 1)}
        return info

    experts = [n.rsplit(".", 1)[0] for n in targets if ".experts." in n and n.endswith(".gate_proj")]
    if calib is not None and experts:
        tokens = {e: bq.expert_tokens.get(e, 0) for e in experts}
        n = sorted(tokens.values())
        info["expert_tokens"] = {"per_expert": tokens, "min": n[0], "median": n[len(n) // 2], "max": n[-1],
                                 "experts_without_tokens": n.count(0), "calibration": job.method.expert_calibration}
    info.update(src.facts)
    model, tok = src.finish(layers, bq, out, describe)
    info["seconds"] = time.time() - t0
    return QuantizeResult(info, info["seconds"], out, model, tok) if dist_rank_world()[0] == 0 else None


def check_method_options(job: QuantizeJob) -> None:
    """Before any work: what --expert-calibration, --imatrix and --imatrix-out can mean for this job."""
    m = job.method
    if m.expert_calibration not in ("all-tokens", "routed"):
        raise UserError(f"expert_calibration {m.expert_calibration!r}: choose 'all-tokens' or 'routed'")
    if m.imatrix and job.calibrated:
        raise UserError(f"--imatrix weights round-to-nearest's scale search; {job.plan.name} calibrates its own statistics")
    if m.imatrix and job.recipe.scheme.scale_method != "mse":
        raise UserError(f"--imatrix weights a scale search; {job.recipe.scheme.name} takes absmax scales "
                        "(use a GGUF scheme such as q4_k, or a -mse scheme)")
    if m.imatrix_out:
        if not job.calibrated:
            raise UserError(f"--imatrix-out writes calibration statistics; {job.plan.name} collects none (use gptq or awq)")
        check_output(m.imatrix_out, file=True)


def _write_imatrix(job: QuantizeJob, model: nn.Module, bq: BlockQuantizer, targets: dict, calib) -> dict:
    from lowbit.io.interop.imatrix import write_imatrix

    missing = [n for n in targets if n not in bq.sqsums]
    if missing:
        raise UserError(f"--imatrix-out: no calibration statistics for {missing[0]} and {len(missing) - 1} more "
                        "(a resumed run does not recompute finished blocks); rerun into a fresh --out")
    n = write_imatrix(job.method.imatrix_out, model.config, {k: bq.sqsums[k] for k in targets},
                      dataset=job.calibration.text, chunks=int(calib.shape[0]), chunk_size=int(calib.shape[1]))
    return {"file": str(job.method.imatrix_out), "entries": n}


class MemorySource:
    """The whole float model in memory: its blocks are there already, finished layers are
    installed at the end, and the directory is written in one piece."""

    facts: dict = {}  # nothing to report beyond the job's own info

    def __init__(self, source: str | nn.Module, tokenizer, job: QuantizeJob):
        self.job = job
        if isinstance(source, nn.Module):
            self.model, self.tokenizer = source, tokenizer
            self.name = getattr(source.config, "name_or_path", None) or None
        else:
            self.model, self.tokenizer = load_float(source, trust_remote_code=job.trust_remote_code)
            self.name = source
        unfuse_experts(self.model)  # fused 3-D experts -> one Linear per expert projection (models.moe)

    def blocks(self, bq: BlockQuantizer, calib, out, dry_run) -> Blocks:
        return Blocks()

    def finish(self, layers: dict[str, QuantizedLayer], bq: BlockQuantizer, out: Path | None, describe):
        from lowbit.io.lowbit_dir import Payload, save_quantized

        model = self.model
        for name in outside_targets(model, bq.targets):  # Linears outside the blocks (e.g. lm_head): round to nearest
            mod = model.get_submodule(name)
            layers[name] = bq(name, linear_weight(mod), None, getattr(mod, "input_transform", None))
        install(model, layers)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, QuantLinear) and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # the input embedding stays a float table; the head is now its own tensor
        round_float_parts(model, self.job.float_dtype)
        payload = Payload.of(model, self.job.float_dtype)
        info = describe(payload)
        if out is not None:
            save_quantized(model, self.tokenizer, out, info, self.job.float_dtype, payload)
        return model, self.tokenizer


def outside_targets(model: nn.Module, targets: dict) -> list[str]:
    """Targets outside the decoder blocks: no calibration reaches them, they round to nearest."""
    prefix, _ = decoder_layers(model)
    return [n for n in targets if not n.startswith(f"{prefix}.")]


def calibration_windows(tokenizer, cal: Calibration) -> torch.Tensor:
    if tokenizer is None:
        raise UserError("this method and scheme need calibration windows: pass calib_ids, or a tokenizer with the model")
    calib, _ = text_windows(tokenizer, cal.text, cal.text_field, cal.seq_len, calib_samples=cal.samples, seed=cal.seed)
    return calib


def check_ids_fit(calib: torch.Tensor, model: nn.Module, name) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if int(calib.max()) >= rows:
        raise UserError(f"{name}: the tokenizer produces token id {int(calib.max())} but the embedding has {rows} rows; "
                        f"tokenizer and checkpoint do not belong together")
