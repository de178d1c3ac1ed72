"""TensorRT build inputs: optimisation profiles follow the I/O table; the build script is sane bash."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from runtime import engine, io_spec

LAYERS, KV_HEADS, HEAD_DIM, CONTEXT = 3, 2, 16, 256


def _layout(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM) -> io_spec.Layout:
    return io_spec.Layout("attention", layers, kv_heads, head_dim, {}, step_only=False)


def _profiles(context=CONTEXT, **kw):
    return engine.profiles(_layout(**kw), context=context)


def test_profiles_cover_every_input():
    shapes = _profiles()
    assert sorted(shapes) == sorted(io_spec.input_names(LAYERS))  # order does not matter to trtexec
    assert len(shapes) == 3 + 2 * LAYERS
    for name, dims in shapes.items():
        assert isinstance(dims, tuple) and len(dims) == 3, name


def test_token_inputs():
    shapes = _profiles()
    for name in (io_spec.INPUT_IDS, io_spec.POSITION_IDS):
        assert shapes[name] == ("1x1", "1x1", f"1x{CONTEXT}")


def test_each_profile_point_is_consistent():
    """min, opt and max are each valid inputs: attention_mask length = past + seq."""
    shapes = _profiles()
    for point in range(3):
        seq = int(shapes[io_spec.INPUT_IDS][point].split("x")[1])
        mask = int(shapes[io_spec.ATTENTION_MASK][point].split("x")[1])
        past = int(shapes[io_spec.past_name(0, "key")][point].split("x")[2])
        assert mask == past + seq


def test_past_shapes():
    shapes = _profiles()
    for i in range(LAYERS):
        for kind in ("key", "value"):
            mn, opt, mx = shapes[f"past_key_values.{i}.{kind}"]
            assert mn == f"1x{KV_HEADS}x0x{HEAD_DIM}"
            assert mx == f"1x{KV_HEADS}x{CONTEXT - 1}x{HEAD_DIM}"
            b, h, past, d = (int(v) for v in opt.split("x"))
            assert (b, h, d) == (1, KV_HEADS, HEAD_DIM) and 0 <= past <= CONTEXT - 1


def test_min_opt_max_are_ordered():
    for dims in _profiles().values():
        parsed = [[int(v) for v in s.split("x")] for s in dims]
        for lo, mid, hi in zip(*parsed):
            assert lo <= mid <= hi


def test_profiles_reject_tiny_context():
    with pytest.raises(ValueError):
        _profiles(context=1)


def test_build_script_flags():
    script = engine.build_script(_profiles())
    assert script.startswith("#!/usr/bin/env bash\n")
    for piece in ("trtexec", "--onnx=model.onnx", "--stronglyTyped", "--saveEngine=model.plan.tmp",
                  "--minShapes=", "--optShapes=", "--maxShapes=", "mv model.plan.tmp model.plan"):
        assert piece in script, piece
    for forbidden in ("--fp16", "--int8", "--best"):
        assert forbidden not in script


def test_build_script_shape_lists():
    shapes = _profiles()
    script = engine.build_script(shapes)
    for flag, index in (("--minShapes=", 0), ("--optShapes=", 1), ("--maxShapes=", 2)):
        line = next(row for row in script.splitlines() if flag in row)
        value = line.split(flag, 1)[1].split()[0]
        assert value == ",".join(f"{name}:{dims[index]}" for name, dims in shapes.items())
        assert f"past_key_values.{LAYERS - 1}.value:" in value


def test_build_script_names():
    script = engine.build_script(_profiles(), onnx_name="m.onnx", plan_name="m.plan")
    assert "--onnx=m.onnx" in script and "--saveEngine=m.plan.tmp" in script
    assert "model.onnx" not in script


def test_build_script_is_valid_bash(tmp_path):
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the script"
    path = tmp_path / "build_engine.sh"
    path.write_text(engine.build_script(_profiles()), encoding="utf-8")
    result = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.sh"
    broken.write_text(engine.build_script(_profiles()) + "if then\n", encoding="utf-8")
    assert subprocess.run([bash, "-n", str(broken)], capture_output=True).returncode != 0


def test_build_script_runs_a_fake_trtexec(tmp_path):
    """The script runs trtexec with the flags, then renames the plan (a stub stands in for TensorRT)."""
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > args.txt\n'
                    'for a in "$@"; do case $a in --saveEngine=*) echo plan > "${a#--saveEngine=}";; esac; done\n')
    fake.chmod(0o755)
    script = tmp_path / "bundle" / "build_engine.sh"
    script.parent.mkdir()
    script.write_text(engine.build_script(_profiles()), encoding="utf-8")
    result = subprocess.run(["bash", str(script), "--verbose"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "TRTEXEC": str(fake)}, cwd=tmp_path, timeout=20)
    assert result.returncode == 0, result.stderr
    assert (script.parent / "model.plan").read_text() == "plan\n"
    assert not (script.parent / "model.plan.tmp").exists()
    args = (script.parent / "args.txt").read_text().splitlines()
    assert args[:3] == ["--onnx=model.onnx", "--stronglyTyped", "--saveEngine=model.plan.tmp"]
    assert args[-1] == "--verbose"
    assert "engine written" in result.stdout


def test_profiles_of_a_state_space_step_graph():
    """A hybrid step graph: one token at every point, fixed recurrent state shapes, KV past from 0 to context - 1."""
    layout = io_spec.Layout("hybrid", 2, 2, 16, {io_spec.past_name(i, k): shape for i in range(2)
                                                  for k, shape in (("conv", (192, 4)), ("ssm", (8, 16, 16)))}, step_only=True)
    shapes = engine.profiles(layout, context=64)
    assert sorted(shapes) == sorted(io_spec.input_names(2, family="hybrid"))
    assert shapes[io_spec.INPUT_IDS] == ("1x1", "1x1", "1x1")
    assert shapes[io_spec.past_name(1, "ssm")] == ("1x8x16x16",) * 3
    assert shapes[io_spec.past_name(0, "conv")] == ("1x192x4",) * 3
    assert shapes[io_spec.past_name(0, "key")] == ("1x2x0x16", "1x2x32x16", "1x2x63x16")
    assert shapes[io_spec.ATTENTION_MASK] == ("1x1", "1x33", "1x64")
