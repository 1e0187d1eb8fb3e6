"""Export/import: every format checked by the other side's own reader where one runs here."""
import copy

import gguf
import numpy as np
import pytest
import torch

from lowbit.api import make_recipe, quantize
from lowbit.core.scheme import Scheme
from lowbit.core.tensor import quantize_tensor
from lowbit.errors import UserError
from lowbit.runtime.qlinear import QuantLinear, quantized_modules

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def prompt_ids(embedded):
    _, tok = embedded
    return tok("The capital of France is Paris. In 1905, Albert Einstein published", return_tensors="pt").input_ids


def _rtn(embedded, scheme):
    model = copy.deepcopy(embedded[0])
    return quantize(model, recipe=make_recipe(scheme, "rtn"), progress=False).model


def _logits(model, ids):
    QuantLinear.policy = "reference"
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        QuantLinear.policy = "auto"


# ---- GGUF blocks against the gguf package's own quantizer / dequantizer -------------------

@pytest.mark.parametrize("qtype,name", [(T.Q8_0, "q8_0"), (T.Q4_0, "q4_0"), (T.Q4_1, "q4_1"), (T.Q5_0, "q5_0"),
                                        (T.Q5_1, "q5_1")])
def test_gguf_blocks_are_read_and_written_bit_exactly(qtype, name):
    from lowbit.io.interop.gguf_blocks import blocks_from_qtensor, qtensor_from_blocks

    w = (torch.randn(48, 128) * torch.linspace(0.1, 3, 128)).numpy().astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)  # llama.cpp's layout, written by gguf itself
    qt = qtensor_from_blocks(raw, qtype.name, (48, 128))
    assert qt.scheme.name == name
    theirs = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(qt.dequantize().numpy(), theirs)
    back, t = blocks_from_qtensor(qt)
    assert t == qtype.name and np.array_equal(back, raw)
    # lowbit's own rounding of the same type (signed-range search + refit) is closer to w than llama.cpp's reference
    ours = quantize_tensor(torch.from_numpy(w), name).dequantize().numpy()
    assert np.linalg.norm(ours - w) < np.linalg.norm(theirs - w)


GGUF_TYPES = ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl", "q6_k", "q5_k", "q4_k", "iq4_xs", "q3_k", "q2_k"]


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_lowbit_quantized_gguf_schemes_decode_the_same_in_gguf(name):
    from lowbit.io.interop.gguf_blocks import LAYOUT, blocks_from_qtensor, qtensor_from_blocks

    x = (torch.randn(16, 512) + 0.3) * torch.linspace(0.05, 2, 512)
    x[3, 7] = 25.0  # an outlier
    qt = quantize_tensor(x, name)
    raw, tname = blocks_from_qtensor(qt)
    _, qk, nbytes = LAYOUT[tname]
    assert raw.shape == (16, 512 // qk * nbytes) and qt.format_nbytes == raw.size  # what GGUF stores
    assert np.array_equal(gguf.quants.dequantize(raw, T[tname]), qt.dequantize().numpy())
    again = qtensor_from_blocks(raw, tname, (16, 512))
    assert again.scheme == qt.scheme and torch.equal(again.dequantize(), qt.dequantize())


def test_gguf_refuses_inexact_schemes_unless_asked(embedded, tmp_path):
    from lowbit.io.interop.gguf_io import export_gguf

    model = _rtn(embedded, "w4a16-g64-asym")
    with pytest.raises(UserError, match="requantize"):
        export_gguf(model, None, tmp_path / "m.gguf", source_gguf=_embedded_gguf())
    assert not (tmp_path / "m.gguf").exists()
    rep = export_gguf(model, None, tmp_path / "m.gguf", source_gguf=_embedded_gguf(), requantize="q4_1")
    errs = list(rep["requantized"].values())
    assert len(errs) == 210 and 0 < max(errs) < 0.2
    assert rep["types"]["Q4_1"] == 210


def _embedded_gguf():
    from lowbit.models.load import embedded_gguf

    return embedded_gguf("smollm2-135m")


# ---- the embedded model's own GGUF: import, re-export, compare every byte -------------------

@pytest.fixture(scope="module")
def gguf_roundtrip(tmp_path_factory):
    from lowbit.io.interop.gguf_io import export_gguf, import_gguf

    src = _embedded_gguf()
    model, tok, qts = import_gguf(src)
    out = tmp_path_factory.mktemp("gguf") / "roundtrip.gguf"
    export_gguf(model, None, out, source_gguf=src)
    return src, out, model, qts


def test_embedded_q4_1_reexports_byte_identical(gguf_roundtrip):
    src, out, _, qts = gguf_roundtrip
    assert len(qts) == 210 and {q.scheme.name for q in qts.values()} == {"q4_1"}
    a = {t.name: t for t in gguf.GGUFReader(src).tensors}
    b = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(a[name].data, b[name].data), name


@pytest.mark.slow
def test_transformers_gguf_loader_reads_our_export_to_the_same_logits(gguf_roundtrip, prompt_ids):
    from lowbit.models.load import _load_gguf

    _, out, model, _ = gguf_roundtrip
    theirs, _ = _load_gguf(out, torch.float32)
    assert torch.equal(_logits(model, prompt_ids), _logits(theirs, prompt_ids))


# ---- compressed-tensors --------------------------------------------------------------------

def test_compressed_tensors_symmetric_loads_in_transformers_to_identical_logits(embedded, prompt_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.io.interop.compressed import export_compressed_tensors, import_compressed_tensors

    model = _rtn(embedded, "w4a16-g64")
    export_compressed_tensors(model, embedded[1], tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    hf.eval()
    _, _, qts = import_compressed_tensors(tmp_path / "ct")
    ours = quantized_modules(model)
    for name, qt in qts.items():  # lossless: codes, scales bit-identical
        assert torch.equal(qt.codes, ours[name].qweight.codes) and torch.equal(qt.scale, ours[name].qweight.scale)
    assert torch.equal(_logits(model, prompt_ids), _logits(hf, prompt_ids))


@pytest.mark.parametrize("scheme", ["w4a16-g64-asym", "w8a16", "w2a16-g32-asym", "fp8-channel"])
def test_compressed_tensors_decompressor_reads_our_weights(embedded, tmp_path, scheme):
    """compressed-tensors' own decompressor (what vLLM/transformers call) on our export."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from lowbit.io.interop.compressed import export_compressed_tensors, import_compressed_tensors, weight_args

    model = _rtn(embedded, scheme)
    rep = export_compressed_tensors(model, embedded[1], tmp_path / "ct")
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    _, _, qts = import_compressed_tensors(tmp_path / "ct")
    for name, m in list(quantized_modules(model).items())[:14]:
        args, _ = weight_args(m.scheme)
        local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".weight")}
        comp = BaseCompressor.load_from_registry(rep["format"])
        w = comp.decompress(local, QuantizationScheme(targets=["Linear"], weights=args))["weight"]
        assert torch.equal(w.float(), m.qweight.dequantize(w.dtype).float()), name
        assert torch.equal(qts[name].codes, m.qweight.codes)


def test_compressed_tensors_refuses_what_it_cannot_hold(embedded, tmp_path):
    from lowbit.io.interop.compressed import export_compressed_tensors

    with pytest.raises(UserError, match="short last group"):
        export_compressed_tensors(_rtn(embedded, "w4a16-g128"), embedded[1], tmp_path / "a")  # 576 = 4x128 + 64
    with pytest.raises(UserError, match="float zero"):
        export_compressed_tensors(_rtn(embedded, "q4_1"), embedded[1], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- GPTQ ----------------------------------------------------------------------------------

def _autogptq_dequant(qweight, qzeros, scales, g_idx, bits):
    """The v1 dequantization as AutoGPTQ's reference (torch) path writes it, independently of lowbit."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf.unsqueeze(0).unsqueeze(0))
    zeros = torch.bitwise_and(zeros, (2 ** bits) - 1).reshape(scales.shape) + 1
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf.unsqueeze(0).unsqueeze(-1))
    weight = torch.bitwise_and(weight, (2 ** bits) - 1).reshape(-1, qweight.shape[1])
    return (scales[g_idx.long()].float() * (weight - zeros[g_idx.long()]).float()).t()


@pytest.mark.parametrize("scheme", ["w4a16-g64", "w4a16-g64-asym", "w8a16", "w2a16-g32"])
def test_gptq_format_matches_the_reference_dequantization_and_reimports_exactly(embedded, tmp_path, scheme, prompt_ids):
    from safetensors.torch import load_file

    from lowbit.io.interop.gptq_format import export_gptq, import_gptq

    model = _rtn(embedded, scheme)
    export_gptq(model, embedded[1], tmp_path / "g")
    sd = load_file(tmp_path / "g" / "model.safetensors")
    ours = quantized_modules(model)
    for name in list(ours)[:14]:
        w = _autogptq_dequant(*(sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), Scheme.parse(scheme).bits)
        assert torch.equal(w, ours[name].qweight.dequantize()), name
    back, _, qts = import_gptq(tmp_path / "g")
    for name, qt in qts.items():
        assert torch.equal(qt.codes, ours[name].qweight.codes) and torch.equal(qt.scale, ours[name].qweight.scale)
    assert torch.equal(_logits(back, prompt_ids), _logits(model, prompt_ids))


def test_gptq_format_refuses_3_bit_and_short_groups(embedded, tmp_path):
    from lowbit.io.interop.gptq_format import export_gptq

    with pytest.raises(UserError, match="2/4/8-bit"):
        export_gptq(_rtn(embedded, "w3a16-g64"), embedded[1], tmp_path / "a")
    with pytest.raises(UserError, match="tile in_features"):
        export_gptq(_rtn(embedded, "w4a16-g128"), embedded[1], tmp_path / "b")


def test_gptq_v1_cannot_hold_a_zero_point_of_zero():
    from lowbit.io.interop.gptq_format import gptq_tensors

    x = torch.rand(32, 64)  # all >= 0: affine zero points are 0
    with pytest.raises(UserError, match="zero point of 0"):
        gptq_tensors(quantize_tensor(x, "int4-g32-asym"), "layer")


# ---- CLI -----------------------------------------------------------------------------------

@pytest.mark.slow  # 1-2.5 minutes on 2 cores: make test-slow
def test_cli_quantize_export_import_eval(tmp_path, capsys):
    import json

    from lowbit.cli.parser import main

    out = tmp_path / "q"
    assert main(["--quiet", "quantize", "smollm2-135m", "--method", "rtn", "--scheme", "q4_0", "--out", str(out),
                 "--format", "gguf", "--embed-type", "f16", "--export-out", str(tmp_path / "m.gguf")]) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type for t in r.tensors} >= {T.Q4_0}
    assert main(["--quiet", "export", str(out), "--format", "gguf", "--embed-type", "f16", "--out", str(tmp_path / "m2.gguf")]) == 0
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "m2.gguf").read_bytes()
    assert main(["--quiet", "import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "imp")]) == 0
    capsys.readouterr()
    assert main(["--quiet", "eval", str(tmp_path / "imp"), "--baseline", str(out), "--max-windows", "1",
                 "--seq-len", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["top1_agreement"] == 1.0


@pytest.mark.parametrize("qtype,fp16_at", [(T.Q4_K, [(0, 2), (2, 4)]), (T.Q5_K, [(0, 2), (2, 4)]),
                                            (T.Q6_K, [(208, 210)]), (T.Q3_K, [(108, 110)]), (T.Q2_K, [(80, 82), (82, 84)]),
                                            (T.IQ4_XS, [(0, 2)]), (T.IQ4_NL, [(0, 2)])])
def test_gguf_types_import_bit_exactly_and_export_without_rerounding(qtype, fp16_at):
    """Random blocks (any bytes are valid codes and sub-scales), decoded by gguf itself."""
    from lowbit.io.interop.gguf_blocks import LAYOUT, blocks_from_qtensor, qtensor_from_blocks

    _, qk, nbytes = LAYOUT[qtype.name]
    rng = np.random.default_rng(0)
    rows, cols = 8, 512
    raw = rng.integers(0, 256, size=(rows * cols // qk, nbytes), dtype=np.uint8)
    for a, b in fp16_at:  # keep the fp16 super-scales finite
        raw[:, a:b] = rng.uniform(1e-3, 0.1, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    qt = qtensor_from_blocks(raw, qtype.name, (rows, cols))
    theirs = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(qt.dequantize().numpy(), theirs)
    back, tname = blocks_from_qtensor(qt)  # the two-level scales factor back exactly
    assert tname == qtype.name and np.array_equal(gguf.quants.dequantize(back, qtype), theirs)


def _autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM packing loop ([rows, cols] 4-bit ints -> int32 [rows, cols/8])."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    q = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            q[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int64) << (i * 4)
    return (q - ((q >> 31) << 32)).to(torch.int32)


def test_awq_checkpoint_imports_bit_exactly(embedded, tmp_path, prompt_ids):
    from lowbit.io.interop import import_model
    from lowbit.io.interop.checkpoint import float_tensors, write_checkpoint

    model = _rtn(embedded, "w4a16-g64-asym")
    qmods = quantized_modules(model)
    tensors = float_tensors(model, qmods, torch.float16)
    for name, m in list(qmods.items()):
        qt = m.qweight
        tensors[f"{name}.qweight"] = _autoawq_pack(qt.unpacked_codes().t().contiguous())
        tensors[f"{name}.qzeros"] = _autoawq_pack(qt.zero_points().to(torch.int32).t().contiguous())
        tensors[f"{name}.scales"] = qt.scale.t().contiguous()
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True}
    write_checkpoint(tmp_path / "awq", model, embedded[1], tensors, qc, torch.float16)
    back, _, qts = import_model(tmp_path / "awq")
    assert len(qts) == 210
    for name, qt in qts.items():
        ours = qmods[name].qweight
        assert torch.equal(qt.codes, ours.codes) and torch.equal(qt.zero_point, ours.zero_point)
    assert torch.equal(_logits(back, prompt_ids), _logits(model, prompt_ids))
