"""The sensitivity journal: resume, set aside another run's journal, drop a line cut by a kill."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qublast.arch import ArchSpec, LinearGroup
from qublast.blocks import Score
from qublast.formats import get_target
from qublast.sensitivity import (
    _FIELD_TYPES,
    JOURNAL_VERSION,
    Sensitivity,
    _read_journal,
    sweep,
)

FP = "fp-abc"
CPU = get_target("cpu")


def _header(fingerprint: str = FP, version: int = JOURNAL_VERSION) -> str:
    return json.dumps({"version": version, "fingerprint": fingerprint}) + "\n"


def _entry(block: int, fmt: str, dce: float, kl: float) -> str:
    return json.dumps({"block": block, "format": fmt, "dce": dce, "kl": kl}) + "\n"


def test_missing_journal_is_created_empty(tmp_path):
    path = tmp_path / "deep" / "dir" / "sens.jsonl"
    assert _read_journal(path, FP) == {}
    assert path.is_file() and path.read_text() == ""


def test_entries_are_parsed(tmp_path):
    path = tmp_path / "sens.jsonl"
    text = _header() + _entry(0, "w8", 0.01, 0.02) + _entry(0, "w4", 0.1, 0.2) + _entry(1, "w8", -0.003, 0.001)
    path.write_text(text)
    done = _read_journal(path, FP)
    assert done == {
        (0, "w8"): Sensitivity(0, "w8", 0.01, 0.02),
        (0, "w4"): Sensitivity(0, "w4", 0.1, 0.2),
        (1, "w8"): Sensitivity(1, "w8", -0.003, 0.001),
    }
    assert path.read_text() == text  # untouched
    assert not path.with_suffix(".stale").exists()


def test_header_only_gives_nothing_done(tmp_path):
    path = tmp_path / "sens.jsonl"
    path.write_text(_header())
    assert _read_journal(path, FP) == {}
    assert path.read_text() == _header()


def test_truncated_last_line_is_dropped(tmp_path):
    path = tmp_path / "sens.jsonl"
    good = _header() + _entry(0, "w8", 0.01, 0.02)
    path.write_text(good + _entry(0, "w4", 0.1, 0.2)[:17])  # killed mid-write
    done = _read_journal(path, FP)
    assert list(done) == [(0, "w8")]
    assert path.read_text() == good  # the cut line is gone before anything is appended


def _assert_set_aside(path, old_text):
    stale = path.with_suffix(".stale")
    assert stale.read_text() == old_text
    assert path.exists() and path.read_text() == ""


def test_fingerprint_mismatch_moves_journal_to_stale(tmp_path):
    path = tmp_path / "sens.jsonl"
    old = _header("other-run") + _entry(0, "w8", 0.01, 0.02)
    path.write_text(old)
    assert _read_journal(path, FP) == {}
    _assert_set_aside(path, old)


def test_version_mismatch_moves_journal_to_stale(tmp_path):
    path = tmp_path / "sens.jsonl"
    old = _header(version=JOURNAL_VERSION + 1) + _entry(0, "w8", 0.01, 0.02)
    path.write_text(old)
    assert _read_journal(path, FP) == {}
    _assert_set_aside(path, old)


def test_garbled_header_moves_journal_to_stale(tmp_path):
    path = tmp_path / "sens.jsonl"
    old = "this is not json\n" + _entry(0, "w8", 0.01, 0.02)
    path.write_text(old)
    assert _read_journal(path, FP) == {}
    _assert_set_aside(path, old)


def test_header_cut_by_a_kill_starts_afresh(tmp_path):
    path = tmp_path / "sens.jsonl"
    path.write_text(_header()[:10])
    assert _read_journal(path, FP) == {}
    assert path.read_text() == ""


@pytest.mark.parametrize("damaged", [
    b"[1, 2]\n",  # a header that is JSON but not an object
    b"\xff\xfe not utf-8\n",
    _header().encode() + b'{"block": "3", "format": "w8", "dce": 0.1, "kl": 0.1}\n',  # a block name no unit has
    _header().encode() + b'{"block": 0, "format": "w8", "dce": "0.1", "kl": 0.1}\n',  # a number as a string
    _header().encode() + b'{"block": 0, "format": "w8", "dce": true, "kl": 0.1}\n',
    _header().encode() + b'{"block": 0, "format": "w8", "dce": 0.1, "kl": 0.1, "extra": 1}\n',
    _header().encode() + b'{"block": 0, "format": "w8", "dce": 0.1}\n',  # a field missing
    _header().encode() + b'[0, "w8", 0.1, 0.1]\n',
])
def test_damaged_journal_is_set_aside(tmp_path, damaged):
    path = tmp_path / "sens.jsonl"
    path.write_bytes(damaged)
    said = []
    assert _read_journal(path, FP, said.append) == {}
    assert said == [f"journal {path} is damaged or another run's: set aside as sens.stale (replacing an earlier one), "
                    f"measuring again"]
    assert path.with_suffix(".stale").read_bytes() == damaged and path.read_bytes() == b""


def test_every_field_has_a_checked_type():
    assert {f.name for f in dataclasses.fields(Sensitivity)} == set(_FIELD_TYPES)


def test_truncated_codes_file_is_measured_again(tmp_path):
    from safetensors.torch import save_file

    codes = tmp_path / "sens.codes" / "0-w4.safetensors"
    codes.parent.mkdir()
    save_file({"lin.q": torch.zeros(8, 32, dtype=torch.int8), "lin.scale": torch.ones(8, 1)}, str(codes))
    path = tmp_path / "sens.jsonl"
    row = {"block": 0, "format": "w4", "dce": 0.1, "kl": 0.1, "quantizer": "gptq", "codes_file": str(codes)}
    path.write_text(_header() + json.dumps(row) + "\n" + _entry(1, "w4", 0.2, 0.2))
    assert set(_read_journal(path, FP)) == {(0, "w4"), (1, "w4")}
    codes.write_bytes(codes.read_bytes()[:-40])  # a kill or a full disk cut it
    assert set(_read_journal(path, FP)) == {(1, "w4")}  # block 0 is measured again, the rest kept


# ---- sweep with a stand-in runner (no model): the journal is written and resumed ----------

class FakeRunner:
    """Duck-typed BlockRunner: blocks are single Linear layers, 'CE' is the mean square of the output."""

    def __init__(self, blocks: int = 3, width: int = 32):
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"lin": torch.nn.Linear(width, width, bias=False)})
                                          for _ in range(blocks))
        self.spec = ArchSpec("fake", groups=(LinearGroup(("lin",)),))
        self.first_hidden = torch.randn(2, 4, width)  # [N, S, H]
        self.fp_score = self.score(self.run_from(0, self.first_hidden))

    @torch.no_grad()
    def run_block(self, index, hidden):
        return self.layers[index]["lin"](hidden)

    def run_from(self, index, hidden):
        for i in range(index, len(self.layers)):
            hidden = self.run_block(i, hidden)
        return hidden

    def score(self, hidden):
        return Score(ce=float(hidden.pow(2).mean()), kl=float(hidden.abs().mean()))


def _reference(runner, table, fmt_names):
    """dCE of every (block, format) measured directly with the journaled transform, without the journal."""
    from qublast.apply import block_transformed

    out = {}
    hidden = runner.first_hidden
    for i in range(len(runner.layers)):
        for f in fmt_names:
            with block_transformed(runner.layers[i], runner.spec, table[i][f].transform(CPU)):
                score = runner.score(runner.run_from(i + 1, runner.run_block(i, hidden)))
            out[(i, f)] = score.ce - runner.fp_score.ce
        hidden = runner.run_block(i, hidden)
    return out


def test_sweep_writes_and_resumes_journal(tmp_path, monkeypatch):
    runner = FakeRunner()
    path = tmp_path / "sens.jsonl"
    table = sweep(runner, CPU, ("fp16", "w8", "w4"), journal=path, fingerprint=FP, quantizers=("rtn",), estimate="full")[0]
    ref = _reference(runner, table, ("w8", "w4"))
    assert len(table) == 3
    for i, row in enumerate(table):
        assert row["fp16"] == Sensitivity(i, "fp16", 0.0, 0.0, block_err_unscaled=0.0, dce_unscaled=0.0, kl_unscaled=0.0)
        for f in ("w8", "w4"):
            assert row[f].dce == ref[(i, f)]
            assert row[f].alpha == {}  # no foldable group in the fake block: no folds (clipping may still use the map)
            assert row[f].block_err <= row[f].block_err_unscaled
            assert row[f].dce <= row[f].dce_unscaled  # the map is kept only where it lowers dCE
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"version": JOURNAL_VERSION, "fingerprint": FP}
    assert len(lines) == 1 + 6

    # resume: nothing is measured again, the table is the same
    import qublast.sensitivity as sens

    calls = []
    real = sens._measure

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sens, "_measure", counting)
    assert sweep(runner, CPU, ("fp16", "w8", "w4"), journal=path, fingerprint=FP, quantizers=("rtn",), estimate="full")[0] == table
    assert calls == []
    assert len(path.read_text().splitlines()) == 7

    # a cut last line: only that run is measured again
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + lines[-1][:9])
    assert sweep(runner, CPU, ("fp16", "w8", "w4"), journal=path, fingerprint=FP, quantizers=("rtn",), estimate="full")[0] == table
    assert len(calls) == 1

    def without_times(journal_text):
        rows = [json.loads(line) for line in journal_text.splitlines()]
        return [{k: v for k, v in row.items() if k not in ("seconds", "gptq_seconds")} for row in rows]

    assert without_times(path.read_text()) == without_times(text)  # the same entries (wall times differ)
    text = path.read_text()

    # another fingerprint: everything measured again, old journal kept as .stale
    calls.clear()
    assert sweep(runner, CPU, ("fp16", "w8", "w4"), journal=path, fingerprint="new", quantizers=("rtn",), estimate="full")[0] == table
    assert len(calls) == 6
    assert path.with_suffix(".stale").read_text() == text
    assert json.loads(path.read_text().splitlines()[0])["fingerprint"] == "new"
