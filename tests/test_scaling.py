"""Scaling-map primitives: smoothing scales, exact folds, range estimators with known answers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qublast.scaling import (
    absmax_range,
    act_range,
    act_scale,
    fake_quant,
    fold_into_norm,
    mse_range,
    percentile_range,
    scale_columns,
    smooth_scales,
)


def test_alpha_zero_is_no_scaling():
    stat = torch.rand(16) * 10
    assert torch.equal(smooth_scales(stat, None, 0.0), torch.ones(16))


def test_smooth_scales_formula_and_normalisation():
    act, w = torch.tensor([1.0, 4.0, 16.0]), torch.tensor([2.0, 2.0, 8.0])
    s = smooth_scales(act, w, 0.5)
    raw = act.sqrt() / w.sqrt()
    torch.testing.assert_close(s, raw / raw.log().mean().exp())
    assert s.log().mean().abs() < 1e-6  # geometric mean 1
    aware = smooth_scales(act, None, 1.0)
    torch.testing.assert_close(aware / aware[0], act / act[0])


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fold_is_exact(offset):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=g)
    norm = torch.rand(24, generator=g) + 0.5
    weights = [torch.randn(8, 24, generator=g), torch.randn(5, 24, generator=g)]
    s = torch.rand(24, generator=g) * 3 + 0.2
    new_norm, new_weights = fold_into_norm(norm, s, norm_offset=offset), scale_columns(weights, s)
    for w, nw in zip(weights, new_weights):
        torch.testing.assert_close((x * (offset + new_norm)) @ nw.T, (x * (offset + norm)) @ w.T, atol=1e-4, rtol=1e-5)


def test_absmax_and_percentile_known_answers():
    x = torch.arange(1, 10001, dtype=torch.float32) * torch.where(torch.arange(10000) % 2 == 0, 1.0, -1.0)
    assert absmax_range(x) == 10000.0
    assert percentile_range(x, q=99.99) == 9999.0  # the 9999th smallest |x|
    assert percentile_range(x, q=50) == 5000.0


def test_mse_range_clips_a_lone_outlier():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g)
    x[0] = 200.0
    r = mse_range(x)
    # analytic optimum of (200 - r)^2 / 20000 + (r / 127)^2 / 12 (clip error + rounding error): r ~= 181
    assert 170 < r < 192
    err = lambda rng: (fake_quant(x, rng / 127) - x).pow(2).mean().item()  # noqa: E731
    assert err(r) < err(absmax_range(x))


def test_mse_range_keeps_uniform_data_unclipped():
    x = torch.linspace(-1, 1, 4001)
    assert mse_range(x) > 0.95
    assert act_range(x, "absmax") == 1.0
    with pytest.raises(ValueError):
        act_range(x, "median")


def test_act_scale_is_fp16_and_positive():
    s = act_scale(3.3)
    assert s == float(torch.tensor(s).half().float()) and s > 0
    assert act_scale(0.0) > 0


def test_fake_quant_matches_onnx_quantize_dequantize():
    """Rounding half to even and saturation at [-128, 127], as ONNX QuantizeLinear does."""
    import onnxruntime as ort

    scale = 0.5
    x = np.array([[-100.0, -64.25, -0.75, -0.25, 0.25, 0.75, 1.25, 63.5, 100.0]], np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                              [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(fake_quant(torch.from_numpy(x), scale).numpy(), y)
