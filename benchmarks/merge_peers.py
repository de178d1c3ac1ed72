"""Merge the results of several `python -m benchmarks.peers` runs on one checkpoint into one table
and one Pareto plot (the same renderers the command uses).

    python -m benchmarks.merge_peers --out DIR SOURCE [SOURCE ...]

A SOURCE is a run's ``results.json`` or a markdown table the command wrote (``results.md``, or its
copy in docs/results.md: ``FILE.md:LINE`` reads the first table at or after LINE); a point named in
a later source replaces the earlier one. Sizes read from a markdown table are its rounded MB. The
sources must be for the same checkpoint and text (the results.json ones are checked against each
other)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.peers import _write_json, write_reports

HEADER = "| point | tool | MB deployed |"
OPTIONAL = {"block linears MB": ("bytes_blocks", 1e6), "whole split PPL": ("ppl_whole", 1), "s to make": ("seconds", 1),
            "peak RSS MB": ("peak_rss_mb", 1)}


def _params(name: str, tool: str) -> dict:
    """What the table does not show of a point's parameters: QuBLAST's and the fp graphs' target."""
    if tool == "qublast":
        return {"target": "jetson" if name.startswith("qublast-jetson") else "cpu"}
    if tool == "fp":
        return {"target": "jetson" if name == "fp16" else "cpu"}
    return {}


def from_markdown(text: str, start: int = 1) -> dict:
    """The points of the first summary table at or after line ``start`` (1-based)."""
    lines = text.splitlines()[start - 1:]
    try:
        first = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    except StopIteration:
        raise ValueError(f"no peers table (a line starting {HEADER!r}) at or after line {start}") from None
    names = [c.strip() for c in lines[first].strip().strip("|").split("|")]
    points = {}
    for number, line in enumerate(lines[first + 2:], start + first + 2):
        if not line.startswith("|"):
            break
        cells = dict(zip(names, (c.strip() for c in line.strip().strip("|").split("|"))))
        name, tool, size = cells["point"], cells["tool"], cells["MB deployed"]
        r = {"name": name, "tool": tool, "params": _params(name, tool)}
        kind = next((k for k in ("skipped", "infeasible") if size.startswith(k + ": ")), None)
        try:
            if kind:
                r[kind] = size.removeprefix(kind + ": ")
            else:
                r.update(bytes=round(float(size) * 1e6), ppl=float(cells["PPL (ORT)"]))
                for column, (key, scale) in OPTIONAL.items():
                    if cells.get(column, "-") != "-":
                        r[key] = round(float(cells[column]) * scale) if scale != 1 else float(cells[column])
                for key, column in (("prefill_ms", "prefill-512 ms (1t / 2t)"), ("decode_ms", "decode ms/token (1t / 2t)")):
                    for threads, value in zip((1, 2), cells.get(column, "- / -").split(" / ")):
                        if value.strip() != "-":
                            r[f"{key}_t{threads}"] = float(value)
        except ValueError as exc:
            raise ValueError(f"line {number} ({name}): {exc}") from None
        points[name] = r
    return points


def _source(text: str) -> tuple[Path, int | None]:
    """``FILE`` or ``FILE.md:LINE`` (a file whose own name ends in ``:digits`` is taken whole)."""
    path, _, line = text.rpartition(":")
    if Path(text).is_file() or not line.isdigit():
        return Path(text), None
    if int(line) < 1:
        raise ValueError(f"{text}: LINE counts from 1")
    return Path(path), int(line)


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
            path, line = _source(source)
            if not path.is_file():
                raise ValueError(f"{path} is not a file")
            if path.suffix == ".json":
                if line is not None:
                    raise ValueError(f"{source}: a line is read from a markdown table only")
                run = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(run, dict) or "identity" not in run or "points" not in run:
                    raise ValueError(f"{path} is not a results.json of python -m benchmarks.peers")
                if identity and run["identity"] != identity:
                    raise ValueError(f"{path} is for another model, text or window count")
                identity = run["identity"]
                merged.update(run["points"])
            else:
                try:
                    merged.update(from_markdown(path.read_text(encoding="utf-8"), line or 1))
                except ValueError as exc:
                    raise ValueError(f"{path}: {exc}") from None
    except ValueError as exc:
        print(f"merge_peers: error: {exc}", file=sys.stderr)
        return 2
    results = {"identity": identity, "points": merged}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # this command's own: removed if it fails
    try:
        _write_json(tmp / "results.json", results)
        table = write_reports(results, tmp)
        os.replace(tmp, out)  # all three files, or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

