"""Sensitivity sweep: how much CE rises when only one block is quantized (DESIGN.md).

For block i and each candidate format: run block i quantized and blocks i+1..L in fp from
the cached fp input of block i; record dCE and KL to the fp logits; then advance the cached
hidden state through fp block i. Each result is appended to a journal (JSON lines) as soon as
it is measured; a rerun with the same fingerprint skips what the journal already holds.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .apply import block_quantized
from .blocks import BlockRunner
from .formats import get_format

JOURNAL_VERSION = 1


@dataclass(frozen=True)
class Sensitivity:
    """dCE (nats/token) and KL (nats/token) of quantizing one block alone."""

    block: int
    format: str
    dce: float
    kl: float


def sweep(runner: BlockRunner, candidates: tuple[str, ...], *, journal: Path, fingerprint: str) -> list[dict[str, Sensitivity]]:
    """Measure every (block, candidate); returns one ``{format: Sensitivity}`` per block."""
    done = _read_journal(journal, fingerprint)
    layers = runner.layers
    todo = [(i, f) for i in range(len(layers)) for f in candidates if f != "fp16" and (i, f) not in done]
    hidden = runner.first_hidden
    bar = tqdm(total=len(todo), desc="sensitivity", unit="run", file=sys.stderr, disable=not todo)
    with open(journal, "a", encoding="utf-8") as log:
        if journal.stat().st_size == 0:
            _write(log, {"version": JOURNAL_VERSION, "fingerprint": fingerprint})
        for index in range(len(layers)):
            for name in candidates:
                if name == "fp16" or (index, name) in done:
                    continue
                with block_quantized(layers[index], runner.spec, get_format(name)):
                    out = runner.run_block(index, hidden)
                score = runner.score(runner.run_from(index + 1, out))
                done[(index, name)] = Sensitivity(index, name, score.ce - runner.fp_score.ce, score.kl)
                _write(log, done[(index, name)].__dict__)
                bar.update(1)
            if index + 1 < len(layers):
                hidden = runner.run_block(index, hidden)
    bar.close()
    table = []
    for index in range(len(layers)):
        row = {"fp16": Sensitivity(index, "fp16", 0.0, 0.0)}
        row.update({f: done[(index, f)] for f in candidates if f != "fp16"})
        table.append(row)
    return table


def _read_journal(path: Path, fingerprint: str) -> dict[tuple[int, str], Sensitivity]:
    """Entries of a journal written for ``fingerprint``; another run's journal is set aside."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return {}
    raw = path.read_text(encoding="utf-8")
    if raw and not raw.endswith("\n"):  # a line cut by a kill: drop it before appending
        raw = raw[: raw.rfind("\n") + 1]
        path.write_text(raw, encoding="utf-8")
    lines = raw.splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != fingerprint or header.get("version") != JOURNAL_VERSION:
        os.replace(path, path.with_suffix(".stale"))
        path.touch()
        return {}
    done = {}
    try:
        for line in lines[1:]:
            entry = Sensitivity(**json.loads(line))
            done[(entry.block, entry.format)] = entry
    except (json.JSONDecodeError, TypeError):  # damaged inside: set it aside, measure again
        os.replace(path, path.with_suffix(".stale"))
        path.touch()
        return {}
    return done


def _write(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()
    os.fsync(log.fileno())
