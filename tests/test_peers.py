"""benchmarks/peers.py on a tiny model: every kind of point made and measured, sizes read from the
files, a rerun that measures nothing twice, and the folders it refuses to touch."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from benchmarks import peers
from tests.conftest import GGUF

DATA = Path(__file__).resolve().parents[1] / "qublast" / "data"
POINTS = ["fp32", "ort-rtn-asym-b32", "ort-rtn-asym-b32-head", "ort-dynamic-int8", "genai-rtn-shared", "qublast-cpu-uniform-w4"]


def _args(model: Path, out: Path, points: list[str]) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--text", str(DATA / "wikitext2_test_excerpt.raw"),
            "--calib-text", str(DATA / "wikitext2_valid_excerpt.txt"), "--windows", "2", "--seqlen", "64",
            "--points", ",".join(points)]


def test_points_are_made_measured_and_resumed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QUBLAST_MODELOPT_PYTHON", raising=False)
    out = tmp_path / "peers"
    assert peers.main(_args(tiny_model_dir, out, [*POINTS, "modelopt-rtndq"])) == 0
    results = json.loads((out / "results.json").read_text())
    pts = results["points"]
    skipped = pts.pop("modelopt-rtndq")  # ModelOpt runs only in its own venv: recorded as skipped, with why
    assert "--modelopt-python" in skipped["skipped"] and not (out / "points" / "modelopt-rtndq").exists()
    assert list(pts) == POINTS
    for name, r in pts.items():
        folder = out / "points" / name
        deployed = {f.name: f.stat().st_size for f in folder.iterdir() if f.name in peers.DEPLOYED}
        assert r["files"] == deployed and r["bytes"] == sum(deployed.values())  # sizes from the files
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["tokens"] == 2 * 63
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
        assert not folder.with_name(name + ".partial").exists()
    fp = pts["fp32"]
    for name in POINTS[1:]:
        assert pts[name]["bytes_blocks"] < fp["bytes_blocks"], name  # every peer stores its block linears smaller
        assert abs(math.log(pts[name]["ppl"] / fp["ppl"])) < 0.2, name  # and computes about the same function
    ours = json.loads((out / "points" / "qublast-cpu-uniform-w4" / "recipe.json").read_text())["metrics"]
    assert pts["qublast-cpu-uniform-w4"]["bytes_blocks"] == ours["size_bytes_blocks"]  # counted as the bundle counts them
    assert pts["ort-rtn-asym-b32"]["bytes_head"] == fp["bytes_head"]  # lm_head left fp32 without "-head"
    assert pts["ort-rtn-asym-b32-head"]["bytes_head"] < fp["bytes_head"] / 4  # and quantized with it (the tied head too)
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in POINTS)
    assert (out / "pareto.png").stat().st_size > 0

    # a rerun measures nothing again; a point killed half way (its .partial folder) is made again
    (out / "points" / "ort-dynamic-int8").rename(out / "points" / "ort-dynamic-int8.partial")
    first = dict(pts)
    del pts["ort-dynamic-int8"]
    del pts["qublast-cpu-uniform-w4"]  # made, then its measurement lost: measured again, not made again
    made = (out / "points" / "qublast-cpu-uniform-w4" / "model.onnx").stat().st_mtime_ns
    (out / "results.json").write_text(json.dumps({**results, "points": {**pts, "modelopt-rtndq": skipped}}))
    capsys.readouterr()
    assert peers.main([*_args(tiny_model_dir, out, POINTS), "--whole-split", "fp32", "--speed"]) == 0
    err = capsys.readouterr().err
    assert f"{len(POINTS)} points, {len(POINTS) - 2} already recorded" in err and "[1/2] ort-dynamic-int8" in err
    assert (out / "points" / "qublast-cpu-uniform-w4" / "model.onnx").stat().st_mtime_ns == made  # not made again
    again = json.loads((out / "results.json").read_text())["points"]
    assert again["qublast-cpu-uniform-w4"]["ppl"] == first["qublast-cpu-uniform-w4"]["ppl"]
    assert {n: again[n]["seconds"] for n in POINTS if n != "ort-dynamic-int8"} == {
        n: first[n]["seconds"] for n in POINTS if n != "ort-dynamic-int8"}
    assert again["ort-dynamic-int8"]["bytes"] == first["ort-dynamic-int8"]["bytes"]
    assert "skipped" in again["modelopt-rtndq"]
    assert again["fp32"]["tokens_whole"] > again["fp32"]["tokens"] and math.isfinite(again["fp32"]["ppl_whole"])
    assert "ppl_whole" not in again["ort-rtn-asym-b32"]
    assert not (out / "points" / "ort-dynamic-int8.partial").exists()
    for name in POINTS:  # --speed times every kind of graph, each opened as its tool ships it
        assert all(again[name][f"{k}_ms_t{t}"] > 0 for k in ("prefill", "decode") for t in (1, 2)), name

    # a run of QuBLAST points alone (no fp32 graph) reads the text through a bundle's own tokenizer
    alone = tmp_path / "alone"
    shutil.copytree(out / "points" / "qublast-cpu-uniform-w4", alone / "points" / "qublast-cpu-uniform-w4")
    identity = json.loads((out / "results.json").read_text())["identity"]
    (alone / "results.json").write_text(json.dumps({"identity": identity, "points": {}}))
    assert peers.main(_args(tiny_model_dir, alone, ["qublast-cpu-uniform-w4"])) == 0
    assert json.loads((alone / "results.json").read_text())["points"]["qublast-cpu-uniform-w4"]["ppl"] == first[
        "qublast-cpu-uniform-w4"]["ppl"]


def test_refuses_a_folder_it_did_not_write_and_bad_points(tiny_model_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert peers.main(_args(tiny_model_dir, mine, ["fp32"])) == 2
    assert "not touching it" in capsys.readouterr().err
    assert [f.name for f in mine.iterdir()] == ["notes.txt"]
    assert peers.main(_args(tiny_model_dir, tmp_path / "x", ["fp32", "nope"])) == 2
    assert "unknown point(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written before every flag is checked
    with pytest.raises(SystemExit) as exc:
        peers.main([*_args(tiny_model_dir, tmp_path / "y", ["fp32"]), "--windows", "zero"])
    assert exc.value.code == 2


def test_linear_bytes_finds_the_head_through_the_logits(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(np.zeros((8, 16), np.float32), "w1")
    w2 = numpy_helper.from_array(np.zeros((16, 32), np.float32), "w2")
    b1 = numpy_helper.from_array(np.zeros((16,), np.float32), "b1")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("MatMul", ["hb", "hb_t"], ["attn"], name="activation_only"),
             helper.make_node("Transpose", ["hb"], ["hb_t"]),
             helper.make_node("MatMul", ["hb", "w2"], ["l32"]), helper.make_node("Cast", ["l32"], ["logits"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 32]),
                               helper.make_tensor_value_info("attn", TensorProto.FLOAT, None)], initializer=[w1, w2, b1])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert peers.linear_bytes(tmp_path / "m.onnx") == ((8 * 16 + 16) * 4, 16 * 32 * 4)


def test_frontier_table_compares_each_peer_with_qublast_points_only():
    def pt(name, tool, mb, blocks, ppl):
        return {"name": name, "tool": tool, "params": {}, "bytes": int(mb * 1e6), "bytes_blocks": int(blocks * 1e6), "ppl": ppl}

    results = {"points": {p["name"]: p for p in (
        pt("fp16", "fp", 200, 150, 10.0),
        pt("q-small", "qublast", 60, 40, 14.0), pt("q-big", "qublast", 100, 80, 10.5),
        pt("peer-a", "ort", 90, 35, 13.0),  # our best no larger than it is q-small; q-big is the smallest as good
        pt("peer-b", "genai", 300, 200, 10.1),  # nothing of ours is as good
    )}}
    rows = {line.split(" | ")[0].strip("| "): line for line in peers.frontier_table(results).splitlines()[2:]}
    assert set(rows) == {"peer-a", "peer-b"}
    cells = [c.strip() for c in rows["peer-a"].strip("|").split("|")]
    assert cells[3:] == ["14.0000 (q-small)", "none", "100.0 (q-big)", "80.0 (q-big)"]
    cells = [c.strip() for c in rows["peer-b"].strip("|").split("|")]
    assert cells[3:] == ["10.5000 (q-big)", "10.5000 (q-big)", "none", "none"]


def test_a_budget_the_model_cannot_have_is_recorded_and_the_run_goes_on(tiny_model_dir, tmp_path, capsys):
    # size30 on the Jetson graph: a tiny model's fp16 norms and its w4 vocabulary alone exceed 30% of fp16
    out = tmp_path / "peers"
    assert peers.main(_args(tiny_model_dir, out, ["qublast-jetson-size30", "qublast-cpu-uniform-w4"])) == 0
    err = capsys.readouterr().err
    pts = json.loads((out / "results.json").read_text())["points"]
    refused = pts["qublast-jetson-size30"]
    assert refused["infeasible"].startswith("size budget 0.3 x fp16") and "bytes" not in refused
    assert refused["seconds"] > 0  # what the refusal cost (one after a sweep costs minutes)
    assert f"qublast-jetson-size30 infeasible: {refused['infeasible']}" in err
    assert not (out / "points" / "qublast-jetson-size30").exists() and not (out / "costs" / "qublast-jetson-size30.json").exists()
    assert "bytes" in pts["qublast-cpu-uniform-w4"]  # the run went on to the next point
    assert f"| qublast-jetson-size30 | qublast | infeasible: {refused['infeasible']} |" in (out / "results.md").read_text()
    # a rerun does not try it again
    assert peers.main(_args(tiny_model_dir, out, ["qublast-jetson-size30"])) == 0
    assert "1 points, 1 already recorded" in capsys.readouterr().err


def test_an_export_failure_other_than_a_budget_stops_the_run(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "peers"
    calib = tmp_path / "empty.txt"
    calib.write_text("")  # the export refuses it (exit code 2), but that is not a fact about the point
    args = _args(tiny_model_dir, out, ["qublast-cpu-uniform-w4"])
    args[args.index("--calib-text") + 1] = str(calib)
    assert peers.main(args) == 1
    err = capfd.readouterr().err
    assert "error: qublast-cpu-uniform-w4: producing it failed" in err
    assert "qublast: error: " in err  # the export's own line, passed through as it came
    assert "qublast-cpu-uniform-w4" not in json.loads((out / "results.json").read_text())["points"]


@pytest.mark.skipif(not GGUF.is_file(), reason="needs ../shared/assets (the SmolLM2 GGUF)")
def test_genai_reads_a_gguf_checkpoint_through_an_hf_folder_written_once(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pt = next(p for p in peers.points() if p.name == "genai-rtn-shared")
    cache, dest = tmp_path / "cache", tmp_path / "point"
    dest.mkdir()
    peers._genai_point(pt, str(GGUF), dest, cache)
    assert (cache / "hf-fp32" / "config.json").is_file() and not (cache / "hf-fp32.partial").exists()
    assert "quantization_config" not in json.loads((cache / "hf-fp32" / "config.json").read_text())
    assert (dest / "model.onnx").is_file() and (dest / "genai_config.json").is_file()
    assert not (dest / "builder-cache").exists()
