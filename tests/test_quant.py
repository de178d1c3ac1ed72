"""Quantization primitives and format byte accounting on tiny seeded tensors."""
from __future__ import annotations

import pytest
import torch

from qublast.errors import InputError
from qublast.formats import block_size_for, get_format, get_target, linear_bytes, table_bytes
from qublast.quant import dequantize, fake_quant_dynamic, qrange, quantize_weight, quantize_with_scale
from runtime.targets import EMBED_FORMATS

# (bits, block_size) for a [out=6, in=64] weight: per channel INT8 and blockwise INT4.
CASES = [(8, 64), (4, 16), (4, 32)]


def _weight(seed: int = 0, out_f: int = 6, in_f: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)  # [out, in]
    w[1, 5] = 9.0  # an outlier so clipping matters
    return w


def test_qrange():
    assert qrange(8) == (-128, 127)
    assert qrange(4) == (-8, 7)


@pytest.mark.parametrize("bits,block", CASES)
def test_codes_scales_and_dequantize(bits, block):
    w = _weight()
    qw = quantize_weight(w, bits=bits, block_size=block)
    qmin, qmax = qrange(bits)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape
    assert int(qw.q.min()) >= qmin and int(qw.q.max()) <= qmax
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (6, 64 // block)
    assert torch.all(qw.scale > 0)
    assert torch.equal(qw.scale, qw.scale.half().float())  # fp16-representable
    assert qw.bits == bits and qw.block_size == block
    # q * scale with each scale broadcast over its own block, computed independently
    expected = qw.q.float() * qw.scale.repeat_interleave(block, dim=1)
    assert torch.equal(qw.dequantize(), expected)
    assert torch.equal(dequantize(qw.q, qw.scale, block), expected)


@pytest.mark.parametrize("bits,block", CASES)
def test_error_stats_are_consistent(bits, block):
    w = _weight(seed=1)
    qw = quantize_weight(w, bits=bits, block_size=block)
    diff = qw.dequantize().double() - w.double()
    assert qw.stats.rel_err == pytest.approx((diff.norm() / w.double().norm()).item(), rel=1e-5)
    assert qw.stats.max_abs_err == pytest.approx(diff.abs().max().item(), rel=1e-5)
    assert qw.stats.mse == pytest.approx(diff.pow(2).mean().item(), rel=1e-5)
    assert 0.0 < qw.stats.rel_err < (0.02 if bits == 8 else 0.2)
    assert 0.6 <= qw.stats.clip_mean <= 1.0
    assert set(qw.stats.as_dict()) == {"rel_err", "max_abs_err", "mse", "clip_mean"}


@pytest.mark.parametrize("bits,block", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_search_never_worse_than_absmax(bits, block, seed):
    w = _weight(seed=seed)
    searched = quantize_weight(w, bits=bits, block_size=block)
    absmax = quantize_weight(w, bits=bits, block_size=block, clip_grid=(1.0,))
    assert absmax.stats.clip_mean == 1.0
    # per group as well as overall
    err_s = (searched.dequantize() - w).pow(2).view(6, -1, block).sum(-1)
    err_a = (absmax.dequantize() - w).pow(2).view(6, -1, block).sum(-1)
    assert torch.all(err_s <= err_a)
    assert searched.stats.mse <= absmax.stats.mse


def test_clip_search_clips_an_outlier_group_at_4_bits():
    w = _weight()
    searched = quantize_weight(w, bits=4, block_size=16)
    absmax = quantize_weight(w, bits=4, block_size=16, clip_grid=(1.0,))
    assert searched.stats.clip_mean < 1.0
    assert searched.stats.mse < absmax.stats.mse


@pytest.mark.parametrize("bits,block", CASES)
def test_importance_weighted_clip_minimises_the_weighted_error(bits, block):
    """With input-channel importance the clip per group is the one with the least importance-weighted
    error on the grid: never worse than the plain-MSE choice on that measure, and equal to the
    plain choice when importance is uniform."""
    w = _weight(seed=3)
    importance = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(4)).pow(4) * 100
    weighted = quantize_weight(w, bits=bits, block_size=block, importance=importance)
    plain = quantize_weight(w, bits=bits, block_size=block)

    def weighted_err(qw):
        return ((qw.dequantize() - w).pow(2) * importance).view(6, -1, block).sum(-1)

    assert torch.all(weighted_err(weighted) <= weighted_err(plain) + 1e-9)
    uniform = quantize_weight(w, bits=bits, block_size=block, importance=torch.full((w.shape[1],), 3.0))
    assert torch.equal(uniform.q, plain.q) and torch.equal(uniform.scale, plain.scale)


def test_important_outlier_column_is_not_clipped():
    """A group whose large weight sits on the one input channel that carries signal keeps absmax."""
    w = torch.zeros(1, 16)
    w[0, 0] = 1.0
    w[0, 1:] = torch.linspace(-0.3, 0.3, 15)
    importance = torch.full((16,), 1e-3)
    importance[0] = 1.0
    assert quantize_weight(w, bits=4, block_size=16).stats.clip_mean < 1.0
    assert quantize_weight(w, bits=4, block_size=16, importance=importance).stats.clip_mean == 1.0


@pytest.mark.parametrize("bits,block", CASES)
def test_all_zero_rows(bits, block):
    w = _weight()
    w[2] = 0.0
    qw = quantize_weight(w, bits=bits, block_size=block)
    dq = qw.dequantize()
    assert not torch.isnan(dq).any() and not torch.isnan(qw.scale).any()
    assert torch.all(qw.q[2] == 0) and torch.all(dq[2] == 0)
    zero = quantize_weight(torch.zeros(3, 32), bits=bits, block_size=min(block, 32))
    assert torch.all(zero.q == 0) and torch.all(zero.dequantize() == 0)
    assert zero.stats.rel_err == 0.0 and zero.stats.mse == 0.0 and zero.stats.max_abs_err == 0.0


@pytest.mark.parametrize("bits,block", CASES)
def test_quantize_with_scale_reproduces_codes(bits, block):
    w = _weight(seed=3)
    qw = quantize_weight(w, bits=bits, block_size=block)
    q = quantize_with_scale(w, qw.scale, bits=bits, block_size=block)
    assert q.dtype == torch.int8
    assert torch.equal(q, qw.q)
    # from an fp16 copy of the checkpoint weight the codes for fp16-exact weights match too
    w16 = w.half().float()
    qw16 = quantize_weight(w16, bits=bits, block_size=block)
    assert torch.equal(quantize_with_scale(w16.half(), qw16.scale, bits=bits, block_size=block), qw16.q)


def test_shape_errors():
    with pytest.raises(ValueError):
        quantize_weight(torch.ones(2, 48), bits=4, block_size=32)
    with pytest.raises(ValueError):
        quantize_with_scale(torch.ones(2, 64), torch.ones(2, 3), bits=4, block_size=16)


JETSON, CPU = get_target("jetson"), get_target("cpu")


@pytest.mark.parametrize("in_f,block", [(576, 64), (4096, 128), (1536, 128), (64, 64), (128, 128)])
def test_jetson_int4_blocks_are_64_or_128(in_f, block):
    assert block_size_for(get_format("w4", JETSON), in_f) == block


@pytest.mark.parametrize("in_f", [24, 100, 96, 48])
def test_jetson_int4_block_rejects_other_sizes(in_f):
    with pytest.raises(InputError, match="no w4 block size"):
        block_size_for(get_format("w4", JETSON), in_f)


@pytest.mark.parametrize("in_f,block", [(576, 64), (1536, 128), (48, 16), (96, 32)])
def test_cpu_blocks_take_the_largest_power_of_two(in_f, block):
    assert block_size_for(get_format("w4", CPU), in_f) == block
    assert block_size_for(get_format("w8", CPU), in_f) == block


@pytest.mark.parametrize("in_f,block", [(576, 32), (1536, 32), (48, 16)])
def test_cpu_w4s_takes_blocks_of_32(in_f, block):
    """w4s: INT4 with a scale every 32 weights (16 where 32 does not divide), more bytes than w4, fewer than w8;
    not a Jetson format."""
    from runtime.targets import weight_bytes

    w4s, w4, w8 = (get_format(n, CPU) for n in ("w4s", "w4", "w8"))
    assert block_size_for(w4s, in_f) == block and w4s.act == "dynamic" and "w4s" in CPU.head_formats
    assert "w4s" not in CPU.candidates  # blocks calibrate it only on request
    sizes = [weight_bytes(f, 10, in_f, float_bytes=4) for f in (w4, w4s, w8)]
    assert sizes[0] <= sizes[1] < sizes[2] and sizes[1] == 10 * in_f // 2 + 4 * 10 * in_f // block
    with pytest.raises(InputError, match="not available on target 'jetson'"):
        get_format("w4s", JETSON)


def test_get_format_knows_targets():
    assert get_format("w4", JETSON).bits == 4 and get_format("w8a8", JETSON).act == "static"
    assert get_format("w8", CPU).act == "dynamic"
    with pytest.raises(InputError, match="w3"):
        get_format("w3", JETSON)
    with pytest.raises(InputError, match="TensorRT documents weight-only quantization for INT4 only"):
        get_format("w8", JETSON)  # INT8 weight-only would be folded to fp16 by TensorRT: not offered
    with pytest.raises(InputError, match="not available on target 'cpu'"):
        get_format("w8a8", CPU)


def test_linear_bytes_by_hand():
    fp16, w8a8, w4 = (get_format(n, JETSON) for n in ("fp16", "w8a8", "w4"))
    # Jetson, 10 x 576 linear: fp16 weights and fp16 scales
    assert linear_bytes(fp16, 10, 576, target=JETSON) == 2 * 10 * 576  # 11520
    assert linear_bytes(w8a8, 10, 576, target=JETSON) == 10 * 576 + 2 * 10  # codes + one fp16 scale per row
    assert linear_bytes(w4, 10, 576, target=JETSON) == 10 * 576 // 2 + 2 * 10 * 9  # 2880 + 180 (blocks of 64)
    assert linear_bytes(fp16, 10, 576, target=JETSON, has_bias=True) == 11520 + 20
    assert linear_bytes(w4, 3, 256, target=JETSON) == 384 + 2 * 3 * 2
    # CPU: an fp32 graph stores unquantized weights and scales in fp32
    fp, w8, w4c = (get_format(n, CPU) for n in ("fp16", "w8", "w4"))
    assert linear_bytes(fp, 10, 576, target=CPU) == 4 * 10 * 576
    assert linear_bytes(w8, 10, 576, target=CPU) == 10 * 576 + 4 * 10 * 9  # INT8 blocks of 64
    assert linear_bytes(w4c, 3, 48, target=CPU) == 72 + 4 * 3 * 3  # blocks of 16
    assert linear_bytes(w4c, 1, 16, target=CPU, has_bias=True) == 8 + 4 + 4


def test_table_bytes_by_hand():
    # host table: fp16 rows, INT8 with one fp16 scale per row, INT4 with fp16 scales per block of 128
    assert table_bytes(EMBED_FORMATS["fp16"], 100, 576) == 2 * 100 * 576
    assert table_bytes(EMBED_FORMATS["w8"], 100, 576) == 100 * 576 + 2 * 100
    assert table_bytes(EMBED_FORMATS["w4"], 100, 512) == 100 * 256 + 2 * 100 * 4


def test_dynamic_activation_quantization_matches_onnx_runtime():
    """fake_quant_dynamic is ORT's MatMulNBits at accuracy level 4: one MatMul through ORT equals
    PyTorch's fake-quantized activation times the dequantized weight."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.qdq import pack_int4

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 128, generator=g) * torch.linspace(0.1, 8, 128)  # [M, K], uneven channel scales
    w = torch.randn(16, 128, generator=g)  # [out, in]
    qw = quantize_weight(w, bits=4, block_size=32)
    inits = [pack_int4("q", qw.q.numpy().T), numpy_helper.from_array(qw.scale.numpy().T.copy(), "s")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 16])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    out = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    emulated = fake_quant_dynamic(x, 32) @ qw.dequantize().T
    plain = x @ qw.dequantize().T
    scale = float(plain.abs().mean())
    assert np.abs(out - emulated.numpy()).max() < 1e-4 * scale  # accumulation order only
    assert np.abs(out - plain.numpy()).max() > 10 * np.abs(out - emulated.numpy()).max()  # the emulation is not a no-op


@pytest.mark.parametrize("target", [JETSON, CPU])
def test_mixed_format_is_made_of_the_targets_own_formats(target):
    """Every mixed block format's parts are plain formats of the same target, so each linear is
    stored in a layout the target already runs; its bytes lie strictly between its parts'."""
    import torch.nn as nn

    from qublast.arch import arch_for
    from qublast.formats import linear_format
    from qublast.sizes import block_bytes
    from tests.tiny import tiny_model

    spec = arch_for("llama")
    layer = tiny_model("llama").model.layers[0]
    mixed = [f for f in target.formats.values() if f.mix]
    assert [f.name for f in mixed] == ["w4m"]
    for fmt in mixed:
        bulk, rest = fmt.mix
        assert target.formats[bulk.name] is bulk and target.formats[rest.name] is rest and bulk.mix is rest.mix is None
        assert linear_format(fmt, spec, "mlp.up_proj") is bulk and linear_format(fmt, spec, "self_attn.v_proj") is rest
        assert isinstance(layer.get_submodule("mlp.down_proj"), nn.Linear)
        assert linear_format(fmt, spec, "mlp.down_proj") is rest
        sizes = {name: block_bytes(layer, spec, name, target) for name in (bulk.name, fmt.name, rest.name)}
        assert sizes[bulk.name] < sizes[fmt.name] < sizes[rest.name]
        with pytest.raises(ValueError, match="mixed format"):
            block_size_for(fmt, 64)
    assert CPU.formats["w4m"].mix[1].name == "w8" and JETSON.formats["w4m"].mix[1].name == "fp16"


def test_mixed_format_refuses_parts_that_treat_activations_differently():
    from runtime.targets import mixed

    with pytest.raises(ValueError, match="treat activations differently"):
        mixed("bad", get_format("w4", CPU), get_format("w8a8", JETSON))
