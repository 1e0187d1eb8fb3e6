import json

import pytest
import torch

from lowbit.errors import UserError
from lowbit.io.text import calibration_windows, eval_windows, load_text, split_text, wiki_text


def test_wiki_split_never_overlaps():
    text = wiki_text()
    calib, held_out = split_text(text)
    assert calib + held_out == text
    assert len(calib) > 0.4 * len(text) and len(held_out) > 0.4 * len(text)
    # no article appears on both sides
    assert not (set(calib.split("\n\n")[-5:-1]) & set(held_out.split("\n\n")))


def test_windows_are_seeded_and_shaped():
    tokens = torch.arange(10_000)
    a = calibration_windows(tokens, 8, 100, seed=1)
    b = calibration_windows(tokens, 8, 100, seed=1)
    assert torch.equal(a, b) and a.shape == (8, 100)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 99, dtype=torch.long))  # contiguous text
    w = eval_windows(tokens, 100, max_windows=5)
    assert w.shape == (5, 100) and torch.equal(w.reshape(-1), tokens[:500])


def test_jsonl_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "hello"}) + "\n\n" + json.dumps({"body": "world"}) + "\n")
    assert load_text(str(p), "body") == "hello\n\nworld"
    with pytest.raises(UserError, match="no field 'text'"):
        load_text(str(p))
    p.write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        load_text(str(p))
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="no text"):
        load_text(str(empty))
    with pytest.raises(UserError, match="need more than"):
        calibration_windows(torch.arange(10), 1, 64)
