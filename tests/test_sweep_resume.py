"""The sensitivity sweep resumes from its journal after a kill, re-measuring nothing it has."""
from __future__ import annotations

import torch

from qublast import sensitivity
from qublast.arch import arch_for
from qublast.blocks import BlockRunner
from qublast.formats import get_target
from tests.tiny import VOCAB, tiny_model

CPU = get_target("cpu")
VOCAB_UNITS = {"embed": ("fp16", "w8"), "lm_head": ("fp16", "w4")}


def _runner():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return BlockRunner(model, arch_for("llama"), ids)


def test_sweep_resumes_after_kill(tmp_path, monkeypatch):
    runner, journal = _runner(), tmp_path / "sens.jsonl"
    full = sensitivity.sweep(runner, CPU, ("fp16", "w8", "w4"), journal=journal, fingerprint="abc", vocab=VOCAB_UNITS,
                             quantizers=("rtn",), estimate="full")
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 + 2  # header + blocks x quantized formats + embedding w8 + lm_head w4
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed mid-line after two entries
    calls = []
    original, original_vocab = sensitivity._measure, sensitivity._measure_vocab

    def counting(runner, index, hidden, fmt, **kwargs):
        calls.append((index, fmt.name))
        return original(runner, index, hidden, fmt, **kwargs)

    def counting_vocab(runner, target, unit, name, importance, **kwargs):
        calls.append((unit, name))
        return original_vocab(runner, target, unit, name, importance, **kwargs)

    monkeypatch.setattr(sensitivity, "_measure", counting)
    monkeypatch.setattr(sensitivity, "_measure_vocab", counting_vocab)
    resumed = sensitivity.sweep(runner, CPU, ("fp16", "w8", "w4"), journal=journal, fingerprint="abc", vocab=VOCAB_UNITS,
                                quantizers=("rtn",), estimate="full")
    assert sorted(calls, key=str) == sorted([(1, "w4"), (1, "w8"), ("embed", "w8"), ("lm_head", "w4")], key=str)
    assert resumed == full
    assert len(journal.read_text().splitlines()) == 7


def test_other_fingerprint_starts_over(tmp_path):
    runner, journal = _runner(), tmp_path / "sens.jsonl"
    sensitivity.sweep(runner, CPU, ("fp16", "w8"), journal=journal, fingerprint="one", quantizers=("rtn",), estimate="full")
    sensitivity.sweep(runner, CPU, ("fp16", "w8"), journal=journal, fingerprint="two", quantizers=("rtn",), estimate="full")
    assert (tmp_path / "sens.stale").is_file()
    assert '"two"' in journal.read_text().splitlines()[0]
