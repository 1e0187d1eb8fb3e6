"""Calibration and evaluation text, split so they never overlap, cut into token windows.

Sources: 'wiki' (real Wikipedia articles shipped as test data in the gensim wheel,
extracted once with gensim's own wiki tools and cached), a plain .txt file, or a
.jsonl file (one record per line, the text under --text-field). The first half of
the text (by characters, cut at a paragraph boundary) is for calibration, the
second half for evaluation.
"""
from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path

import psutil
import torch

from lowbit.errors import UserError
from lowbit.io.files import atomic_path
from lowbit.paths import cache_dir

WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wiki_text() -> str:
    """Plain text of the Wikipedia articles in gensim's test data (cached after first use)."""
    cached = cache_dir() / "text" / "enwiki-gensim.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise UserError("the 'wiki' text needs the gensim package (pip install gensim)") from None
    dump = Path(gensim.__file__).parent / WIKI_DUMP
    if not dump.is_file():
        raise UserError(f"gensim is installed but its Wikipedia test dump is missing ({dump})")
    articles = []
    with bz2.open(dump, "rb") as f:
        for title, markup, _ in extract_pages(f):
            text = filter_wiki(markup)
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = re.sub(r"'{2,}", "", text)  # bold/italic quote marks survive filter_wiki
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text) > 200:
                articles.append(f"{title}\n\n{text}")
    out = "\n\n".join(articles)
    with atomic_path(cached) as tmp:
        Path(tmp).write_text(out, encoding="utf-8")
    return out


def check_text_source(spec: str) -> None:
    """Fail fast (before any model is loaded) on a text source that cannot exist."""
    if spec != "wiki" and not Path(spec).is_file():
        raise UserError(f"text source {spec!r} is neither 'wiki' nor an existing file")


def _utf8_lines(f, path):
    try:
        yield from f
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def load_text(spec: str, text_field: str = "text") -> str:
    """'wiki', a .txt file, or a .jsonl file."""
    check_text_source(spec)
    if spec == "wiki":
        return wiki_text()
    p = Path(spec)
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        parts = []
        with open(p, encoding="utf-8", errors="strict") as f:
            for i, line in enumerate(_utf8_lines(f, p), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    raise UserError(f"{p}:{i}: record has no field {text_field!r} (choose one with --text-field)")
                if not isinstance(rec[text_field], str):
                    raise UserError(f"{p}:{i}: field {text_field!r} holds {type(rec[text_field]).__name__}, not text")
                parts.append(rec[text_field])
        text = "\n\n".join(parts)
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{p}: not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{p}: no text in it")
    return text


def split_text(text: str) -> tuple[str, str]:
    """(calibration, evaluation): first and second half, cut at a paragraph boundary."""
    mid = len(text) // 2
    cut = text.rfind("\n\n", 0, mid)
    if cut < len(text) // 4:
        cut = mid
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n windows of seq_len tokens at seeded random offsets of the calibration stream."""
    if n < 1 or seq_len < 2:
        raise UserError(f"need at least 1 calibration sample of >= 2 tokens (got {n} x {seq_len})")
    if tokens.numel() < seq_len + 1:
        raise UserError(f"calibration text has {tokens.numel()} tokens; need more than --seq-len {seq_len}")
    need, total = 8 * n * seq_len, psutil.virtual_memory().total
    if need > total:  # the ids alone could never be held (the pre-flight judges what merely does not fit now)
        raise UserError(f"--samples {n} x --seq-len {seq_len} is {n * seq_len:.3g} calibration tokens, {need / 1e9:.1f} GB "
                        f"as ids alone ({total / 1e9:.1f} GB of memory in all); use fewer --samples")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of the evaluation stream."""
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"evaluation text has {tokens.numel()} tokens; need at least --seq-len {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def text_windows(tokenizer, spec: str, text_field: str, seq_len: int, *, calib_samples: int | None = None,
                 eval_max: int | None = None, seed: int = 0):
    """(calibration windows or None, evaluation windows or None) from one text source."""
    calib_text, eval_text = split_text(load_text(spec, text_field))
    calib = eval_ = None
    if calib_samples:
        try:
            calib = calibration_windows(tokenize(tokenizer, calib_text), calib_samples, seq_len, seed)
        except UserError as e:
            raise UserError(f"{spec}: {e}") from None
    if eval_max is not None:
        eval_ = eval_windows(tokenize(tokenizer, eval_text), seq_len, eval_max)
    return calib, eval_


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
