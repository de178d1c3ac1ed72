"""benchmarks/merge_peers.py: a peers table read back as the command wrote it, and runs merged with
the later source winning."""
from __future__ import annotations

import json

from benchmarks import merge_peers, peers


def _point(name, tool, target, mb, blocks_mb, ppl, **extra):
    return {"name": name, "tool": tool, "params": {"target": target}, "bytes": int(mb * 1e6), "bytes_blocks": int(blocks_mb * 1e6),
            "ppl": ppl, **extra}


RUN = {"identity": {"model": "m", "text": "t", "windows": 40, "seqlen": 512}, "points": {
    "fp32": _point("fp32", "fp", "cpu", 538.3, 424.7, 36.8545, seconds=552.0, prefill_ms_t1=2224.6, prefill_ms_t2=1345.2,
                   decode_ms_t1=40.4, decode_ms_t2=28.4),
    "fp16": _point("fp16", "fp", "jetson", 269.3, 212.3, 36.8534, peak_rss_mb=3202.0, ppl_whole=30.1234),
    "qublast-cpu-ppl5": _point("qublast-cpu-ppl5", "qublast", "cpu", 116.0, 85.4, 38.0303),
    "qublast-jetson-ppl5": _point("qublast-jetson-ppl5", "qublast", "jetson", 186.1, 129.1, 38.2324),
    "ort-rtn-asym-b32": _point("ort-rtn-asym-b32", "ort", "cpu", 181.7, 68.0, 51.3303),
    "modelopt-awqlite": {"name": "modelopt-awqlite", "tool": "modelopt", "params": {}, "skipped": "no venv"},
    "qublast-jetson-size30": {"name": "qublast-jetson-size30", "tool": "qublast", "params": {}, "infeasible": "size budget 0.3 x fp16"},
}}


def test_a_table_reads_back_as_written():
    back = merge_peers.from_markdown("notes\n\n" + peers.summary_table(RUN) + "\nmore notes\n")
    assert set(back) == set(RUN["points"])
    for name, r in RUN["points"].items():
        for key, value in r.items():
            if key in ("bytes", "bytes_blocks"):
                assert abs(back[name][key] - value) <= 50_000, (name, key)  # the table's 0.1 MB
            elif key != "params":
                assert back[name][key] == value, (name, key)
    assert back["qublast-jetson-ppl5"]["params"]["target"] == "jetson" and back["qublast-cpu-ppl5"]["params"]["target"] == "cpu"


def test_runs_merge_the_later_source_winning(tmp_path, capsys):
    md = tmp_path / "old.md"
    md.write_text("# earlier\n" + peers.summary_table(RUN))
    newer = {**RUN, "points": {"qublast-jetson-ppl5": _point("qublast-jetson-ppl5", "qublast", "jetson", 180.8, 123.8, 38.2085)}}
    (tmp_path / "new.json").write_text(json.dumps(newer))
    out = tmp_path / "merged"
    assert merge_peers.main(["--out", str(out), f"{md}:2", str(tmp_path / "new.json")]) == 0
    merged = json.loads((out / "results.json").read_text())["points"]
    assert merged["qublast-jetson-ppl5"]["ppl"] == 38.2085 and merged["qublast-cpu-ppl5"]["ppl"] == 38.0303
    assert "| qublast-jetson-ppl5 | qublast | 180.8 |" in (out / "results.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0
    capsys.readouterr()
    assert merge_peers.main(["--out", str(out), str(md)]) == 2  # never over an existing folder
    assert "exists" in capsys.readouterr().err
    assert merge_peers.main(["--out", str(tmp_path / "x"), str(tmp_path / "nope.md")]) == 2
    assert not (tmp_path / "x").exists()
