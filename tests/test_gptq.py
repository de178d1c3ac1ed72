"""GPTQ on small linears: its objective, its limits, and a GPTQ recipe replayed exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qublast.gptq import gptq_quantize, hessian
from qublast.quant import qrange, quantize_weight

CASES = [(4, 32), (8, 32), (8, 128)]  # INT4 blocks, INT8 blocks (CPU w8), INT8 per channel (Jetson w8a8)


def _problem(seed: int = 0, out_f: int = 48, in_f: int = 128):
    """A weight and correlated inputs with a few strong channels (what makes GPTQ pay)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f)
    x = torch.randn(2048, in_f, generator=g) @ mix  # [n, in]
    x[:, :4] *= 10
    return torch.randn(out_f, in_f, generator=g) * 0.05, hessian(x)


def _objective(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer output error on the inputs H came from (up to 2/n)."""
    d = (w - wq).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


@pytest.mark.parametrize("bits,block", CASES)
def test_gptq_beats_round_to_nearest_on_its_objective(bits, block):
    w, h = _problem()
    gptq = gptq_quantize(w, h, bits=bits, block_size=block)
    rtn = quantize_weight(w, bits=bits, block_size=block, importance=torch.diag(h))  # the same activation-aware clip
    assert _objective(w, gptq.dequantize(), h) < 0.8 * _objective(w, rtn.dequantize(), h)
    ordered = gptq_quantize(w, h, bits=bits, block_size=block, act_order=True)
    assert _objective(w, ordered.dequantize(), h) < _objective(w, rtn.dequantize(), h)


@pytest.mark.parametrize("bits,block", CASES)
def test_gptq_is_round_to_nearest_when_the_hessian_is_the_identity(bits, block):
    """Nothing to compensate: no column's error reaches another, so codes and scales equal RTN's."""
    w, _ = _problem(seed=1)
    gptq = gptq_quantize(w, torch.eye(w.shape[1]), bits=bits, block_size=block)
    rtn = quantize_weight(w, bits=bits, block_size=block)
    assert torch.equal(gptq.q, rtn.q) and torch.equal(gptq.scale, rtn.scale)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,block", CASES)
def test_codes_stay_in_range_and_scales_are_fp16(bits, block, act_order):
    w, h = _problem(seed=2)
    w[3, 7] = 5.0  # an outlier the error updates push on
    qw = gptq_quantize(w, h, bits=bits, block_size=block, act_order=act_order)
    qmin, qmax = qrange(bits)
    assert qw.q.dtype == torch.int8 and int(qw.q.min()) >= qmin and int(qw.q.max()) <= qmax
    assert qw.scale.shape == (w.shape[0], w.shape[1] // block)
    assert torch.equal(qw.scale, qw.scale.half().float()) and bool((qw.scale > 0).all())
    assert qw.stats.rel_err == pytest.approx(float((qw.dequantize() - w).norm() / w.norm()))


def test_dead_inputs_get_zero_codes():
    w, h = _problem(seed=3)
    h[5, :] = 0
    h[:, 5] = 0
    qw = gptq_quantize(w, h, bits=4, block_size=32)
    assert not qw.q[:, 5].any()


def test_a_shared_hessian_is_factored_once_and_gives_what_a_fresh_factorisation_gives(monkeypatch):
    """Linears and formats that share a Hessian (found by identity or equal values) share its
    factorisation; a different Hessian or column order gets its own; every result equals GPTQ
    without the cache, and a dead input stays dead."""
    import qublast.gptq as gptq

    w, h = _problem()
    h[7, :] = h[:, 7] = 0.0  # an input that never fires
    calls = []
    real = gptq.inverse_factor

    def counting(*args, **kwargs):
        calls.append(kwargs["act_order"])
        return real(*args, **kwargs)

    factors = gptq.InverseFactors()
    runs = [(w, h, 4, 32, True), (w[:20] * 3, h.clone(), 8, 128, True), (w, h, 4, 32, False), (w, h * 2, 4, 32, True)]
    for weight, hess, bits, block, act_order in runs:
        monkeypatch.setattr(gptq, "inverse_factor", counting)
        shared = gptq.gptq_quantize(weight, hess, bits=bits, block_size=block, act_order=act_order, factors=factors)
        monkeypatch.undo()
        fresh = gptq_quantize(weight, hess, bits=bits, block_size=block, act_order=act_order)
        assert torch.equal(shared.q, fresh.q) and torch.equal(shared.scale, fresh.scale)
        assert shared.stats == fresh.stats and not shared.q[:, 7].any()
    assert calls == [True, False, True]  # the equal copy reused; a new order and a new Hessian factored


def test_gptq_recipe_replays_exactly(tiny_model_dir, tmp_path):
    """A bundle whose blocks GPTQ quantized stores their codes; the graph's DequantizeLinear holds
    exactly those codes, and PyTorch (replaying the recipe) and ONNX Runtime agree."""
    import onnx
    from onnx import numpy_helper

    from qublast.export import main
    from qublast.recipe import read_recipe, read_tensors
    from runtime.embedding import unpack_int4_rows

    out = tmp_path / "g"
    args = ["--model", str(tiny_model_dir), "--target", "jetson", "--calib-seqlen", "32", "--calib-windows", "4",
            "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--context", "64",
            "--uniform", "w4", "--quantizers", "gptq", "--reconstruct", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    recipe, tensors = read_recipe(out / "recipe.json"), read_tensors(out / "scales.safetensors")
    assert {b["quantizer"] for b in recipe["blocks"]} == {"gptq"}
    graph = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in graph.graph.initializer}
    for block in recipe["blocks"]:
        for lin in block["linears"]:
            stored = tensors[f"{lin['path']}.qweight"].numpy()  # [out, in]
            packed = np.frombuffer(inits[f"{lin['path']}.qweight"].raw_data, np.uint8).reshape(stored.shape[1], -1)
            assert np.array_equal(unpack_int4_rows(packed)[:, : stored.shape[0]], stored.T)
            scale = numpy_helper.to_array(inits[f"{lin['path']}.scale"]).astype(np.float32)  # [G, out]
            assert np.array_equal(scale, tensors[f"{lin['path']}.scale"].numpy().T)
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_block_hessians_are_each_linears_input_gram_and_the_output_is_the_fp_block(model_type):
    """Shared inputs (q/k/v, gate/up) share one product and chunks are summed: the result is still
    2 X^T X / n of each linear's own input over every window, and the output the fp block's."""
    from qublast.apply import BlockTransform
    from qublast.arch import arch_for
    from qublast.blocks import BlockRunner, get_module
    from qublast.compensate import block_hessians
    from qublast.formats import get_format, get_target
    from tests.tiny import VOCAB, tiny_model

    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    runner = BlockRunner(model, spec, torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)))
    fit = runner.embed(torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(1)))  # 3 chunks of 2
    seen: dict[str, list] = {name: [] for name in spec.linears}
    handles = [get_module(runner.layers[0], name).register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).double())) for name in spec.linears]
    expected_out = runner.run_block_chunked(0, fit)
    for handle in handles:
        handle.remove()
    hessians, out = block_hessians(runner, 0, fit, BlockTransform(get_format("w4", get_target("cpu"))), with_output=True)
    assert set(hessians) == set(spec.linears)
    for name, chunks in seen.items():
        x = torch.cat(chunks)
        torch.testing.assert_close(hessians[name], (2.0 / x.shape[0] * x.T @ x).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)


def test_shared_linears_are_quantized_once_and_equal_a_fresh_quantization(monkeypatch):
    """The map and the map off (and the search's candidates) reuse a linear's codes only where its
    folded weight, format and Hessian or importance are unchanged: a reused result equals what a
    fresh GPTQ / round-to-nearest gives, and a folded linear is solved again."""
    from qublast.apply import BlockTransform, QuantMemo, block_transformed
    from qublast.arch import arch_for
    from qublast.blocks import BlockRunner
    from qublast.compensate import block_hessians, gptq_transform
    from qublast.formats import get_format, get_target
    from tests.tiny import VOCAB, tiny_model

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    runner = BlockRunner(model, spec, torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)))
    fit = runner.embed(torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1)))
    fmt = get_format("w4", get_target("cpu"))
    base = block_hessians(runner, 0, fit, BlockTransform(fmt))
    hidden_size = model.config.hidden_size
    folded = BlockTransform(fmt, {"input_layernorm": 0.5}, {"input_layernorm": torch.linspace(0.5, 2.0, hidden_size)})
    memo, solved = QuantMemo(), []
    import qublast.compensate as compensate
    original = compensate.gptq_quantize

    def counting(w, h, **kw):
        solved.append(w.shape)
        return original(w, h, **kw)

    monkeypatch.setattr(compensate, "gptq_quantize", counting)
    off = gptq_transform(runner, 0, fit, BlockTransform(fmt), hessians=base, memo=memo)
    first = len(solved)
    mapped = gptq_transform(runner, 0, fit, folded, hessians=base, memo=memo)
    monkeypatch.undo()
    fresh = gptq_transform(runner, 0, fit, folded, hessians=base)
    assert first == len(spec.linears)
    assert len(solved) - first == len(spec.groups[0].linears)  # only q/k/v (folded) solved again
    for name in spec.linears:
        assert torch.equal(mapped.codes[name].q, fresh.codes[name].q) and torch.equal(mapped.codes[name].scale, fresh.codes[name].scale)
    assert mapped.codes["self_attn.o_proj"] is off.codes["self_attn.o_proj"]
    assert not torch.equal(mapped.codes["self_attn.q_proj"].scale, off.codes["self_attn.q_proj"].scale)
    rtn_memo = QuantMemo()  # round-to-nearest in the map search: the same codes with and without it
    for t in (BlockTransform(fmt), folded, BlockTransform(fmt)):
        with block_transformed(runner.layers[0], spec, t, memo=rtn_memo) as reused:
            pass
        with block_transformed(runner.layers[0], spec, t) as plain:
            pass
        assert all(torch.equal(reused[n].q, plain[n].q) and torch.equal(reused[n].scale, plain[n].scale) for n in plain)
