"""Calibration device and dtype: the block-by-block placement is a no-op on the CPU, bad devices
are one-line errors, a lower calibration dtype still gives a verified bundle, and (GPU only) the
same command on CUDA."""
from __future__ import annotations

import pytest
import torch

from qublast.arch import arch_for
from qublast.device import placed
from qublast.export import main
from qublast.recipe import read_recipe
from tests.tiny import VOCAB, tiny_model

FAST = ["--calib-seqlen", "32", "--calib-windows", "2", "--holdout-windows", "2", "--seqlen", "32",
        "--max-eval-windows", "3", "--gptq-windows", "4"]


def test_placement_on_cpu_changes_nothing():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    with placed(model, arch_for("llama"), "cpu"):
        assert not any(layer._forward_pre_hooks for layer in model.model.layers)
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_unusable_device_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), "--target", "cpu", *FAST, "--out", str(tmp_path / "o")]
    assert main([*args, "--device", "tpu"]) == 2
    assert "device 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", [["--uniform", "w4"], ["--max-ppl-increase", "0.05"]], ids=["uniform", "budget"])
def test_float16_calibration_gives_a_verified_bundle(tiny_model_dir, tmp_path, mode):
    """Both a fixed plan and a budget (its sweep scores the embedding table in the model's dtype)."""
    out = tmp_path / "h"
    assert main(["--model", str(tiny_model_dir), "--target", "jetson", *FAST, *mode, "--dtype", "float16",
                 "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(out / "recipe.json")
    assert recipe["calibration"]["dtype"] == "float16"
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005


@pytest.mark.gpu
def test_cuda_calibration_matches_the_cpu_path(tiny_model_dir, tmp_path):
    """The same command with --device cuda: blocks move to the GPU one at a time; the bundle verifies."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    out = tmp_path / "g"
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", *FAST, "--max-ppl-increase", "0.05", "--device", "cuda",
                 "--reconstruct", "2", "--reconstruct-steps", "5", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    m = read_recipe(out / "recipe.json")["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
