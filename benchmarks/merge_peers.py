"""Merge the results of several `python -m benchmarks.peers` runs on one checkpoint into one table
and one Pareto plot (the same renderers the command uses).

    python -m benchmarks.merge_peers --out DIR SOURCE [SOURCE ...]

A SOURCE is a run's ``results.json`` or a markdown table the command wrote (``results.md``, or its
copy in docs/results.md, read from the first line of the table on); a point named in a later source
replaces the earlier one. Sizes read from a markdown table are its rounded MB. The sources must be
for the same checkpoint and text (the results.json ones are checked against each other)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.peers import _write_json, write_reports

HEADER = "| point | tool | MB deployed |"


def from_markdown(text: str, start: int = 1) -> dict:
    """The points of the first summary table at or after line ``start`` (1-based)."""
    lines = text.splitlines()[start - 1:]
    try:
        first = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    except StopIteration:
        raise ValueError(f"no peers table (a line starting {HEADER!r})") from None
    names = [c.strip() for c in lines[first].strip("|").split("|")]
    points = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(names, (c.strip() for c in line.strip().strip("|").split("|"))))
        name, tool, size = cells["point"], cells["tool"], cells["MB deployed"]
        for kind in ("skipped", "infeasible"):
            if size.startswith(kind + ": "):
                points[name] = {"name": name, "tool": tool, "params": {}, kind: size.removeprefix(kind + ": ")}
                break
        else:
            target = "jetson" if name.startswith("qublast-jetson") or name == "fp16" else "cpu"
            r = {"name": name, "tool": tool, "params": {"target": target}, "bytes": round(float(size) * 1e6),
                 "bytes_blocks": round(float(cells["block linears MB"]) * 1e6), "ppl": float(cells["PPL (ORT)"])}
            for key, column in (("prefill_ms", "prefill-512 ms (1t / 2t)"), ("decode_ms", "decode ms/token (1t / 2t)")):
                for threads, value in zip((1, 2), cells.get(column, "- / -").split(" / ")):
                    if value.strip() != "-":
                        r[f"{key}_t{threads}"] = float(value)
            if cells.get("whole split PPL", "-") != "-":
                r["ppl_whole"] = float(cells["whole split PPL"])
            if cells.get("s to make", "-") != "-":
                r["seconds"] = float(cells["s to make"])
            if cells.get("peak RSS MB", "-") != "-":
                r["peak_rss_mb"] = float(cells["peak RSS MB"])
            points[name] = r
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge_peers", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json, results.md and pareto.png (must not exist)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="results.json, or FILE.md[:LINE] (the table at or after LINE)")
    args = p.parse_args(argv)
    out = Path(args.out)
    merged, identity = {}, None
    try:
        if out.exists():
            raise ValueError(f"--out {out} exists: give a new folder")
        for source in args.sources:
            path, _, line = source.rpartition(":") if source.rpartition(":")[2].isdigit() else (source, "", "")
            if not Path(path).is_file():
                raise ValueError(f"{path} is not a file")
            if path.endswith(".json"):
                run = json.loads(Path(path).read_text(encoding="utf-8"))
                if identity and run["identity"] != identity:
                    raise ValueError(f"{path} is for another model, text or window count")
                identity = run["identity"]
                merged.update(run["points"])
            else:
                merged.update(from_markdown(Path(path).read_text(encoding="utf-8"), int(line or 1)))
    except ValueError as exc:
        print(f"merge_peers: error: {exc}", file=sys.stderr)
        return 2
    results = {"identity": identity, "points": merged}
    out.mkdir(parents=True)
    _write_json(out / "results.json", results)
    print(write_reports(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
