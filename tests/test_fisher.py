"""The sweep's linear-cost estimate (qublast.fisher): it predicts a block change's end-to-end KL
and dCE on every architecture, and the sweep using it runs a constant number of block forwards
per block whatever the depth (the full measurement's count grows with it)."""
from __future__ import annotations

import pytest
import torch

from qublast.arch import arch_for
from qublast.blocks import BlockRunner
from qublast.fisher import output_gradients
from qublast.formats import embed_format, get_format, get_target
from qublast.sensitivity import _estimate_table, sweep
from qublast.vocab import VocabTransform, score_vocab
from tests.tiny import VOCAB, tiny_model

ARCHS = ["llama", "qwen2", "gemma3_text", "mamba", "falcon_h1"]


def _ids(n=4, seqlen=24, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ARCHS)
def test_estimate_predicts_a_small_block_change(model_type):
    """A weight of block 0 moved a little: the predicted KL matches running the model, and so does
    the first-order part of dCE (the symmetric difference of a move and its opposite cancels the
    curvature of CE, which the estimate's Gauss-Newton term does not hold)."""
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    runner = BlockRunner(model, spec, _ids())
    grads = output_gradients(runner, samples=64)
    linear = runner.layers[0].get_submodule(spec.linears[-1])
    out_fp = runner.run_block(0, runner.first_hidden)
    original = linear.weight.clone()
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(1)) * original.std()

    def moved(step):
        try:
            linear.weight.add_(noise * step)
            out = runner.run_block(0, runner.first_hidden)
            return out - out_fp, runner.score(runner.run_from(1, out))
        finally:
            linear.weight.copy_(original)

    delta, full = moved(0.3)
    _dce, kl = grads.estimate(0, delta)
    assert full.kl > 1e-6 and kl == pytest.approx(full.kl, rel=0.3)
    (up, up_full), (down, down_full) = moved(0.05), moved(-0.05)
    first = (grads.estimate(0, up)[0] - grads.estimate(0, up)[1] - grads.estimate(0, down)[0] + grads.estimate(0, down)[1]) / 2
    measured = (up_full.ce - down_full.ce) / 2
    assert abs(measured) > 1e-7 and first == pytest.approx(measured, rel=0.3)


@pytest.mark.parametrize("model_type", ARCHS)
def test_table_rows_are_estimated_from_the_gradient_at_block_0s_input(model_type, tmp_path):
    """A Fisher sweep estimates the embedding table's rows (no block runs for them); the estimate
    is the full measurement's KL to second order (w8, a small change) and ranks w4 above w8."""
    model = tiny_model(model_type)
    runner = BlockRunner(model, arch_for(model.config.model_type), _ids())
    grads = output_gradients(runner, samples=64)
    full = {name: score_vocab(runner, VocabTransform(embed_format(name), get_format("fp16", get_target("cpu"))), unit="embed")
            for name in ("w8", "w4")}
    estimated = {name: _estimate_table(runner, name, grads) for name in ("w8", "w4")}
    assert full["w8"].kl > 1e-9 and estimated["w8"].kl == pytest.approx(full["w8"].kl, rel=0.3)
    assert estimated["w4"].kl > estimated["w8"].kl and full["w4"].kl > full["w8"].kl
    calls = 0
    forward = runner.block_forward

    def counted(index, hidden):
        nonlocal calls
        calls += 1
        return forward(index, hidden)

    runner.block_forward = counted
    _, vocab = sweep(runner, get_target("cpu"), ("fp16",), journal=tmp_path / "j.jsonl", fingerprint="f",
                     vocab={"embed": ("w8", "w4")}, estimate="fisher", quantizers=("rtn",))
    assert all(vocab["embed"][name].estimated for name in ("w8", "w4"))
    assert calls == len(runner.layers) * runner.ids.shape[0]  # the gradient pass only: one forward a window


def _block_forwards(layers: int, estimate: str, tmp_path) -> int:
    model = tiny_model("llama", layers=layers)
    runner = BlockRunner(model, arch_for("llama"), _ids(n=2, seqlen=16))
    calls = 0
    forward = runner.block_forward

    def counted(index, hidden):
        nonlocal calls
        calls += 1
        return forward(index, hidden)

    runner.block_forward = counted
    table, _ = sweep(runner, get_target("cpu"), ("fp16", "w4"), journal=tmp_path / f"{layers}-{estimate}.jsonl",
                     fingerprint="f", scaling=False, estimate=estimate, quantizers=("rtn",))
    assert all(row["w4"].estimated == (estimate == "fisher") for row in table)
    return calls


def test_fisher_sweep_cost_grows_linearly_with_depth(tmp_path):
    fisher = {n: _block_forwards(n, "fisher", tmp_path) for n in (2, 6)}
    full = {n: _block_forwards(n, "full", tmp_path) for n in (2, 6)}
    assert fisher[6] / 6 == pytest.approx(fisher[2] / 2, abs=1)  # the same per block at any depth
    assert full[6] / 6 > full[2] / 2 + 1  # every measurement runs the later blocks


def test_fisher_rows_keep_the_lower_kl_of_map_and_map_off(tmp_path):
    model = tiny_model("llama")
    runner = BlockRunner(model, arch_for("llama"), _ids())
    table, _ = sweep(runner, get_target("cpu"), ("fp16", "w8", "w4"), journal=tmp_path / "j.jsonl", fingerprint="f",
                     estimate="fisher", quantizers=("rtn",))
    for row in table:
        for kept in (row["w8"], row["w4"]):
            assert kept.estimated and 0 <= kept.kl <= kept.kl_unscaled  # the estimate decides by KL
        assert row["w4"].kl > row["w8"].kl  # fewer bits, more loss


@pytest.mark.parametrize("target_name", ["cpu", "jetson"])
def test_lm_head_kl_is_to_the_fp_logits_when_they_are_not_kept(monkeypatch, target_name):
    """Over a large vocabulary the runner recomputes the fp log-probabilities per score instead of
    keeping them; scoring a quantized lm_head must still compare with the fp head's logits (it once
    compared the quantized head with itself and reported KL 0 on Qwen2.5's 152k vocabulary)."""
    import qublast.blocks as blocks
    from qublast.formats import embed_format, get_format
    from qublast.vocab import VocabTransform, score_vocab

    model = tiny_model("qwen2")
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    target = get_target(target_name)
    head = VocabTransform(embed_format("fp16"), get_format("w4", target))
    kept = score_vocab(BlockRunner(model, spec, ids), head, unit="lm_head")
    monkeypatch.setattr(blocks, "REF_CACHE_BYTES", 0)
    runner = BlockRunner(model, spec, ids)
    assert runner.ref_logprobs is None
    recomputed = score_vocab(runner, head, unit="lm_head")
    assert kept.kl > 1e-4
    assert recomputed.kl == pytest.approx(kept.kl, rel=1e-4) and recomputed.ce == pytest.approx(kept.ce, rel=1e-6)
    assert runner.score(runner.final_hidden).kl == pytest.approx(0.0, abs=1e-7)  # the head is fp again after
