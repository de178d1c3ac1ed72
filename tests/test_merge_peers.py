"""benchmarks/merge_peers.py: a peers table read back as the command wrote it, and runs merged with
the later source winning."""
from __future__ import annotations

import json

from benchmarks import merge_peers, peers


def _point(name, tool, mb, blocks_mb, ppl, **extra):
    target = {"qublast": "jetson" if "jetson" in name else "cpu", "fp": "jetson" if name == "fp16" else "cpu"}.get(tool)
    params = {"target": target, "flags": ["--uniform", "w4"]} if target else {"algo": "default"}
    return {"name": name, "tool": tool, "params": params, "bytes": int(mb * 1e6), "bytes_blocks": int(blocks_mb * 1e6),
            "ppl": ppl, **extra}


def _not_made(name, tool, kind, reason):
    params = {"target": "jetson" if "jetson" in name else "cpu", "flags": []} if tool == "qublast" else {"method": "x"}
    return {"name": name, "tool": tool, "params": params, kind: reason}


RUN = {"identity": {"model": "m", "text": "t", "windows": 40, "seqlen": 512}, "points": {
    "fp32": _point("fp32", "fp", 538.3, 424.7, 36.8545, seconds=552.0, prefill_ms_t1=2224.6, prefill_ms_t2=1345.2,
                   decode_ms_t1=40.4, decode_ms_t2=28.4),
    "fp16": _point("fp16", "fp", 269.3, 212.3, 36.8534, peak_rss_mb=3202.0, ppl_whole=30.1234),
    "qublast-cpu-ppl5": _point("qublast-cpu-ppl5", "qublast", 116.0, 85.4, 38.0303),
    "qublast-jetson-ppl5": _point("qublast-jetson-ppl5", "qublast", 186.1, 129.1, 38.2324),
    "ort-rtn-asym-b32": _point("ort-rtn-asym-b32", "ort", 181.7, 68.0, 51.3303),
    "ort-hqq-b32": _point("ort-hqq-b32", "ort", 193.3, 79.6, 47.0421),
    "modelopt-awqlite": _not_made("modelopt-awqlite", "modelopt", "skipped", "no venv"),
    "qublast-jetson-size30": _not_made("qublast-jetson-size30", "qublast", "infeasible", "size budget 0.3 x fp16"),
}}


def _rows(table: str) -> list[str]:
    return [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]


def test_a_table_reads_back_as_written():
    table = peers.summary_table(RUN)
    back = merge_peers.from_markdown("notes\n\n" + table + "\nmore notes\n")
    assert set(back) == set(RUN["points"])
    for name, r in RUN["points"].items():
        for key, value in r.items():
            if key in ("bytes", "bytes_blocks"):
                assert abs(back[name][key] - value) <= 50_000, (name, key)  # the table's 0.1 MB
            elif key != "params":
                assert back[name][key] == value, (name, key)
        if "target" in r["params"]:
            assert back[name]["params"]["target"] == r["params"]["target"], name
    assert _rows(peers.summary_table({"points": back})) == _rows(table)  # the same rows in the same order
    # a table whose block-linear cell is "-" (a point measured before they were counted) reads back without it
    older = {**RUN, "points": {**RUN["points"], "ort-rtn-asym-b32": {
        k: v for k, v in RUN["points"]["ort-rtn-asym-b32"].items() if k != "bytes_blocks"}}}
    again = merge_peers.from_markdown(peers.summary_table(older))
    assert "bytes_blocks" not in again["ort-rtn-asym-b32"] and again["ort-rtn-asym-b32"]["ppl"] == 51.3303
    assert "| ort-rtn-asym-b32 | 181.7 (-) | 51.3303 |" in peers.frontier_table({"points": again})


def test_runs_merge_the_later_source_winning(tmp_path, capsys):
    md = tmp_path / "old.md"
    md.write_text("# earlier\n" + peers.summary_table(RUN))
    newer = {**RUN, "points": {"qublast-jetson-ppl5": _point("qublast-jetson-ppl5", "qublast", 180.8, 123.8, 38.2085)}}
    (tmp_path / "new.json").write_text(json.dumps(newer))
    out = tmp_path / "merged"
    assert merge_peers.main(["--out", str(out), f"{md}:2", str(tmp_path / "new.json")]) == 0
    merged = json.loads((out / "results.json").read_text())["points"]
    assert merged["qublast-jetson-ppl5"]["ppl"] == 38.2085 and merged["qublast-cpu-ppl5"]["ppl"] == 38.0303
    assert "| qublast-jetson-ppl5 | qublast | 180.8 |" in (out / "results.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "new.json", "old.md"]  # no staging folder left

    capsys.readouterr()
    other = {**newer, "identity": {**RUN["identity"], "windows": 20}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    for argv, message in (([str(md)], "exists"),
                          ([str(tmp_path / "new.json"), str(tmp_path / "other.json")], "another model"),
                          ([f"{md}:0"], "LINE counts from 1"),
                          ([str(tmp_path / "nope.md")], "is not a file"),
                          ([f"{md}:99"], "no peers table")):
        target = out if message == "exists" else tmp_path / "x"
        assert merge_peers.main(["--out", str(target), *argv]) == 2, message
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
