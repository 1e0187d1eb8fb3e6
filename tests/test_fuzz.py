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
