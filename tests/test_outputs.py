"""Outputs lose nothing (issue: hostile-input sweep, findings 1, 2 and 6): lowbit replaces only
what it wrote, never a source, one run per output at a time, and a damaged work folder is
detected instead of ending every resume in a traceback."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.io.files import output_lock
from lowbit.quantization.stream import work_dir


def _cli(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "lowbit", "--quiet", *argv], capture_output=True, text=True,
                          timeout=timeout, env=os.environ)


def _one_line_exit_2(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def _refused(capsys, *argv) -> str:
    """Run the CLI in this process (no start-up cost); it must exit 2 with one line, no traceback."""
    from lowbit.cli import main

    try:
        rc = main(["--quiet", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lowbit_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q"
    r = _cli("quantize", "smollm2-135m", "--method", "rtn", "--scheme", "w4a16-g32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_export_onto_its_own_source_is_refused_and_deletes_nothing(lowbit_out, tmp_path, capsys):
    q2 = tmp_path / "q2"
    shutil.copytree(lowbit_out, q2)
    before = _tree(q2)
    msg = _refused(capsys, "export", str(q2), "--format", "compressed-tensors", "--out", str(q2))
    assert "is (or holds) the source" in msg
    assert _tree(q2) == before


def test_export_onto_a_checkpoint_lowbit_did_not_write_is_refused(lowbit_out, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"weights the user cares about")
    before = _tree(hf)
    msg = _refused(capsys, "export", str(lowbit_out), "--format", "gptq", "--out", str(hf))
    assert "was not written by lowbit" in msg
    assert _tree(hf) == before


def test_gguf_out_that_is_a_text_file_or_a_directory_is_refused(lowbit_out, tmp_path, capsys):
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    msg = _refused(capsys, "export", str(lowbit_out), "--format", "gguf", "--out", str(notes))
    assert "was not written by lowbit" in msg and notes.read_text() == "my notes"
    msg = _refused(capsys, "export", str(lowbit_out), "--format", "gguf", "--out", str(tmp_path))
    assert "is a directory" in msg


def test_lowbit_replaces_its_own_exports(lowbit_out, tmp_path):
    from lowbit.cli import main

    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("compressed-tensors", tmp_path / "ct")):
        for _ in range(2):  # the second run replaces the first one's output
            assert main(["--quiet", "export", str(lowbit_out), "--format", fmt, "--out", str(out)]) == 0


def test_a_second_run_to_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "o"
    with output_lock(out):  # as a first run holds it while it works
        msg = _refused(capsys, "quantize", "smollm2-135m", "--method", "rtn", "--scheme", "w8a16", "--out", str(out))
    assert f"pid {os.getpid()}" in msg
    assert not out.exists() and not work_dir(out).exists()


def test_a_damaged_work_folder_is_redone_not_a_traceback(lowbit_out, tmp_path):
    from test_stream import _kill_when

    args = ["quantize", "smollm2-135m", "--method", "rtn", "--scheme", "w4a16-g32"]  # lowbit_out's command
    out = tmp_path / "o"
    _kill_when([*args, "--out", str(out)], out, done=5)
    shard = sorted(work_dir(out).glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:100])  # a finished block's shard, truncated
    assert json.loads((work_dir(out) / "progress.json").read_text())["done"] >= 5
    r = _cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "damaged" in r.stdout
    assert _tree(out) == _tree(lowbit_out)


def test_loading_is_strict_about_missing_or_unexpected_tensors(lowbit_out, tmp_path):
    """Finding 4: transformers fills missing weights with random values; eval scored them."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(hf)
    for f in lowbit_out.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, hf / f.name)
    sd = load_file(hf / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, hf / "model.safetensors", metadata={"format": "pt"})
    msg = _one_line_exit_2(_cli("eval", str(hf), "--seq-len", "32", "--max-windows", "1"))
    assert "missing 1 (e.g. model.layers.1.mlp.up_proj.weight)" in msg
    bare = tmp_path / "bare"
    shutil.copytree(lowbit_out, bare)
    (bare / "lowbit.json").unlink()  # its codes would load as a float model with random weights
    msg = _one_line_exit_2(_cli("eval", str(bare), "--seq-len", "32", "--max-windows", "1"))
    assert "do not match config.json" in msg and "unexpected" in msg


@pytest.mark.parametrize("argv, what", [
    (["quantize", "smollm2-135m", "--samples", "0", "--out", "o"], "--samples: '0' must be >= 1"),
    (["quantize", "smollm2-135m", "--batch-size", "-2", "--out", "o"], "--batch-size: '-2' must be >= 1"),
    (["quantize", "smollm2-135m", "--target-bits", "nan", "--out", "o"], "not a finite number"),
    (["quantize", "smollm2-135m", "--target-bits", "9.5", "--out", "o"], "must be <= 9"),  # Q8_0 is 8.5 bits per weight
    (["quantize", "smollm2-135m", "--target-bits", "3.5", "--bit-choices", "3,x", "--out", "o"], "--bit-choices '3,x'"),
    (["quantize", "smollm2-135m", "--method", "smoothquant", "--alpha", "-3", "--out", "o"], "--alpha: '-3' must be >= 0"),
    (["quantize", "smollm2-135m", "--method", "qat", "--qat-steps", "-1", "--out", "o"], "--qat-steps: '-1' must be >= 1"),
    (["quantize", "smollm2-135m", "--method", "outlier-split", "--outlier-threshold", "-1", "--out", "o"], "must be > 0"),
    (["eval", "smollm2-135m", "--seq-len", "0"], "--seq-len: '0' must be >= 1"),
    (["plan", "7e9", "--layers", "2", "--hidden", "64", "--heads", "4", "--batch", "0"], "--batch: '0' must be >= 1"),
    (["plan", "--layers", "2", "--hidden", "64", "--heads", "4", "--", "-7e9"], "a parameter count must be a positive"),
    (["generate", "smollm2-135m", "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens: '-5' must be >= 1"),
])
def test_bad_numbers_are_one_line_before_any_work(argv, what, tmp_path, monkeypatch, capsys):
    """Findings 5 and 7: numeric arguments are checked up front (no traceback, nothing written)."""
    from lowbit.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["--quiet", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and what in err[0], err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, what", [
    (["--method", "gptq", "--samples", "1000000000", "--dry-run"], "use fewer --samples"),
    (["--scheme", "w4a16-g1000000", "--method", "rtn"], "use a group size <= 576"),
])
def test_memory_hungry_arguments_are_refused_before_anything_grows(argv, what, tmp_path):
    """Finding 3: the dry run of 10^9 samples grew to 24 GB; g10^6 padded every row to 10^6
    columns. Now one line, in a process that may not grow past 6 GB."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "quantize", "smollm2-135m", *argv, "--out", "o"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, preexec_fn=cap)
    assert what in _one_line_exit_2(r)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("parse, text, what", [
    ("scheme", "w\u0664a16", "unknown scheme"),  # an Arabic-Indic digit
    ("scheme", "int4-g0064", "unknown scheme"),
    ("scheme", "w8a8-static-static", "-static applies"),
    ("scheme", 4, "is a int, not a scheme name"),
    ("method", "awq+", "unknown method"),
    ("method", "gptq+awq", "write it as 'awq+gptq'"),
])
def test_names_have_one_spelling(parse, text, what):
    """Finding 8: lenient parses that ran something other than what was written."""
    from lowbit.core.method import Method
    from lowbit.core.scheme import Scheme
    from lowbit.errors import UserError

    with pytest.raises(UserError, match=re.escape(what)):
        (Scheme.parse if parse == "scheme" else Method.parse)(text)


def test_misleading_inputs_get_their_own_message(lowbit_out, tmp_path, capsys):
    """Findings 7 and 8: a JSONL null is not the text 'None'; an empty prompt; gguf-only options elsewhere."""
    from lowbit.errors import UserError
    from lowbit.io.text import load_text

    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(UserError, match="t.jsonl:2: field 'text' holds NoneType"):
        load_text(str(bad))
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_text(str(binary))
    assert "--prompt is empty" in _refused(capsys, "generate", "smollm2-135m", "--prompt", " ")
    msg = _refused(capsys, "export", str(lowbit_out), "--format", "gptq", "--requantize", "q4_0", "--out", str(tmp_path / "g"))
    assert "apply to the gguf export" in msg and not (tmp_path / "g").exists()


@pytest.mark.parametrize("edit, what", [
    (lambda m: m["scheme"].update(format="nf4"), "scheme.format is 'int4' where the codes were written, 'nf4' in lowbit.json"),
    (lambda m: m["scheme"].update(group_size=64), "scheme.group_size is 32 where the codes were written, 64 in lowbit.json"),
    (lambda m: m.update(shape=[1536, 576]), "shape is [576, 1536] where the codes were written"),
])
def test_a_lowbit_json_that_disagrees_with_the_stored_codes_is_refused(lowbit_out, tmp_path, capsys, edit, what):
    """Findings 5 and 7: an int4 module edited to nf4 loaded and evaluated (same code bytes, other values)."""
    bad = tmp_path / "bad"
    shutil.copytree(lowbit_out, bad)
    meta = json.loads((bad / "lowbit.json").read_text())
    edit(meta["modules"]["model.layers.3.mlp.down_proj"])
    (bad / "lowbit.json").write_text(json.dumps(meta))
    msg = _refused(capsys, "eval", str(bad), "--seq-len", "32", "--max-windows", "1")
    assert "disagrees with model-00004-of-" in msg and "model.layers.3.mlp.down_proj" in msg and what in msg, msg


def test_lengths_beyond_the_models_context_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Finding 8: eval --seq-len 100000 ran 150 s before it was stopped."""
    monkeypatch.chdir(tmp_path)
    assert "exceeds the model's context of 8192" in _refused(capsys, "eval", "smollm2-135m", "--seq-len", "100000")
    assert "exceeds the model's context of 8192" in _refused(capsys, "generate", "smollm2-135m", "--prompt", "hi",
                                                              "--max-new-tokens", "9000")
    assert "exceeds the model's context of 8192" in _refused(capsys, "quantize", "smollm2-135m", "--seq-len", "9000", "--out", "o")
    assert os.listdir(tmp_path) == []


def test_plan_says_when_no_fleet_fits(capsys):
    """Finding 7: --seq-len 10^12 said '1024 GPUs per replica would fit' while 57 M GiB short per GPU."""
    from lowbit.cli import main

    assert main(["plan", "7e9", "--layers", "32", "--hidden", "4096", "--heads", "32", "--seq-len", str(10**12)]) == 0
    out = capsys.readouterr().out
    assert "still short at 1024 GPUs per replica" in out and "would fit" not in out.split("suggestion:")[1]


def test_a_gguf_source_is_checked_before_it_is_dequantized_whole(tmp_path, monkeypatch):
    """Finding 3: a vocabulary-only GGUF with 8B-model dimensions grew to 23 GB."""
    import resource

    import gguf
    import psutil
    import torch

    from lowbit.errors import UserError
    from lowbit.models.load import check_gguf_fits, embedded_gguf

    vocab = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(vocab), "llama")
    w.add_block_count(32)
    w.add_embedding_length(4096)
    w.add_feed_forward_length(14336)
    w.add_head_count(32)
    w.add_token_list([f"t{i}" for i in range(1000)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    r = subprocess.run([sys.executable, "-m", "lowbit", "--quiet", "quantize", str(vocab), "--method", "rtn", "--out", "o"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300, preexec_fn=cap)
    assert "holds no weight tensors" in _one_line_exit_2(r)
    assert sorted(os.listdir(tmp_path)) == ["vocab.gguf"]
    check_gguf_fits(embedded_gguf("smollm2-135m"), torch.float32)  # 135M parameters fit
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 100 << 20})())
    with pytest.raises(UserError, match=r"needs about 1\.1 GB and 0\.1 GB is available"):
        check_gguf_fits(embedded_gguf("smollm2-135m"), torch.float32)


def test_quiet_means_quiet_for_a_gguf_source(tmp_path):
    """Finding 8: --quiet still showed transformers' GGUF conversion bar."""
    from lowbit.models.load import embedded_gguf

    src = tmp_path / "m.gguf"
    shutil.copy(embedded_gguf("smollm2-135m"), src)
    r = _cli("eval", str(src), "--seq-len", "32", "--max-windows", "1")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-500:]


def test_compressed_tensors_whose_config_disagrees_with_its_tensors_is_one_line(lowbit_out, tmp_path, capsys):
    """Finding 5: num_bits edited to 5 in a compressed-tensors config ended in a RuntimeError traceback."""
    from lowbit.cli import main

    ct = tmp_path / "ct"
    assert main(["--quiet", "export", str(lowbit_out), "--format", "compressed-tensors", "--out", str(ct)]) == 0
    capsys.readouterr()
    cfg = json.loads((ct / "config.json").read_text())
    for group in cfg["quantization_config"]["config_groups"].values():
        group["weights"]["num_bits"] = 5
    (ct / "config.json").write_text(json.dumps(cfg))
    msg = _refused(capsys, "import", str(ct), "--out", str(tmp_path / "back"))
    assert "5-bit codes of a" in msg and "does not match the tensors" in msg
    assert not (tmp_path / "back").exists()


def test_outputs_get_the_usual_permissions(lowbit_out, tmp_path):
    """Finding 8: exported model.safetensors were mode 0600 (safetensors' own file mode)."""
    from lowbit.cli import main

    assert main(["--quiet", "export", str(lowbit_out), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for d in (lowbit_out, tmp_path / "g"):
        modes = {f.name: f.stat().st_mode & 0o777 for f in d.iterdir() if f.is_file()}
        assert set(modes.values()) == {0o666 & ~umask}, modes
