"""Fuzzing the parsers and readers users feed by hand: the only exceptions allowed are the
intended one-line UserErrors (hypothesis generates the inputs)."""
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.core.method import Method
from lowbit.core.scheme import PRESETS, Recipe, Scheme
from lowbit.errors import UserError

TOKENS = ["w", "a", "g", "fp8", "fp4", "nf4", "mx", "int", "e4m3", "e5m2", "-", "asym", "sym", "mse", "static",
          "token", "channel", "tensor", "16", "8", "4", "3", "2", "1", "0", "64", "128", "33", "-1", "x", " "]
scheme_names = st.one_of(st.text(max_size=24), st.lists(st.sampled_from(TOKENS), max_size=8).map("".join),
                         st.sampled_from(list(PRESETS)).flatmap(lambda p: st.sampled_from([p, p + "-asym", p + "-mse", p + "-g7"])))


@settings(max_examples=400, deadline=None)
@given(scheme_names)
def test_scheme_parse_accepts_or_says_why(name):
    try:
        s = Scheme.parse(name)
    except UserError as e:
        assert str(e) and "\n" not in str(e).strip().split("valid forms")[0]
        return
    assert Scheme.parse(s.name) == s  # what parses has a name that parses back to it
    assert Scheme.from_dict(json.loads(s.to_json())) == s


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(st.sampled_from(
    ["rtn", "gptq", "awq", "smoothquant", "outlier-split", "rotate", "qat", "+", " ", "x", "GPTQ"]), max_size=6).map("".join)))
def test_method_parse_accepts_or_says_why(text):
    try:
        m = Method.parse(text)
    except UserError:
        return
    assert Method.parse(m.name) == m


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def _mutated_recipe(draw_dict):
    base = Recipe(scheme=Scheme.parse("w4a16-g64")).to_dict()
    base.update(draw_dict)
    return base


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(["scheme", "method", "include", "exclude", "overrides"]),
                                              json_values, max_size=5).map(_mutated_recipe)))
def test_recipe_from_dict_accepts_or_says_why(d):
    try:
        r = Recipe.from_dict(d)
    except UserError:
        return
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), header=st.one_of(st.none(), json_values))
def test_safetensors_reader_on_garbage(tmp_path, data, header):
    from lowbit.models.lazy import LazyCheckpoint

    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    if header is not None:  # a well-framed file whose header is arbitrary JSON
        h = json.dumps(header).encode()
        data = len(h).to_bytes(8, "little") + h + data
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(UserError):
        LazyCheckpoint(d)


CONFIG_KEYS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "architectures", "rope_theta", "head_dim"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4))
def test_config_reader_on_mutated_configs(tmp_path, changes):
    from lowbit.models.lazy import skeleton

    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32}
    cfg.update(changes)
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        skeleton(d)
    except UserError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(json_values, st.text(string.printable, max_size=40)))
def test_lowbit_json_reader_on_garbage(tmp_path, meta):
    from lowbit.io.lowbit_dir import load_quantized

    d = tmp_path / "q"
    d.mkdir(exist_ok=True)
    (d / "lowbit.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(UserError):
        load_quantized(d)


# ---- the CLI's numeric arguments (hostile-input sweep): one line and exit 2, or figures that make sense

NUMBER_TEXT = st.one_of(
    st.integers(-10**13, 10**13).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", "\u0664", "", " ", "1e-400", "3.", ".5", "9" * 40]),
    st.text(max_size=6),
)
NUMERIC_FLAGS = {
    "quantize": ["--samples", "--seq-len", "--batch-size", "--target-bits", "--alpha", "--outlier-threshold", "--qat-steps",
                 "--report-windows"],
    "eval": ["--seq-len", "--max-windows"],
    "generate": ["--max-new-tokens"],
    "analyze": ["--sets", "--windows", "--new-tokens", "--sensitivity-windows", "--seq-len"],
    "plan": ["--batch", "--seq-len", "--headroom", "--max-gpus", "--replicas", "--target-tokens-per-s", "--layers", "--hidden",
             "--heads", "--kv-heads", "--head-dim", "--intermediate", "--vocab"],
}
BASE = {"quantize": ["smollm2-135m", "--out", "o"], "eval": ["smollm2-135m"], "generate": ["smollm2-135m", "--prompt", "hi"],
        "analyze": ["smollm2-135m"], "plan": ["7e9", "--layers", "4", "--hidden", "256", "--heads", "4"]}


def _one_line_or_value(argv, capsys):
    """Parse argv: either one line on stderr and exit 2, or the parsed namespace."""
    from lowbit.cli.parser import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.code == 2 and len(err) == 1 and "Traceback" not in err[0], (argv, e.code, err)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd_flag=st.sampled_from([(c, f) for c, fs in NUMERIC_FLAGS.items() for f in fs]), value=NUMBER_TEXT)
def test_cli_numeric_arguments_parse_to_a_usable_value_or_one_line(cmd_flag, value, capsys):
    import math

    cmd, flag = cmd_flag
    args = _one_line_or_value([cmd, *BASE[cmd], f"{flag}={value}"], capsys)
    if args is not None:
        v = getattr(args, flag[2:].replace("-", "_"))
        assert isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, (flag, value, v)
        if isinstance(v, int) and flag not in ("--headroom",):
            assert v >= 1, (flag, value, v)  # counts and lengths: at least one


def _numbers(obj):
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.one_of(st.integers(-10**13, 10**13).map(str), st.sampled_from(["7e9", "-7e9", "nan", "1e400", "0", "x"])),
       flag=st.sampled_from(NUMERIC_FLAGS["plan"]), value=NUMBER_TEXT)
def test_plan_never_prints_a_negative_or_nan_figure(params, flag, value, capsys):
    """The planner runs in full here (it is cheap): exit 0 with sane figures, or one line and exit 2."""
    import math

    from lowbit.cli import main

    try:
        rc = main(["plan", "--json", "--layers", "4", "--hidden", "256", "--heads", "4", f"{flag}={value}", "--", params])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    if rc == 2:
        assert len(lines) == 1 and "Traceback" not in err, (params, flag, value, err)
        return
    assert rc == 0, (params, flag, value, rc, err)
    figures = list(_numbers(json.loads(out)))
    assert figures and all(math.isfinite(x) and x >= 0 for x in figures), (params, flag, value)
