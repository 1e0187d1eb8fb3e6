"""Task probes: greedy generations of a quantized model against its float original.

Perplexity averages over prose; code and arithmetic depend on a few exact tokens and
break first. Each probe is a prompt in a category; both models decode greedily and
we compare the continuations token by token: exact match, edit distance (normalised
by the length), and the first position where they differ.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import UserError

BUILTIN_PROBES = {
    "code": [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "for i in range(10):\n    print(",
        "import numpy as np\n\ndef mean(xs):\n    return",
        "class Stack:\n    def __init__(self):\n        self.items =",
        "SELECT name, email FROM users WHERE",
    ],
    "arithmetic": [
        "2 + 2 = 4\n3 + 5 = 8\n7 + 6 =",
        "12 * 3 = 36\n9 * 4 =",
        "Q: What is 15 plus 27?\nA:",
        "The square root of 81 is",
        "10, 20, 30, 40,",
    ],
    "factual": [
        "The capital of France is",
        "Water boils at a temperature of",
        "The largest planet in the solar system is",
        "William Shakespeare wrote the play",
        "The chemical symbol for gold is",
    ],
    "instruction": [
        "Instruction: List three primary colors.\nAnswer:",
        "Translate to French: Good morning.\nFrench:",
        "Question: Give a synonym for 'happy'.\nAnswer:",
        "Write one sentence about the sea.\nSentence:",
        "Summarize in one sentence: The cat sat on the mat all day because it was warm.\nSummary:",
    ],
}


def load_probes(path: str | None) -> dict[str, list[str]]:
    """The built-in probes, plus a user file: JSONL records {"prompt": ..., "category": ...}
    or a text file with one prompt per line (category 'user'; write newlines as \\n)."""
    probes = {k: list(v) for k, v in BUILTIN_PROBES.items()}
    if not path:
        return probes
    p = Path(path)
    if not p.is_file():
        raise UserError(f"probe file {path!r} does not exist")
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise UserError(f"{p}:{i}: a probe record needs a string field 'prompt'")
            probes.setdefault(str(rec.get("category", "user")), []).append(rec["prompt"])
        else:
            probes.setdefault("user", []).append(line.replace("\\n", "\n"))
    return probes


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> list[int]:
    from lowbit.runtime.generate import generate

    return generate(model, ids, new_tokens)["tokens"][0].tolist()


def run_probes(reference: nn.Module, models: dict[str, nn.Module], tokenizer, probes: dict[str, list[str]],
               new_tokens: int = 24) -> dict:
    """{'prompts': [per prompt, per model comparison], 'by_category': {model: {category: summary}}}."""
    rows = []
    for category, prompts in probes.items():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            ref = greedy(reference, ids, new_tokens)
            row = {"category": category, "prompt": prompt, "reference": tokenizer.decode(ref), "models": {}}
            for name, model in models.items():
                out = greedy(model, ids, new_tokens)
                div = first_divergence(ref, out)
                row["models"][name] = {
                    "text": tokenizer.decode(out), "exact_match": div is None,
                    "edit_distance": edit_distance(ref, out) / len(ref), "first_divergence": div,
                    "divergent_token": None if div is None else tokenizer.decode(out[div:div + 1]),
                }
            rows.append(row)
    by_cat: dict[str, dict] = {}
    for name in models:
        by_cat[name] = {}
        for category in probes:
            rs = [r["models"][name] for r in rows if r["category"] == category]
            if not rs:
                continue
            by_cat[name][category] = {
                "prompts": len(rs),
                "exact_match": sum(r["exact_match"] for r in rs) / len(rs),
                "edit_distance": sum(r["edit_distance"] for r in rs) / len(rs),
                "first_divergence": sum(new_tokens if r["first_divergence"] is None else r["first_divergence"]
                                        for r in rs) / len(rs),
            }
    return {"new_tokens": new_tokens, "prompts": rows, "by_category": by_cat}
