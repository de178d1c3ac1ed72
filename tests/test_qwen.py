"""The CLI on the real Qwen2.5-Coder-0.5B-Instruct (24 blocks, 152k vocabulary, untied lm_head),
which ../shared/assets/get_qwen05.sh assembles from the package registry; skipped where it has
not been run (CI does not fetch it). Caveat: the GGUF's weights came through 4- and 5-bit
formats, so formats with those lattices are flattered on it."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from export.legality import violations
from qublast.export import main
from qublast.recipe import read_recipe

pytestmark = pytest.mark.integration

QWEN = Path(os.environ.get("QUBLAST_QWEN_GGUF", Path.home() / ".cache" / "qublast-assets" / "qwen2.5-coder-0.5b-instruct.gguf"))


@pytest.fixture(scope="module")
def qwen(assets) -> Path:
    if not QWEN.is_file():
        pytest.skip(f"{QWEN} not found: run ../shared/assets/get_qwen05.sh (or set QUBLAST_QWEN_GGUF)")
    return QWEN


def test_qwen05_end_to_end_on_jetson(qwen, assets, tmp_path):
    """Short windows so it fits a CI run: the whole pipeline, the vocabulary (most of the model's
    bytes at 0.5B) choosable, a size budget met from the files, ORT = PyTorch, legal for TensorRT."""
    out = tmp_path / "bundle"
    args = ["--target", "jetson", "--model", str(qwen),
            "--calib-text", str(assets / "wikitext-2" / "wiki.valid.calib.txt"),
            "--eval-text", str(assets / "wikitext-2" / "wiki.test.raw"), "--seqlen", "256", "--max-eval-windows", "4",
            "--calib-seqlen", "128", "--calib-windows", "2", "--holdout-windows", "4", "--gptq-windows", "4",
            "--reconstruct", "0", "--target-size", "0.4", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    recipe = read_recipe(out / "recipe.json")
    m = recipe["metrics"]
    assert recipe["model"]["num_blocks"] == 24 and len(recipe["blocks"]) == 24
    assert m["size_bytes"] == sum(f.stat().st_size for f in out.iterdir() if f.name in m["size_files"])
    assert m["size_bytes"] <= 0.4 * m["size_bytes_fp16"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    assert m["ppl_quant_torch"] > m["ppl_fp"] * 0.99
    assert violations(onnx.load(str(out / "model.onnx"), load_external_data=False)) == []
    # at 0.4 of fp16 the 152k x 896 tables cannot stay fp16: the allocation quantized them
    assert recipe["embedding"]["format"] != "fp16" or recipe["lm_head"]["format"] != "fp16"
