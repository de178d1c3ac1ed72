"""Calibration device and dtype: the block-by-block placement is a no-op on the CPU, bad devices
are one-line errors, a lower calibration dtype still gives a verified bundle, and (GPU only) the
same command on CUDA."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

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


# minor page faults while a 256 MB buffer is allocated, filled and freed six times after two first rounds
_FAULTS = """
import ctypes, resource, sys, torch
from qublast.device import reuse_freed_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the system's THP mode
took = reuse_freed_memory() if sys.argv[1] == "on" else None
for _ in range(2):
    torch.ones(64 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    torch.ones(64 * 2**20).sum()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env=None) -> tuple[str, int]:
    own = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                         env={**own, **(env or {})}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_memory_is_reused_without_new_page_faults():
    pages = 6 * 256 * 2**20 // 4096
    took, faults = _faults("on")
    if took == "False" and tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 35):
        pytest.skip("this glibc refuses a threshold above 32 MiB")
    assert took == "True" and faults < pages // 4  # the freed buffer is handed out again (a round may still fault)
    assert _faults("off")[1] > pages // 2  # glibc's default maps each one anew: the measure can see it
    took, faults = _faults("on", {"MALLOC_ARENA_MAX": "2"})  # the user's own settings stay as they are
    assert took == "False" and faults > pages // 2


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
