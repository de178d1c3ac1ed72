"""Evaluation and calibration text, tokenized into fixed-length windows.

Evaluation follows DESIGN.md: WikiText-2 raw test rows joined with "\\n\\n", tokenized once,
cut into non-overlapping windows. Calibration takes seeded random windows from train or
validation text, never from the test split.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from runtime.perplexity import wikitext_rows_to_text
from runtime.perplexity import windows as text_windows

from .errors import InputError

EVAL_SEQLEN = 512  # the evaluation's window length (DESIGN.md protocol; --seqlen)
WIKITEXT_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1"),
}
EMBEDDED_EVAL = "wikitext2_test_excerpt.raw"
EMBEDDED_CALIB = "wikitext2_valid_excerpt.txt"


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from: a file, a hub dataset name, or a file shipped with QuBLAST."""

    label: str
    text: str


def eval_text(*, path: str | None = None, dataset: str | None = None) -> TextSource:
    """Evaluation text: a WikiText-format file, a WikiText dataset's test split, or the embedded excerpt."""
    if path:
        lines = _read(path).splitlines(keepends=True)
        return TextSource(f"file:{path}", wikitext_rows_to_text(lines))
    if dataset:
        rows = _load_dataset_rows(dataset, "test")
        return TextSource(f"{dataset}:test", "\n\n".join(rows))
    lines = _embedded(EMBEDDED_EVAL).splitlines(keepends=True)
    return TextSource(f"embedded:{EMBEDDED_EVAL}", wikitext_rows_to_text(lines))


def calib_text(*, path: str | None = None, dataset: str | None = None, split: str = "validation") -> TextSource:
    """Calibration text: a plain text file, a WikiText dataset's train/validation split, or the embedded excerpt."""
    if split == "test":
        raise InputError("calibration never uses the test split; use train or validation")
    if path:
        return TextSource(f"file:{path}", _read(path))
    if dataset:
        rows = _load_dataset_rows(dataset, split)
        return TextSource(f"{dataset}:{split}", "\n\n".join(rows))
    return TextSource(f"embedded:{EMBEDDED_CALIB}", _embedded(EMBEDDED_CALIB))


# A line of this many characters is a paragraph: two texts sharing such lines share text, not phrases.
PARAGRAPH_CHARS = 80


def paragraphs(text: str) -> set[str]:
    """The text's lines of at least ``PARAGRAPH_CHARS`` characters, whitespace collapsed."""
    lines = (" ".join(line.split()) for line in text.splitlines())
    return {line for line in lines if len(line) >= PARAGRAPH_CHARS}


def check_disjoint(calib: TextSource, evaluation: TextSource) -> None:
    """Refuse calibration text that holds part of the evaluation text (the test split as calibration):
    at least 2 of the evaluation's paragraphs, and at least 1% of them, found in the calibration text."""
    held = paragraphs(evaluation.text)
    shared = len(held & paragraphs(calib.text))
    if shared >= max(2, 0.01 * len(held)):
        raise InputError(f"the calibration text ({calib.label}) holds {shared} of the {len(held)} paragraphs of the "
                         f"evaluation text ({evaluation.label}): calibrating on test text makes every measured PPL "
                         f"look better than it is; calibrate on train or validation text, or pass --allow-test-calibration")


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of the whole text, no special tokens added: int64 [T]."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def eval_windows(ids: np.ndarray, seqlen: int, *, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows from the start: int64 [N, seqlen]; the short tail is dropped."""
    try:
        return text_windows(ids, seqlen, max_windows=max_windows)
    except ValueError:
        raise InputError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}") from None


def check_length(src: TextSource, what: str, windows: int, seqlen: int, needed: str) -> None:
    """Refuse, before any tokenizer runs, a text that cannot give ``windows`` windows of ``seqlen``
    tokens: a token covers at least one byte (byte-level BPE, SentencePiece byte fallback), so
    fewer bytes than tokens needed (beside a few added ones) is too short whatever the tokenizer."""
    size = len(src.text.encode("utf-8"))
    if not src.text.strip():
        raise InputError(f"{what} {src.label} is empty")
    if size + 8 < windows * seqlen:
        raise InputError(f"{what} {src.label} has {size} bytes, fewer than the {windows * seqlen} tokens "
                         f"of {needed}")


def calib_windows(ids: np.ndarray, seqlen: int, counts: tuple[int, ...], *, seed: int) -> tuple[np.ndarray, ...]:
    """Disjoint sets of seeded random non-overlapping windows, one ``[count, seqlen]`` array per count."""
    slots = len(ids) // seqlen
    need = sum(counts)
    if slots < need:
        raise InputError(
            f"calibration text has {len(ids)} tokens: {slots} windows of {seqlen}, {need} needed "
            f"(a longer --calib-text, or fewer --gptq-windows / --holdout-windows / --calib-windows / --reconstruct-windows / --e2e-windows)"
        )
    order = np.random.default_rng(seed).permutation(slots)[:need]
    grid = ids[: slots * seqlen].reshape(slots, seqlen)
    sets, start = [], 0
    for count in counts:
        sets.append(grid[np.sort(order[start : start + count])])
        start += count
    return tuple(sets)


def _read(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"text file {path} is a folder")
    if not p.is_file():
        raise InputError(f"text file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"text file is not UTF-8: {path}") from exc


def embedded_folder() -> Path:
    """The folder of the texts shipped with QuBLAST (an input --out must never replace)."""
    return Path(str(resources.files("qublast.data")))


def _embedded(name: str) -> str:
    return resources.files("qublast.data").joinpath(name).read_text(encoding="utf-8")


def _load_dataset_rows(dataset: str, split: str) -> list[str]:
    if dataset not in WIKITEXT_DATASETS:
        raise InputError(f"unknown dataset {dataset!r}; known: {', '.join(WIKITEXT_DATASETS)}")
    try:
        from datasets import load_dataset  # optional dependency (the datasets extra): only --*-dataset needs it

        return list(load_dataset(*WIKITEXT_DATASETS[dataset], split=split)["text"])
    except Exception as exc:  # the hub may be unreachable: say so in one line
        raise InputError(
            f"cannot load dataset {dataset} ({split}): {exc.__class__.__name__}; pass a text file instead"
        ) from exc
