"""A ~1.2B-parameter Llama-shaped checkpoint quantized from disk (slow: writes 2.2 GB)."""

import pytest

pytestmark = pytest.mark.slow


def test_1b_checkpoint_streams_in_bounded_memory(tmp_path, bigmodel_bench):
    bench = bigmodel_bench
    d = tmp_path / "llama1b"
    ck = bench.write_checkpoint("1b", d)
    assert 1.0e9 < ck["params"] < 1.25e9
    stored = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    rtn = bench.run(["quantize", str(d), "--method", "rtn", "--scheme", "w4a16-g128", "--out", str(tmp_path / "rtn")])
    # one block in float32 plus the process, far below the 2.2 GB checkpoint held whole in float32 (4.4 GB)
    assert rtn["peak_rss_gb"] < 0.5 * 2 * stored / 1e9
    # runs of this shape on an AMD EPYC: 0.80-0.85 GB measured, 0.77-0.81 GB predicted; held to
    # 20% (the target) on memory and 35% on time (seconds of machine measurement vary)
    assert abs(rtn["predicted_peak_gb"] / rtn["peak_rss_gb"] - 1) < 0.2
    assert abs(rtn["predicted_seconds"] / rtn["seconds"] - 1) < 0.35
    # the Python API streams the same way: the same bounded peak, the same bytes
    api = bench.run([], python=f"import lowbit; lowbit.quantize({str(d)!r}, 'w4a16-g128', 'rtn', out={str(tmp_path / 'api')!r}, "
                               "progress=False)")
    assert api["peak_rss_gb"] < 0.5 * 2 * stored / 1e9
    assert all((tmp_path / "api" / f.name).read_bytes() == f.read_bytes() for f in (tmp_path / "rtn").glob("*.safetensors"))
    gptq = bench.run(["quantize", str(bench.first_blocks(d, 2)), "--method", "gptq", "--scheme", "w4a16-g128",
                      "--samples", "4", "--seq-len", "256", "--batch-size", "2", "--out", str(tmp_path / "gptq")])
    assert abs(gptq["predicted_peak_gb"] / gptq["peak_rss_gb"] - 1) < 0.5
    from lowbit.io.lowbit_dir import load_quantized
    model, _, meta = load_quantized(tmp_path / "gptq")
    assert len(meta["modules"]) == 2 * 7
