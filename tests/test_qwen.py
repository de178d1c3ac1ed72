"""The CLI on the real Qwen2.5-Coder-0.5B-Instruct (24 blocks, 152k vocabulary, untied lm_head),
which ../shared/assets/get_qwen05.sh assembles from the package registry; it runs where
QUBLAST_QWEN_GGUF names that file (CI does not fetch it, and the run takes minutes). Caveat: the
GGUF's weights came through 4- and 5-bit formats, so formats with those lattices are flattered on it."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from export.legality import violations
from qublast.export import main
from qublast.recipe import read_recipe

pytestmark = pytest.mark.integration

QWEN = os.environ.get("QUBLAST_QWEN_GGUF")  # the .gguf get_qwen05.sh printed: the test runs when it is set


@pytest.fixture(scope="module")
def qwen(assets) -> Path:
    if not QWEN:
        pytest.skip("set QUBLAST_QWEN_GGUF to the file ../shared/assets/get_qwen05.sh prints (about 15 minutes on 2 cores)")
    if not Path(QWEN).is_file():
        pytest.skip(f"QUBLAST_QWEN_GGUF={QWEN} is not a file: run ../shared/assets/get_qwen05.sh")
    return Path(QWEN)


def test_qwen05_end_to_end_on_jetson(qwen, assets, tmp_path):
    """Short windows so it fits a CI run: the whole pipeline, the vocabulary (most of the model's
    bytes at 0.5B) choosable, a size budget met from the files, ORT = PyTorch, legal for TensorRT."""
    out = tmp_path / "bundle"
    args = ["--target", "jetson", "--model", str(qwen),
            "--calib-text", str(assets / "wikitext-2" / "wiki.valid.calib.txt"),
            "--eval-text", str(assets / "wikitext-2" / "wiki.test.raw"), "--seqlen", "256", "--max-eval-windows", "4",
            "--calib-seqlen", "128", "--calib-windows", "2", "--holdout-windows", "4",
            "--reconstruct", "0", "--quantizers", "rtn", "--target-size", "0.4", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
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
