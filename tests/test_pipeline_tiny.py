"""The CLI end to end on a tiny local model: bundle contents, recipe reuse, bad input -> exit 2."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest

from export.legality import violations
from qublast.export import main
from qublast.recipe import read_recipe

FAST = ["--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2", "--holdout-windows", "2",
        "--seqlen", "32", "--max-eval-windows", "3", "--context", "64"]


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "b"
    cache = out.parent / "cache"
    assert main(["--model", str(tiny_model_dir), *FAST, "--max-ppl-increase", "0.05", "--out", str(out), "--cache-dir", str(cache)]) == 0
    return out


def test_bundle_contents(bundle):
    for name in ("recipe.json", "scales.safetensors", "model.onnx", "model.onnx.data", "report.md",
                 "sensitivity.png", "size_vs_ppl.png", "build_engine.sh", "engine_profiles.json", "tokenizer/tokenizer.json"):
        assert (bundle / name).is_file(), name
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".b.")]  # no half bundle left
    recipe = read_recipe(bundle / "recipe.json")
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    assert m["size_bytes"] <= m["size_bytes_fp16"] and m["size_bytes_blocks"] <= m["size_bytes_blocks_fp16"]
    assert m["logit_agreement"]["decode_max_abs"] < 1e-3
    assert violations(onnx.load(str(bundle / "model.onnx"), load_external_data=False)) == []
    assert recipe["allocation"]["repair"][-1]["measured"] <= recipe["allocation"]["repair_target_dce"] or all(
        b["format"] == "fp16" for b in recipe["blocks"])
    assert "| block | format |" in (bundle / "report.md").read_text()
    for block in recipe["blocks"]:  # the per-block map ablation: chosen alpha never worse than alpha 0
        assert block["block_err"] <= block["block_err_unscaled"], block["index"]


def test_recipe_reuse_gives_same_graph(bundle, tiny_model_dir, tmp_path):
    out = tmp_path / "again"
    assert main(["--model", str(tiny_model_dir), *FAST, "--recipe", str(bundle / "recipe.json"), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    first, second = read_recipe(bundle / "recipe.json"), read_recipe(out / "recipe.json")
    assert [b["format"] for b in first["blocks"]] == [b["format"] for b in second["blocks"]]
    assert second["metrics"]["ppl_quant_ort"] == pytest.approx(first["metrics"]["ppl_quant_ort"], rel=1e-6)


def test_formats_fixes_each_blocks_format(bundle, tiny_model_dir, tmp_path, capsys):
    chosen = [b["format"] for b in read_recipe(bundle / "recipe.json")["blocks"]]
    wanted = ["w4" if f != "w4" else "w8" for f in chosen]  # every block differs from the allocation
    base = ["--model", str(tiny_model_dir), *FAST, "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--formats", ",".join(wanted), "--out", str(tmp_path / "f")]) == 0
    recipe = read_recipe(tmp_path / "f" / "recipe.json")
    assert [b["format"] for b in recipe["blocks"]] == wanted
    assert recipe["constraint"] == {"mode": "formats", "value": ",".join(wanted)}
    assert main([*base, "--formats", ",".join(wanted[:-1]), "--out", str(tmp_path / "g")]) == 2
    assert f"--formats gives {len(wanted) - 1} formats for a model with {len(wanted)} blocks" in _error_line(capsys)
    assert main([*base, "--formats", "w8,int3", "--out", str(tmp_path / "g")]) == 2
    assert "unknown format 'int3'" in _error_line(capsys)
    assert not (tmp_path / "g").exists()


def test_uniform_puts_every_block_in_one_format(bundle, tiny_model_dir, tmp_path):
    """--uniform is --formats with one format repeated; the map is still decided per block."""
    base = ["--model", str(tiny_model_dir), *FAST, "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--uniform", "w8a8", "--out", str(tmp_path / "u")]) == 0
    recipe = read_recipe(tmp_path / "u" / "recipe.json")
    assert {b["format"] for b in recipe["blocks"]} == {"w8a8"}
    assert recipe["constraint"] == {"mode": "uniform", "value": "w8a8"}
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in (tmp_path / "u" / "report.md").read_text().splitlines()
            if line.startswith("| ") and " | w8a8 | " in line}
    for block in recipe["blocks"]:
        sens = block["sensitivity"]["w8a8"]
        assert sens["dce"] <= sens["dce_map_off"]
        if not block["map"]:  # the map off: no folds in the recipe or the bundle's scales
            assert not any(block["alpha"].values()) and not block["smooth"]
        assert rows[str(block["index"])][2] == ("on" if block["map"] else "off")
        assert all("act_range" in lin for lin in block["linears"])


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qublast: error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(bundle, tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), *FAST, "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "c")]
    assert main([*base, "--target", "fpga"]) == 2
    assert "unknown target" in _error_line(capsys)
    assert main(["--model", str(tmp_path / "missing.gguf"), *base[2:]]) == 2
    assert "not found" in _error_line(capsys)
    corrupt = tmp_path / "corrupt" / "recipe.json"
    corrupt.parent.mkdir()
    corrupt.write_text("{not json")
    assert main([*base, "--recipe", str(corrupt)]) == 2
    assert "not valid JSON" in _error_line(capsys)
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    recipe = json.loads((other / "recipe.json").read_text())
    recipe["model"]["weight_sha256"] = "0" * 64
    (other / "recipe.json").write_text(json.dumps(recipe))
    assert main([*base, "--recipe", str(other / "recipe.json")]) == 2
    assert "made for weights" in _error_line(capsys)
    assert main([*base, "--target-size", "0.01"]) == 2
    assert "size budget" in _error_line(capsys)
    assert not [p.name for p in tmp_path.iterdir() if p.name == "x" or p.name.startswith(".x.")]  # nothing written half


def test_unsupported_model_type(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    assert main(["--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")]) == 2
    assert "unsupported model type 'gpt2'" in _error_line(capsys)
