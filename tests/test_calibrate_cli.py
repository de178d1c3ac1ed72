"""``python -m qublast.calibrate``: search apart from apply. The recipe folder it writes, applied by
``python -m qublast.export --recipe``, gives the bundle the one-command flow gives."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qublast.export import main
from qublast.recipe import read_recipe

CALIB = ["--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2", "--holdout-windows", "2",
         "--max-ppl-increase", "0.05", "--gptq-windows", "2", "--reconstruct", "0"]
EVAL = ["--seqlen", "32", "--max-eval-windows", "3"]


def test_calibrate_then_export_equals_the_one_command_flow(tiny_model_dir, tmp_path):
    model = ["--model", str(tiny_model_dir)]
    folder = tmp_path / "recipe"
    assert main([*model, *CALIB, "--out", str(folder), "--cache-dir", str(tmp_path / "c1")], calibrate_only=True) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "recipe.json", "run.json", "scales.safetensors"]
    calibrated = read_recipe(folder / "recipe.json")
    assert calibrated["stage"] == "calibrated" and "ppl_quant_ort" not in calibrated["metrics"]
    assert json.loads((folder / "run.json").read_text())["calibration_costs"]["sweep_s"] > 0

    applied = tmp_path / "applied"
    assert main([*model, *EVAL, "--target", "cpu", "--recipe", str(folder / "recipe.json"), "--out", str(applied),
                 "--cache-dir", str(tmp_path / "c2")]) == 0
    one = tmp_path / "one"
    assert main([*model, *CALIB, *EVAL, "--out", str(one), "--cache-dir", str(tmp_path / "c3")]) == 0
    a, b = read_recipe(applied / "recipe.json"), read_recipe(one / "recipe.json")
    assert a["stage"] == b["stage"] == "exported"
    assert [blk["format"] for blk in a["blocks"]] == [blk["format"] for blk in b["blocks"]]
    assert (applied / "scales.safetensors").read_bytes() == (one / "scales.safetensors").read_bytes()
    assert (applied / "model.onnx.data").read_bytes() == (one / "model.onnx.data").read_bytes()
    assert a["metrics"]["ppl_quant_ort"] == pytest.approx(b["metrics"]["ppl_quant_ort"], rel=1e-6)


@pytest.mark.parametrize("flag", [["--eval-text", "x.txt"], ["--seqlen", "64"], ["--context", "64"], ["--recipe", "r.json"]])
def test_export_flags_are_refused_by_calibrate(tiny_model_dir, tmp_path, capsys, flag):
    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), *flag, "--out", str(out)], calibrate_only=True) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qublast: error: {flag[0]} is for the export") and not out.exists()


def test_module_runs():
    done = subprocess.run([sys.executable, "-m", "qublast.calibrate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m qublast.calibrate")
    assert "--eval-text" in done.stdout  # one parser for both; calibrate refuses the export's flags by name
