"""Evaluation / calibration text and windows: exact layouts, determinism, refusals."""
from __future__ import annotations

import numpy as np
import pytest

from qublast.errors import InputError
from qublast.text import (
    EMBEDDED_CALIB,
    EMBEDDED_EVAL,
    _read,
    calib_text,
    calib_windows,
    eval_text,
    eval_windows,
    wikitext_rows_to_text,
)


def test_wikitext_rows_to_text():
    lines = [" \n", " = Title = \n", " \n", " Some text . \n", "last line without newline"]
    expected = "\n\n" + " = Title = \n" + "\n\n" + "\n\n" + " Some text . \n" + "\n\n" + "last line without newline\n"
    assert wikitext_rows_to_text(lines) == expected
    assert wikitext_rows_to_text([]) == ""
    assert wikitext_rows_to_text(["a\n"]) == "a\n"
    assert wikitext_rows_to_text(["a\n", "b"]) == "a\n\n\nb\n"
    assert wikitext_rows_to_text(["\t\n", "x\n"]) == "\n\nx\n"


def test_eval_text_from_file_matches_rows(tmp_path):
    path = tmp_path / "wiki.raw"
    path.write_text(" \n = A = \n \n b c \n", encoding="utf-8")
    src = eval_text(path=str(path))
    assert src.label == f"file:{path}"
    assert src.text == "\n\n = A = \n\n\n\n\n b c \n"


def test_eval_windows():
    ids = np.arange(23, dtype=np.int64)
    w = eval_windows(ids, 5)
    assert w.shape == (4, 5) and w.dtype == np.int64
    assert np.array_equal(w.reshape(-1), np.arange(20))  # tail of 3 dropped
    assert eval_windows(ids, 5, max_windows=2).shape == (2, 5)
    assert np.array_equal(eval_windows(ids, 5, max_windows=2), ids[:10].reshape(2, 5))
    assert eval_windows(ids, 5, max_windows=99).shape == (4, 5)
    assert eval_windows(ids, 23).shape == (1, 23)


def test_eval_windows_too_short():
    with pytest.raises(InputError, match="4 tokens"):
        eval_windows(np.arange(4), 5)
    with pytest.raises(InputError):
        eval_windows(np.arange(10), 5, max_windows=0)


def _calib_ids(n: int = 100) -> np.ndarray:
    return np.arange(1000, 1000 + n, dtype=np.int64)


def test_calib_windows_are_aligned_disjoint_and_deterministic():
    ids = _calib_ids(103)  # 10 slots of 10, tail of 3
    a, b, c = calib_windows(ids, 10, (4, 3, 2), seed=7)
    assert a.shape == (4, 10) and b.shape == (3, 10) and c.shape == (2, 10)
    starts = []
    for win in np.concatenate([a, b, c]):
        start = int(win[0]) - 1000
        assert start % 10 == 0 and start + 10 <= 100  # aligned slot, never the tail
        assert np.array_equal(win, ids[start : start + 10])
        starts.append(start)
    assert len(set(starts)) == len(starts) == 9  # no window used twice, across all sets
    for s in (a, b, c):  # each set in text order
        assert list(s[:, 0]) == sorted(s[:, 0])
    again = calib_windows(ids, 10, (4, 3, 2), seed=7)
    for x, y in zip((a, b, c), again):
        assert np.array_equal(x, y)


def test_calib_windows_seed_changes_choice():
    ids = _calib_ids(1000)
    picks = {tuple(calib_windows(ids, 10, (5,), seed=s)[0][:, 0]) for s in range(5)}
    assert len(picks) > 1


def test_calib_windows_can_use_every_slot():
    ids = _calib_ids(40)
    (a, b) = calib_windows(ids, 10, (2, 2), seed=0)
    assert sorted(np.concatenate([a, b])[:, 0].tolist()) == [1000, 1010, 1020, 1030]


def test_calib_windows_not_enough_tokens():
    with pytest.raises(InputError, match="3 windows of 10, 4 needed"):
        calib_windows(_calib_ids(39), 10, (2, 2), seed=0)


def test_calib_text_refuses_test_split(tmp_path):
    with pytest.raises(InputError, match="test split"):
        calib_text(split="test")
    path = tmp_path / "t.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(InputError):
        calib_text(path=str(path), split="test")


def test_embedded_texts():
    ev = eval_text()
    ca = calib_text()
    assert ev.label == f"embedded:{EMBEDDED_EVAL}" and ca.label == f"embedded:{EMBEDDED_CALIB}"
    assert len(ev.text) > 10_000 and len(ca.text) > 10_000
    assert ev.text != ca.text
    assert "\n\n" in ev.text


def test_calib_text_from_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("plain calibration text\n", encoding="utf-8")
    src = calib_text(path=str(path))
    assert src.text == "plain calibration text\n" and src.label == f"file:{path}"


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        _read(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="is a folder"):
        _read(str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        eval_text(path=str(tmp_path / "missing.raw"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match="UTF-8"):
        _read(str(bad))


def test_unknown_dataset_is_an_input_error():
    with pytest.raises(InputError, match="unknown dataset"):
        eval_text(dataset="ptb")
