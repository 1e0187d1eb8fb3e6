"""QuantLinear modules in place of nn.Linear.

The reference path dequantizes the weight where it is used and multiplies in the
activation dtype. Faster kernels are dispatch choices made here, held to this path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.layer import QuantizedLayer
from lowbit.core.qparams import quantize_activations
from lowbit.core.tensor import QuantizedTensor
from lowbit.core.transforms import apply_input_transform


class QuantLinear(nn.Module):
    """A Linear that runs a QuantizedLayer: its weight codes ([out_features, in_features])
    and the extras a method added.

    When the scheme quantizes activations (W8A8, W4A4, FP8), the input is rounded onto
    the activation grid before the multiply: per token from its own absmax (dynamic) or
    with `act_scale`, calibrated once (static). An input transform (QuaRot's online
    Hadamard) rotates the input first; float-kept input channels (LLM.int8-style split)
    skip activation rounding and multiply `float_weight` instead.
    """

    # "auto": a packed kernel for bf16/fp16 activations (the deployment dtypes), the reference
    # path for fp32 (exact numerics, used when measuring quality); "reference": always the reference
    policy = "auto"

    def __init__(self, layer: QuantizedLayer, bias: torch.Tensor | None = None):
        super().__init__()
        qweight = layer.weight
        self.out_features, self.in_features = qweight.shape
        self.scheme = qweight.scheme
        # buffers, so .to(device) and state_dict() carry the packed data itself. Scales are
        # kept as their integer bit pattern: model.to(torch.bfloat16) must not re-round them.
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scale", _scale_bits(qweight.scale))
        zp = qweight.zero_point
        self.register_buffer("zero_point", _scale_bits(zp) if zp is not None and self.scheme.float_zero else zp)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        act_scale, acts = layer.act_scale, self.scheme.activations
        if acts is not None and not acts.dynamic and act_scale is None:
            raise ValueError(f"static activation scheme {acts.name} needs a calibrated act_scale")
        self.register_buffer("act_scale", act_scale.reshape(1).float().clone() if act_scale is not None else None)
        self.input_transform = layer.input_transform
        fc, fw = layer.float_cols, layer.float_weight
        self.register_buffer("float_cols", fc.long().clone() if fc is not None else None)
        self.register_buffer("float_weight", fw.detach().clone() if fw is not None else None)
        self.plain = layer.weight_only  # the case packed weight-only kernels serve

    @property
    def layer(self) -> QuantizedLayer:
        return QuantizedLayer(self.qweight, self.act_scale, self.input_transform, self.float_cols, self.float_weight)

    @property
    def qweight(self) -> QuantizedTensor:
        scale = self.scale.view(self.scheme.scale_storage_dtype)
        zp = self.zero_point
        if zp is not None and self.scheme.float_zero:
            zp = zp.view(self.scheme.scale_storage_dtype)
        return QuantizedTensor(self.codes, scale, zp, (self.out_features, self.in_features), self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.policy != "auto":
            return self.forward_reference(x)
        # decode calls this ~200 times per token: the last (dtype, device) -> kernel is kept at hand
        fast = self.__dict__.get("_fast")
        if fast is None or fast[0] != (x.dtype, x.device):
            fast = self._pick(x.dtype, x.device)
        if fast[1] is None:
            return self.forward_reference(x)
        y = fast[1].run(x, fast[2])
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def _pick(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """((dtype, device), kernel or None, its state): packed kernels serve plain weight-only
        layers with bf16/fp16 activations; fp32 (quality measurement) stays on the reference."""
        self.__dict__["_fast"] = fast = ((dtype, device), *self.packed_kernel(dtype, device))
        return fast

    def packed_kernel(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(kernel, its prepared weights) that forward uses for this activation dtype and device,
        or (None, None) where it takes the reference path."""
        if self.policy == "auto" and self.plain and dtype in (torch.bfloat16, torch.float16):
            return self._kernel_state(dtype, device)
        return None, None

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize the whole weight, then multiply: the numerics every kernel is held to."""
        x = apply_input_transform(x, self.input_transform)
        x_float = None
        if self.float_cols is not None:
            x_float = x.index_select(-1, self.float_cols)
            x = x.index_fill(-1, self.float_cols, 0.0)  # outliers leave the quantized path (and its scales)
        if self.scheme.activations is not None:
            x = quantize_activations(x, self.scheme.activations, self.act_scale)
        w = self.qweight.dequantize(x.dtype)
        y = F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)
        if x_float is not None:
            y = y + F.linear(x_float, self.float_weight.to(x.dtype))
        return y

    def _kernel_state(self, dtype: torch.dtype, device: torch.device):
        """(kernel, its prepared weights) for this activation dtype/device, converted once."""
        from lowbit.runtime.kernels import select

        cache = self.__dict__.setdefault("_kernels", {})
        key = (dtype, device)
        if key not in cache:
            qt = self.qweight
            k = select(qt, dtype, device)
            cache[key] = (k, k.prepare(qt, dtype) if k is not None else None)
        return cache[key]

    @property
    def kernel_name(self) -> str:
        """The path a bf16 forward on this device takes (for reports)."""
        k, _ = self._kernel_state(torch.bfloat16, self.codes.device)
        return k.name if k is not None else "reference"

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.layer.extras_meta().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}{extra}"


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _scale_bits(scale: torch.Tensor) -> torch.Tensor:
    return scale.view(_BITS[scale.dtype]) if scale.is_floating_point() else scale


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def dequantized(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy whose QuantLinears are nn.Linears holding the dequantized weights: the same
    function as the reference path, without unpacking codes on every call (for fp32
    greedy decoding in probes, where the reference path's per-call dequantize dominates)."""
    import copy

    out = copy.deepcopy(model)
    for name, q in quantized_modules(out).items():
        if not q.plain:  # activation rounding / transforms happen per call: keep the module
            continue
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype)
        lin.weight.data = q.qweight.dequantize(dtype)
        if q.bias is not None:
            lin.bias.data = q.bias.detach().to(dtype)
        replace_module(out, name, lin)
    return out


def install(model: nn.Module, layers: dict[str, QuantizedLayer]) -> nn.Module:
    """Swap each named Linear (or GPT-2 Conv1D) for a QuantLinear running its QuantizedLayer."""
    for name, layer in layers.items():
        bias = getattr(model.get_submodule(name), "bias", None)
        replace_module(model, name, QuantLinear(layer, bias.float() if bias is not None else None))
    return model


# ---- persistence --------------------------------------------------------------

QUANT_BUFFERS = ("codes", "scale", "zero_point")  # stored through QuantizedTensor.tensors(); the extras as float parts


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but QuantLinear packed buffers (biases included), tied tensors stored once."""
    skip = {f"{n}.{b}" for n in quantized_modules(model) for b in QUANT_BUFFERS}
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:  # tied (e.g. lm_head = embed_tokens): keep one copy
            continue
        seen[key] = name
        out[name] = t
    return out


def round_float_parts(model: nn.Module, float_dtype: torch.dtype) -> None:
    """Round float parts (embeddings, norms, biases) to the dtype they will be stored in,
    so the model in memory computes exactly what a reload of the saved one computes."""
    for t in float_state(model).values():
        if t.is_floating_point():
            t.data.copy_(t.data.to(float_dtype).to(t.dtype))


def model_bytes(model: nn.Module, float_dtype: torch.dtype | None = None) -> dict:
    """Bytes a saved model holds: quantized tensors (codes+scales+zeros) and float parts."""
    q = sum(m.qweight.nbytes for m in quantized_modules(model).values())
    f = sum(t.numel() * (float_dtype.itemsize if float_dtype and t.is_floating_point() else t.element_size())
            for t in float_state(model).values())
    return {"quantized_bytes": q, "float_bytes": f, "total_bytes": q + f}

