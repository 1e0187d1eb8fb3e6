"""Every fast path is held to the reference path (dequantize, then matmul)."""
import pytest
import torch

from lowbit import quantize_tensor
from lowbit.kernels import select
from lowbit.runtime import QuantLinear

CASES = [
    ("int4-g64", (192, 576)), ("int4-g64-asym", (1536, 576)), ("int4-g32-asym", (576, 1536)),
    ("int4-g128", (64, 576)),        # short last group: runs as g64 with repeated scales
    ("int4-channel", (48, 576)), ("int3-g64-asym", (192, 576)), ("int3-g64", (96, 576)),
    ("int2-g64-asym", (64, 576)), ("int4-g128-asym-mse", (256, 512)), ("int8-channel", (192, 576)),
]


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(name, shape, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    qt = quantize_tensor(w, name)
    kernel = select(qt, dtype, torch.device("cpu"))
    assert kernel is not None, f"{name} has no fast path"
    st = kernel.prepare(qt, dtype)
    for m in (1, 7, 32):
        x = torch.randn(m, shape[1])
        ref = x.double() @ qt.dequantize().double().t()
        y = kernel.run(x.to(dtype), st).double()
        # the kernel computes in `dtype`: allow that dtype's rounding of x, scales and sums, nothing more
        eps = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
        scale = x.abs().double() @ qt.dequantize().abs().double().t()
        assert ((y - ref).abs() <= eps * scale + 1e-6).all(), (name, dtype, m, float((y - ref).abs().max()))


def test_fp32_int4_is_exact():
    torch.manual_seed(1)
    qt = quantize_tensor(torch.randn(64, 576), "int3-g64-asym")
    k = select(qt, torch.float32, torch.device("cpu"))
    x = torch.randn(4, 576)
    torch.testing.assert_close(k.run(x, k.prepare(qt, torch.float32)), x @ qt.dequantize().t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["nf4-g64", "fp4-g32", "int4-g48", "int8-channel-asym", "int5-g64"])
def test_unsupported_layouts_fall_back_to_reference(name):
    torch.manual_seed(0)
    w = torch.randn(64, 576)
    qt = quantize_tensor(w, name)
    assert select(qt, torch.bfloat16, torch.device("cpu")) is None
    m = QuantLinear(qt)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    assert torch.equal(m(x), m.forward_reference(x))
    assert m.kernel_name == "reference"


def test_quantlinear_dispatch_and_bias():
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(192, 576), "int4-g64-asym")
    bias = torch.randn(192)
    m = QuantLinear(qt, bias)
    assert m.kernel_name == "int4pack"
    x = torch.randn(2, 5, 576)
    torch.testing.assert_close(m(x), m.forward_reference(x))  # fp32: the reference path itself
    yb = m(x.bfloat16()).double()
    ref = m.forward_reference(x).double()
    bound = 2e-2 * (x.abs().double() @ qt.dequantize().abs().double().t() + bias.abs().double())
    assert ((yb - ref).abs() <= bound).all()


def test_model_dtype_cast_leaves_scales_alone():
    qt = quantize_tensor(torch.randn(64, 576), "int4-g64")
    m = QuantLinear(qt).to(torch.bfloat16)
    assert m.qweight.scale.dtype == torch.float16 and torch.equal(m.qweight.scale, qt.scale)
