"""Every fast path is held to the reference path (dequantize, then matmul)."""
import os

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.core.layer import QuantizedLayer
from lowbit.runtime.kernels import KERNELS, native, select
from lowbit.runtime.qlinear import QuantLinear

NATIVE = native.available()

CASES = [
    ("int4-g64", (192, 576)), ("int4-g64-asym", (1536, 576)), ("int4-g32-asym", (576, 1536)),
    ("int4-g128", (64, 576)),        # short last group: runs as g64 with repeated scales
    ("int4-channel", (48, 576)), ("int3-g64-asym", (192, 576)), ("int3-g64", (96, 576)),
    ("int2-g64-asym", (64, 576)), ("int4-g128-asym-mse", (256, 512)), ("int8-channel", (192, 576)),
    ("int8-channel", (24, 4160)),    # wider than native.int8_gemv_max_k(): lowbit-int8's bf16 GEMV is int8pack's
    # lowbit-int4 only: rows not a multiple of its 4-row tiles, groups of 96/192, a 64-column tail
    ("int4-g96", (36, 576)), ("int4-g192-asym", (30, 576)), ("int4-channel", (6, 576)), ("int4-g32", (5, 704)),
    # the avx512 layout's 512-column blocks with one group across a block, and two
    ("int4-channel", (8, 512)), ("int4-g256-asym", (40, 1536)),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


NATIVE_ONLY = CASES[11:]


@pytest.mark.parametrize("name,shape", CASES)
def test_every_case_has_a_fast_path(name, shape):
    if not NATIVE and (name, shape) in NATIVE_ONLY:
        pytest.skip("only lowbit's own kernel takes this layout")
    qt = quantize_tensor(torch.randn(shape), name)
    assert any(select(qt, dt, torch.device("cpu")) for dt in DTYPES), f"{name} has no fast path"


def _supported():
    """(kernel, scheme, shape, dtype, isa) for every combination some kernel takes; lowbit's own
    kernels once per build (isa), PyTorch's with isa None."""
    out = []
    for name, shape in CASES:
        qt = quantize_tensor(torch.zeros(shape), name)
        for k in KERNELS:
            for dt in DTYPES:
                if k.supports(qt, dt, torch.device("cpu")):
                    for isa in list(native.BUILDS) if k.name.startswith("lowbit-") else [None]:
                        out.append(pytest.param(k, name, shape, dt, isa, id=f"{k.name}-{name}-{shape[0]}x{shape[1]}-"
                                                f"{str(dt)[6:]}" + (f"-{isa}" if isa else "")))
    return out


def test_native_kernels_build_for_every_isa_the_cpu_runs(native_isa):
    # CI runs on an AVX-512 host: a broken build must fail here (the fixture), not silently fall back
    assert native.available() and native.module() is native.build(native_isa)


def test_dispatch_takes_the_best_build_the_cpu_runs(monkeypatch):
    if os.environ.get("LOWBIT_NATIVE_KERNELS") == "0":
        pytest.skip("LOWBIT_NATIVE_KERNELS=0")
    best = next((i for i in native.BUILDS if native.runs(i)), None)
    monkeypatch.delenv("LOWBIT_ISA", raising=False)
    native.isa.cache_clear()
    try:
        assert native.isa() == best
        monkeypatch.setenv("LOWBIT_ISA", "avx2")
        native.isa.cache_clear()
        assert native.isa() == ("avx2" if native.runs("avx2") else None)
        monkeypatch.setenv("LOWBIT_ISA", "sse2")
        native.isa.cache_clear()
        with pytest.raises(ValueError, match="LOWBIT_ISA"):
            native.isa()
    finally:
        monkeypatch.undo()
        native.isa.cache_clear()


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_one(tmp_path):
    # torch waits forever on the `lock` file a killed compile leaves in its build folder
    build = tmp_path / "lowbit_cpu"
    build.mkdir()
    (build / "lock").touch()
    with native._build_lock(build):
        assert not (build / "lock").exists()


@pytest.mark.parametrize("kernel,name,shape,dtype,native_isa", _supported(), indirect=["native_isa"])
def test_kernel_matches_reference(kernel, name, shape, dtype, native_isa):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    qt = quantize_tensor(w, name)
    st = kernel.prepare(qt, dtype)
    for m in (1, 2, 7, 17, 40):  # lowbit-int4: GEMV up to 16 rows, dequantized blocks + bf16 GEMM beyond
        x = torch.randn(m, shape[1])
        ref = x.double() @ qt.dequantize().double().t()
        y = kernel.run(x.to(dtype), st).double()
        # the kernel computes in `dtype`: allow that dtype's rounding of x, scales and sums, nothing more
        eps = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
        scale = x.abs().double() @ qt.dequantize().abs().double().t()
        assert ((y - ref).abs() <= eps * scale + 1e-6).all(), (name, dtype, m, float((y - ref).abs().max()))


@pytest.mark.parametrize("native_isa", list(native.BUILDS), indirect=True)
@pytest.mark.parametrize("name", ["int8-channel", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("n,k", [(64, 576), (7, 8192)])  # int8 at 8192: two rows at a time, an odd one left
def test_gemv_stays_exact_on_activations_with_a_large_mean(name, n, k, native_isa):
    # the avx512 kernels multiply codes plus offsets (int4: 128 + q; int8: 128 + low nibble and
    # 2048 + 16 * high nibble) and take the offsets times sum(x) off again (int4 symmetric: from
    # each group's chain, int8: every 512 columns); on activations with a large common mean that
    # cancellation must stay within a bf16 ulp of the result itself, not of sum |x| |w| (left
    # to the end of an 8192-column int8 row it cost up to 2%)
    torch.manual_seed(1)
    qt = quantize_tensor(torch.randn(n, k) * 0.05, name)
    x = (30 + torch.randn(3, k)).bfloat16()
    ref = x.double() @ qt.dequantize().double().t()
    if name == "int8-channel":  # lowbit's own GEMV, as the decode step runs it at any width (past
        # int8_gemv_max_k() columns QuantLinear's int8_run hands bf16 activations to int8pack)
        st = native.int8_prepare(qt, torch.bfloat16)
        y, rel = native.module().int8_mm(x, st["w"], st["scale"], False).double(), 2 ** -8
    else:
        kernel = select(qt, torch.bfloat16, torch.device("cpu"))
        assert kernel.name == "lowbit-int4"
        y, rel = kernel.run(x, kernel.prepare(qt, torch.bfloat16)).double(), 2 ** -7
    assert ((y - ref).abs() <= rel * ref.abs() + 1e-3).all(), float(((y - ref).abs() / ref.abs()).max())


def round_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's activation rounding, which LOWBIT_GEMV_ACT=int8 asks of the GEMVs: int8 in
    blocks of 32 columns, scale amax / 127, to nearest even; returns x_hat (fp32)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True).double()
    # IEEE fp32 quotients, as the kernel's: torch divides a tensor by a scalar through its reciprocal,
    # which moves x * inv off a .5 tie now and then
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)).float()
    return (torch.round(xb * inv) * (amax / 127.0).float()).reshape(x.shape)


def _check_int8_activations(name, shape, rows, monkeypatch):
    # integer products are exact, so all that may differ from dequant(W) @ x_hat is fp32 summation
    # and the one bf16 rounding of the output; x_hat is at most amax/254 from x per element
    monkeypatch.setattr(native, "isa", lambda: "avx512")
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(shape) * 0.05, name)
    kernel = select(qt, torch.bfloat16, torch.device("cpu"))
    assert kernel.name == ("lowbit-int8" if name.startswith("int8") else "lowbit-int4")
    st = kernel.prepare(qt, torch.bfloat16)
    w = qt.dequantize().double()
    for m in rows:
        x = torch.randn(m, shape[1])
        x[:, 7] *= 40  # an outlier channel: its block alone loses precision
        x = x.bfloat16()
        monkeypatch.setenv("LOWBIT_GEMV_ACT", "int8")
        y = kernel.run(x, st).double()
        monkeypatch.setenv("LOWBIT_GEMV_ACT", "bf16")
        y16 = kernel.run(x, st).double()
        xh = round_activations_int8(x).double()
        ref = xh @ w.t()
        bound = 2 ** -8 * ref.abs() + 1e-5 * (xh.abs() @ w.abs().t()) + 1e-6
        assert ((y - ref).abs() <= bound).all(), (name, m, float((y - ref).abs().max()))
        assert not torch.equal(y, y16)  # the switch reached the kernel


AVX512_ONLY = pytest.mark.skipif(not NATIVE or not native.runs("avx512"), reason="int8 activations are in the avx512 "
                                 "build (AVX512-VNNI); this CPU does not run it")


@AVX512_ONLY
@pytest.mark.parametrize("name,shape", [("int4-g32", (5, 704)), ("int4-g64-asym", (1536, 576)), ("int4-g128", (64, 512)),
                                        ("int4-g32-asym", (576, 1536)), ("int4-channel", (6, 576)),
                                        ("int4-g96", (36, 576)), ("int3-g64-asym", (192, 512)), ("q4_k", (40, 512)),
                                        ("q4_0", (40, 576)), ("q4_1", (40, 576)), ("int8-channel", (192, 576)),
                                        ("int8-channel", (70, 704)), ("int8-channel", (24, 4096)),
                                        ("int4-channel", (8, 512)), ("int4-g256-asym", (40, 1536))])
def test_int8_activation_gemv_computes_dequant_w_times_rounded_x(name, shape, monkeypatch):
    _check_int8_activations(name, shape, (1, 2, 3), monkeypatch)


@AVX512_ONLY
@pytest.mark.parametrize("name,shape", [("int4-g32", (5, 704)), ("int4-g64-asym", (100, 1536)), ("q4_0", (40, 576)),
                                        ("q4_1", (40, 576)), ("int4-g128", (64, 512)), ("int4-channel", (6, 576)),
                                        ("int4-g96", (37, 576)), ("int3-g64-asym", (192, 512)), ("q4_k", (40, 512)),
                                        ("int8-channel", (70, 704)), ("int8-channel", (24, 4096)),
                                        ("int4-channel", (8, 512)), ("int4-g256-asym", (40, 1536))])
def test_int8_activation_prefill_computes_dequant_w_times_rounded_x(name, shape, monkeypatch):
    # many rows (vnni_gemm.cpp): 32-row weight panels with a short last one (and a last half
    # past n), 6-row activation blocks and their tails, every zero-term mode, groups of 32 to a
    # row; int8 weights as unsigned codes with a zero point of 128
    _check_int8_activations(name, shape, (17, 40, 129), monkeypatch)


def test_a_build_without_int8_activations_refuses_them(native_isa):
    # the avx2 build has no int8-activation GEMVs: asking for one is an error, not a quiet bf16 run
    torch.manual_seed(0)
    x, mod = torch.randn(1, 128).bfloat16(), native.module()
    st4, st8 = (select(qt, torch.bfloat16, torch.device("cpu")).prepare(qt, torch.bfloat16)
                for qt in (quantize_tensor(torch.randn(8, 128), n) for n in ("int4-g32", "int8-channel")))
    calls = [lambda: mod.int4_mm(x, st4["codes"], st4["scale"], st4["zero"], st4["n"], st4["group"], st4["mode"],
                                 st4["zconst"], True),
             lambda: mod.int8_mm(x, st8["w"], st8["scale"], True)]
    for call in calls:
        if native_isa == "avx512":
            assert call().shape == (1, 8)
        else:
            with pytest.raises(RuntimeError, match="no int8-activation GEMV"):
                call()


def test_gemv_activation_setting_is_checked(monkeypatch):
    monkeypatch.setenv("LOWBIT_GEMV_ACT", "int4")
    with pytest.raises(ValueError, match="LOWBIT_GEMV_ACT"):
        native.gemv_act_int8()
    monkeypatch.setenv("LOWBIT_GEMV_ACT", "int8")
    monkeypatch.setattr(native, "isa", lambda: "avx2")
    native._warn_no_int8_gemv.cache_clear()
    with pytest.warns(UserWarning, match="avx512 build"):
        assert native.gemv_act_int8() is False


PREFILL_CASES = [("int4-g64", (192, 576)), ("int4-g32-asym", (1000, 576)), ("int4-g64-asym", (100, 1536)),
                 ("int4-g32", (5, 704)), ("int4-g96", (37, 576)), ("int8-channel", (1000, 576)),
                 ("int4-g256-asym", (40, 1536))]


def _prefill_check(name, shape, rows=(17, 40, 128)):
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(shape) * 0.05, name)
    kernel = select(qt, torch.bfloat16, torch.device("cpu"))
    st = kernel.prepare(qt, torch.bfloat16)
    w = qt.dequantize().bfloat16().double()  # the reference rounds W to bf16, then sums exactly
    for m in rows:
        x = torch.randn(m, shape[1]).bfloat16()
        ref = x.double() @ w.t()
        y = kernel.run(x, st).double()
        # fp32 sums of exact bf16 products, one bf16 rounding of the output
        bound = 2 ** -8 * ref.abs() + 1e-5 * (x.abs().double() @ w.abs().t()) + 1e-6
        assert ((y - ref).abs() <= bound).all(), (name, m, float((y - ref).abs().max()))


@pytest.mark.skipif(not NATIVE or not native.amx(), reason="CPU without AMX-BF16 (or not granted): prefill "
                    "takes the paths tested below")
@pytest.mark.parametrize("name,shape", PREFILL_CASES)
def test_amx_prefill_matches_reference(name, shape):
    # rows past 16 run on AMX tiles: 32-row weight blocks with a short last one, 16-row activation blocks
    _prefill_check(name, shape)


@pytest.mark.parametrize("name,shape", PREFILL_CASES)
def test_prefill_without_amx_matches_reference(name, shape, native_isa, monkeypatch):
    # the paths of CPUs without AMX. avx512 build: the AVX512-BF16 GEMM (32-row weight blocks, a
    # short last one, 12-row activation blocks and their tails); avx2 build: bf16 blocks of W into
    # one reused buffer and PyTorch's GEMM, small blocks here so that a weight takes several
    monkeypatch.setattr(native, "amx", lambda: False)
    monkeypatch.setattr(native, "PREFILL_BLOCK", 64 * 1024)
    _prefill_check(name, shape, rows=(17, 40, 129))


@pytest.mark.parametrize("name,k", [("int4-g64-asym", 2560), ("int8-channel", 2048)])
def test_prefill_without_amx_splits_long_rows(name, k, native_isa, monkeypatch):
    # 300 rows: the AVX512-BF16 GEMM sums k in passes through its fp32 accumulators (2560
    # columns: 864, 864, 832; 2048: 1024, 1024)
    monkeypatch.setattr(native, "amx", lambda: False)
    assert select(quantize_tensor(torch.randn(8, k), name), torch.bfloat16, torch.device("cpu")).name.startswith("lowbit")
    _prefill_check(name, (40, k), rows=(300,))


@pytest.mark.parametrize("native_isa", list(native.BUILDS), indirect=True)
@pytest.mark.parametrize("name,shape", [("int4-g32", (4096, 1024)), ("int8-channel", (2048, 1024))])
def test_weights_of_2_mib_and_up_are_kept_on_2_mib_aligned_copies(name, shape, native_isa):
    # what a GEMV streams every token goes on memory advised for huge pages (csrc/ops.cpp
    # huge_page_copy): aligned to 2 MiB, the same bytes, and the kernels read it as before
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(shape) * 0.05, name)
    kernel = select(qt, torch.bfloat16, torch.device("cpu"))
    st = kernel.prepare(qt, torch.bfloat16)
    w = st["codes" if name.startswith("int4") else "w"]
    assert w.nbytes >= 2 << 20 and w.data_ptr() % (2 << 20) == 0
    if name.startswith("int4"):
        assert torch.equal(w, native.pack_int4(qt.unpacked_codes(), native.module().int4_blocks(shape[1], 32)))
    small = torch.arange(64, dtype=torch.uint8)
    assert native.on_huge_pages(small).data_ptr() == small.data_ptr()  # under 2 MiB: as it was
    x = torch.randn(3, shape[1])
    ref = x.double() @ qt.dequantize().double().t()
    y = kernel.run(x.bfloat16(), st).double()
    assert ((y - ref).abs() <= 2e-2 * (x.abs().double() @ qt.dequantize().abs().double().t()) + 1e-6).all()


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
    m = QuantLinear(QuantizedLayer(qt))
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    assert torch.equal(m(x), m.forward_reference(x))
    assert m.kernel_name == "reference"


def test_quantlinear_dispatch_and_bias():
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(192, 576), "int4-g64-asym")
    bias = torch.randn(192)
    m = QuantLinear(QuantizedLayer(qt), bias)
    assert m.kernel_name == ("lowbit-int4" if NATIVE else "int4pack")
    x = torch.randn(2, 5, 576)
    torch.testing.assert_close(m(x), m.forward_reference(x))  # fp32: the reference path itself
    yb = m(x.bfloat16()).double()
    ref = m.forward_reference(x).double()
    bound = 2e-2 * (x.abs().double() @ qt.dequantize().abs().double().t() + bias.abs().double())
    assert ((yb - ref).abs() <= bound).all()


def test_model_dtype_cast_leaves_scales_alone():
    qt = quantize_tensor(torch.randn(64, 576), "int4-g64")
    m = QuantLinear(QuantizedLayer(qt)).to(torch.bfloat16)
    assert m.qweight.scale.dtype == torch.float16 and torch.equal(m.qweight.scale, qt.scale)
