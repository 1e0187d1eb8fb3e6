"""Scheme: how one tensor is quantized; presets and the name grammar; Recipe."""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import asdict, dataclass, field, replace

import torch

from lowbit.core.formats import NumberFormat, get_format
from lowbit.errors import UserError

GRANULARITIES = ("tensor", "channel", "group", "token")
SCALE_METHODS = ("absmax", "mse", "percentile")
SCALE_DTYPES = ("float16", "bfloat16", "float32", "e8m0")  # e8m0: MX power-of-two exponents, stored as uint8
ZERO_DOMAINS = ("int", "float")

VALID_FORMS = (
    "model presets: w{2..8}a{16|8|4}[-g{G}][-asym][-mse][-static] (e.g. w4a16-g128, w4a16-g64-asym, w8a16, w8a8, "
    "w4a4; -static: one calibrated activation scale per tensor instead of per-token scales), fp8[-static], nf4, mxfp4, mxfp8, and GGUF's q8_0, q5_0, q5_1, q4_0, q4_1, iq4_nl, q6_k, q5_k, q4_k, iq4_xs, q3_k, q2_k; "
    "tensor-level: {int2..int8|fp8|fp8e5m2|fp4|nf4|iq4nl}-{tensor|channel|token|g{G}}[-asym[-fzero]][-mse|-p{percentile}] "
    "(e.g. int8-tensor, int4-channel, int3-g64-asym, int4-g128-mse, nf4-g64, int4-g32-asym-fzero)"
)


class SchemeError(UserError):
    """A scheme name or field that lowbit cannot honour (a user mistake)."""


@dataclass(frozen=True)
class Scheme:
    """How one tensor maps onto a low-bit grid.

    Scales run along the last dimension (nn.Linear's in_features): one per tensor,
    per row ('channel' for weights, 'token' for activations), or per group of
    `group_size` consecutive elements of a row (the last group may be shorter).
    A model preset also carries `activations`, the scheme for Linear inputs.

    Affine integer schemes keep an integer zero point per group (w = scale * (code -
    zero_point)) unless `zero_domain` is 'float': then the zero point is a float offset
    stored like the scale (w = scale * code + zero_point), the form of GGUF's Q4_1.
    """

    format: str = "int4"
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    scale_method: str = "absmax"
    percentile: float = 99.9
    scale_dtype: str = "float16"
    dynamic: bool = False
    activations: "Scheme | None" = None
    zero_domain: str = "int"
    # GGUF K-quants: the group scales (and float zeros) are themselves quantized to
    # `scale_bits`-bit integers times one fp16 factor per `super_block` elements of a row.
    super_block: int | None = None
    scale_bits: int | None = None
    name: str = ""

    def __post_init__(self):
        fmt = get_format(self.format)  # raises on unknown format
        if self.granularity not in GRANULARITIES:
            raise SchemeError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise SchemeError(f"group granularity needs a positive group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise SchemeError(f"group_size={self.group_size} only applies to granularity 'group'")
        if self.scale_method not in SCALE_METHODS:
            raise SchemeError(f"scale_method {self.scale_method!r} is not one of {SCALE_METHODS}")
        if not 50.0 < self.percentile <= 100.0:
            raise SchemeError(f"percentile must lie in (50, 100], got {self.percentile}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype {self.scale_dtype!r} is not one of {SCALE_DTYPES}")
        if fmt.kind == "float" and not self.symmetric:
            raise SchemeError(f"{self.format} is a symmetric floating-point grid; drop '-asym'")
        if self.zero_domain not in ZERO_DOMAINS:
            raise SchemeError(f"zero_domain {self.zero_domain!r} is not one of {ZERO_DOMAINS}")
        if self.zero_domain == "float" and (fmt.kind != "int" or self.symmetric or self.scale_dtype == "e8m0"):
            raise SchemeError("a float zero point (-fzero) needs an affine integer scheme ('-asym') with float scales")
        if self.scale_dtype == "e8m0" and (fmt.kind != "float" or self.scale_method != "absmax"):
            raise SchemeError("power-of-two (E8M0) scales are for MX float formats with absmax scales")
        if (self.super_block is None) != (self.scale_bits is None):
            raise SchemeError("super_block and scale_bits come together (two-level scales)")
        if self.super_block is not None:
            if self.granularity != "group" or self.super_block % self.group_size or self.scale_dtype != "float32":
                raise SchemeError("two-level scales need group granularity, a super_block that is a multiple of "
                                  "group_size and float32 scale products")
            if not 4 <= self.scale_bits <= 8:
                raise SchemeError(f"scale_bits {self.scale_bits}: 4..8 are supported")
        if not self.name:
            object.__setattr__(self, "name", self._describe())

    # ---- derived ----------------------------------------------------------
    @property
    def number_format(self) -> NumberFormat:
        return get_format(self.format)

    @property
    def bits(self) -> int:
        return self.number_format.bits

    @property
    def has_zero_point(self) -> bool:
        return not self.symmetric and self.number_format.kind == "int"

    @property
    def float_zero(self) -> bool:
        return self.zero_domain == "float"

    @property
    def is_mx(self) -> bool:
        return self.scale_dtype == "e8m0"

    @property
    def scale_storage_dtype(self) -> torch.dtype:
        """The torch dtype scales are stored in (uint8 biased exponents for E8M0)."""
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "e8m0": torch.uint8}[self.scale_dtype]

    def _describe(self) -> str:
        short = {"fp8_e4m3": "fp8", "fp8_e5m2": "fp8e5m2", "fp4_e2m1": "fp4"}.get(self.format, self.format)
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        s = f"{short}-{gran}"
        if not self.symmetric:
            s += "-asym"
        if self.zero_domain == "float":
            s += "-fzero"
        if self.super_block:
            s += f"-sb{self.super_block}s{self.scale_bits}"
        if self.scale_method == "mse":
            s += "-mse"
        elif self.scale_method == "percentile":
            s += f"-p{self.percentile:g}"
        return s

    def with_(self, **changes) -> "Scheme":
        """A copy with fields changed (the name is re-derived unless given)."""
        changes.setdefault("name", "")
        return replace(self, **changes)

    # ---- serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["activations"] = self.activations.to_dict() if self.activations else None
        if self.super_block is None:  # one-level schemes keep the dict (and files) they always had
            del d["super_block"], d["scale_bits"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        try:
            d = dict(d)
            d.setdefault("zero_domain", "int")  # written before float zero points existed
            if d.get("activations"):
                d["activations"] = cls.from_dict(d["activations"])
            return cls(**d)
        except SchemeError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise SchemeError(f"not a lowbit scheme ({type(e).__name__}: {e})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Scheme":
        return cls.from_dict(json.loads(s))

    # ---- names -----------------------------------------------------------
    @classmethod
    def parse(cls, name: "str | Scheme") -> "Scheme":
        """Parse a preset or tensor-level scheme name (see VALID_FORMS)."""
        if isinstance(name, Scheme):
            return name
        if not isinstance(name, str):
            raise SchemeError(f"scheme {name!r} is a {type(name).__name__}, not a scheme name; valid forms: {VALID_FORMS}")
        if not name.strip():
            raise SchemeError(f"empty scheme name; valid forms: {VALID_FORMS}")
        key = name.strip().lower()
        try:
            scheme = _parse(key)
        except SchemeError as e:
            raise SchemeError(f"bad scheme {name!r}: {e}; valid forms: {VALID_FORMS}") from None
        if scheme is None:
            raise SchemeError(f"unknown scheme {name!r}; valid forms: {VALID_FORMS}")
        return scheme


_FMT_ALIASES = {"fp8": "fp8_e4m3", "fp8e4m3": "fp8_e4m3", "fp8e5m2": "fp8_e5m2", "fp4": "fp4_e2m1", "nf4": "nf4",
                "iq4nl": "iq4nl"}
# numbers in ASCII digits (\d would take any script's digits); no leading zeros, one spelling per scheme
_N = r"(?:0|[1-9][0-9]*)"
_SUFFIX = r"(?:(?P<asym>-asym)(?P<fzero>-fzero)?)?(?:(?P<mse>-mse)|-p(?P<pct>[0-9]+(?:\.[0-9]+)?))?"
_PRESET_RE = re.compile(rf"w(?P<w>{_N})a(?P<a>{_N})(?:-g(?P<g>{_N}))?" + _SUFFIX)
_TENSOR_RE = re.compile(rf"(?P<fmt>int{_N}|fp8|fp8e4m3|fp8e5m2|fp4|nf4|iq4nl)-(?P<gran>tensor|channel|token|g{_N})" + _SUFFIX)


def _suffix_fields(m: re.Match) -> dict:
    out = {"symmetric": not m.group("asym"), "zero_domain": "float" if m.group("fzero") else "int"}
    if m.group("mse"):
        out["scale_method"] = "mse"
    elif m.group("pct"):
        out["scale_method"], out["percentile"] = "percentile", float(m.group("pct"))
    return out


def _int_format(bits: int) -> str:
    if not 2 <= bits <= 8:
        raise SchemeError(f"{bits}-bit integers are not supported (2..8 are)")
    return f"int{bits}"


def _token_acts(fmt: str) -> Scheme:
    """Dynamic per-token activation quantization, symmetric (what W8A8 kernels use)."""
    return Scheme(format=fmt, granularity="token", dynamic=True)


def _parse(key: str) -> Scheme | None:
    if key.endswith("-static"):
        base = _parse(key.removesuffix("-static"))
        if base is None or base.activations is None or not base.activations.dynamic:
            raise SchemeError("-static applies to schemes that quantize activations (w8a8, w4a8, w4a4, fp8)")
        acts = Scheme(format=base.activations.format, granularity="tensor", dynamic=False)
        return base.with_(activations=acts, name=key)
    if key in ("fp8", "w8a8-fp8"):
        return Scheme(format="fp8_e4m3", granularity="channel", activations=_token_acts("fp8_e4m3"), name="fp8")
    if key == "nf4":
        return Scheme(format="nf4", granularity="group", group_size=64, name="nf4")
    if key in GGUF_PRESETS:
        return GGUF_PRESETS[key]
    if key in ("mxfp4", "mxfp8"):
        fmt = "fp4_e2m1" if key == "mxfp4" else "fp8_e4m3"
        return Scheme(format=fmt, granularity="group", group_size=32, scale_dtype="e8m0", name=key)
    m = _PRESET_RE.fullmatch(key)
    if m:
        wbits, abits = int(m.group("w")), int(m.group("a"))
        if abits not in (16, 8, 4):
            raise SchemeError(f"activation bits a{abits}: use a16 (float), a8 or a4")
        g = m.group("g")
        acts = None if abits == 16 else _token_acts(_int_format(abits))
        if g is not None and int(g) < 1:
            raise SchemeError("group size must be positive")
        return Scheme(
            format=_int_format(wbits),
            granularity="group" if g else "channel",
            group_size=int(g) if g else None,
            activations=acts,
            name=key,
            **_suffix_fields(m),
        )
    m = _TENSOR_RE.fullmatch(key)
    if m:
        fmt = m.group("fmt")
        fmt = _int_format(int(fmt[3:])) if fmt.startswith("int") else _FMT_ALIASES[fmt]
        gran = m.group("gran")
        if gran.startswith("g"):
            if int(gran[1:]) < 1:
                raise SchemeError("group size must be positive")
            gfields = {"granularity": "group", "group_size": int(gran[1:])}
        else:
            gfields = {"granularity": gran}
        return Scheme(format=fmt, name=key, **gfields, **_suffix_fields(m))
    return None


# llama.cpp's block types as lowbit schemes, exactly (Q4_0 w = d*(q-8) is a signed int4
# code; Q4_1 w = d*q + m a float zero; IQ4_NL w = d*kvalues[q]; the K-quants keep per-group
# products d*sc, -dmin*m in fp32 with sc, m integers of `scale_bits`). Each searches its
# scales (MSE over clip ranges of both signs, then a least-squares refit): what is searched
# is what llama.cpp decodes.
def _gguf(fmt, g, sym=True, sb=None, sbits=None, **kw):
    return Scheme(format=fmt, granularity="group", group_size=g, symmetric=sym, zero_domain="int" if sym else "float",
                  scale_method="mse", super_block=sb, scale_bits=sbits,
                  scale_dtype="float32" if sb else "float16", **kw)


GGUF_PRESETS = {
    "q8_0": _gguf("int8", 32, name="q8_0"),
    "q5_0": _gguf("int5", 32, name="q5_0"),
    "q5_1": _gguf("int5", 32, False, name="q5_1"),
    "q4_0": _gguf("int4", 32, name="q4_0"),
    "q4_1": _gguf("int4", 32, False, name="q4_1"),
    "iq4_nl": _gguf("iq4nl", 32, name="iq4_nl"),
    "q6_k": _gguf("int6", 16, True, 256, 8, name="q6_k"),
    "q5_k": _gguf("int5", 32, False, 256, 6, name="q5_k"),
    "q4_k": _gguf("int4", 32, False, 256, 6, name="q4_k"),
    "iq4_xs": _gguf("iq4nl", 32, True, 256, 6, name="iq4_xs"),
    "q3_k": _gguf("int3", 16, True, 256, 6, name="q3_k"),
    "q2_k": _gguf("int2", 16, False, 256, 4, name="q2_k"),
}
# llama.cpp's choice for a row that 256 does not divide (llama-quantize's tensor_type_fallback)
GGUF_FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_1", "q4_k": "q5_0", "iq4_xs": "iq4_nl", "q3_k": "q4_0", "q2_k": "q4_0"}


def fitting(scheme: Scheme, cols: int) -> Scheme:
    """`scheme` for a row of `cols`, or llama-quantize's fallback type when a K-quant's
    256-element super-block does not divide the row."""
    if scheme.super_block and cols % scheme.super_block and scheme.name in GGUF_FALLBACK:
        return GGUF_PRESETS[GGUF_FALLBACK[scheme.name]]
    return scheme


PRESETS = ("w8a16", "w4a16", "w4a16-g128", "w4a16-g64", "w3a16-g64", "w8a8", "w8a8-static", "w4a8", "w4a4", "fp8",
           "fp8-static", "nf4", "mxfp4", "mxfp8")


# kept in float unless a pattern names them: the output head and embeddings, and MoE routers
# (Mixtral/Qwen/DeepSeek `mlp.gate`, gpt-oss/Llama 4/Granite `router`, Qwen2-MoE's shared-expert gate)
DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*.mlp.gate", "*.router", "*.router.*", "*.shared_expert_gate")


@dataclass
class Recipe:
    """Which scheme applies to which Linear modules, and which algorithm runs.

    `include` / `exclude` are fnmatch patterns on module names (e.g.
    'model.layers.*.mlp.*'). lm_head and embeddings stay in float unless a
    pattern includes them explicitly; `overrides` maps a pattern to another scheme
    (mixed precision).
    """

    scheme: Scheme
    method: str = "rtn"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    overrides: dict[str, Scheme] = field(default_factory=dict)

    def scheme_for(self, module_name: str) -> Scheme | None:
        """The scheme for a module, or None to keep it in float."""
        for pattern, s in self.overrides.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                return s
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude):
            return None
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.include):
            return self.scheme
        return None

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme.to_dict(),
            "method": self.method,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        try:
            strings = lambda v: [str(x) for x in v] if isinstance(v, list) else _bad(f"a list of patterns, got {v!r}")  # noqa: E731
            method = d.get("method", "rtn")
            if not isinstance(method, str):
                _bad(f"method must be a string, got {method!r}")
            return cls(
                scheme=Scheme.from_dict(d["scheme"]),
                method=method,
                include=strings(d.get("include", ["*"])),
                exclude=strings(d.get("exclude", [])),
                overrides={str(k): Scheme.from_dict(v) for k, v in d.get("overrides", {}).items()},
            )
        except SchemeError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise SchemeError(f"not a lowbit recipe ({type(e).__name__}: {e})") from None


def _bad(msg: str):
    raise SchemeError(msg)
