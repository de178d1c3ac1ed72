"""The sensitivity sweep resumes from its journal after a kill, re-measuring nothing it has."""
from __future__ import annotations

import torch

from qublast import sensitivity
from qublast.arch import arch_for
from qublast.blocks import BlockRunner
from tests.tiny import VOCAB, tiny_model


def _runner():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return BlockRunner(model, arch_for("llama"), ids)


def test_sweep_resumes_after_kill(tmp_path, monkeypatch):
    runner, journal = _runner(), tmp_path / "sens.jsonl"
    full = sensitivity.sweep(runner, ("fp16", "w8", "w4"), journal=journal, fingerprint="abc")
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 2 * 2  # header + blocks x quantized formats
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed mid-line after two entries
    calls = []
    original = sensitivity._measure

    def counting(runner, index, hidden, name, **kwargs):
        calls.append((index, name))
        return original(runner, index, hidden, name, **kwargs)

    monkeypatch.setattr(sensitivity, "_measure", counting)
    resumed = sensitivity.sweep(runner, ("fp16", "w8", "w4"), journal=journal, fingerprint="abc")
    assert sorted(calls) == [(1, "w4"), (1, "w8")]  # only the two missing measurements
    assert resumed == full
    assert len(journal.read_text().splitlines()) == 5


def test_other_fingerprint_starts_over(tmp_path):
    runner, journal = _runner(), tmp_path / "sens.jsonl"
    sensitivity.sweep(runner, ("fp16", "w8"), journal=journal, fingerprint="one")
    sensitivity.sweep(runner, ("fp16", "w8"), journal=journal, fingerprint="two")
    assert (tmp_path / "sens.stale").is_file()
    assert '"two"' in journal.read_text().splitlines()[0]
