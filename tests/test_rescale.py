"""Exact rescaling for fp16 graphs (``qublast.rescale``): the rescaled model is the same function,
and a model whose activations reach 4x fp16's largest value overflows an fp16 ONNX graph
without it and matches the fp32 PyTorch model with it; through the CLI it gives a verified
Jetson bundle whose recipe and report state the factors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from export import onnx_export
from qublast import rescale
from qublast.arch import REGISTRY, arch_for
from qublast.blocks import BlockRunner, blocks_of
from qublast.evaluate import FP16_MAX, PeakRecorder, fp16_overflow
from runtime.session import OrtModel
from tests.tiny import VOCAB, tiny_model

ARCHS = sorted(REGISTRY)
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def _peaks(model, spec) -> dict[str, float]:
    with PeakRecorder(model) as rec, torch.no_grad():
        BlockRunner(model, spec, IDS)
    return rec.peaks


def _inflated(model_type: str, times: float = 4.0):
    """A tiny model rewritten (exactly, by the inverse rescaling) so its residual stream and every
    gated product peak at ``times`` x fp16's largest value: the same function, out of fp16's range."""
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    peaks = _peaks(model, spec)
    residual, _ = rescale.residual_peak(peaks, spec, len(blocks_of(model, spec)))
    up = {str(i): peaks[f"{spec.blocks}.{i}.{spec.up_down[1]}{rescale.INPUT}"] for i in range(len(blocks_of(model, spec)))} if spec.up_down else {}
    factors = {"residual": residual / (times * FP16_MAX), "up_down": {i: p / (times * FP16_MAX) for i, p in up.items()}}
    rescale.apply(model, spec, factors)
    delattr(model, rescale._APPLIED)  # the inflated model is the user's model now
    return model, spec


@pytest.mark.parametrize("model_type", ARCHS)
def test_rescaled_model_is_the_same_function(model_type):
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    if not rescale.supported(spec):
        pytest.fail(f"{model_type} has no rescaling entry")
    factors = {"residual": 64.0, "up_down": {"0": 16.0} if spec.up_down else {}}
    rescale.apply(model, spec, factors)
    rescale.apply(model, spec, factors)  # a second time is a no-op
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    peaks = _peaks(model, spec)
    assert max(peaks[f"{spec.blocks}.{i}"] for i in range(len(blocks_of(model, spec)))) < 1.0  # the stream is 64x smaller


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_fp16_graph_overflows_without_rescaling_and_matches_with_it(model_type, tmp_path):
    model, spec = _inflated(model_type)
    with torch.no_grad():
        ref = model(input_ids=IDS[:1]).logits.numpy()
    peaks = _peaks(model, spec)
    assert fp16_overflow({"max": max(peaks.values()), "where": "x"})
    residual, where = rescale.residual_peak(peaks, spec, len(blocks_of(model, spec)))
    assert residual == pytest.approx(4 * FP16_MAX, rel=1e-3), where

    def ort_logits(m, name):
        onnx_export.export_onnx(copy.deepcopy(m).to(torch.float16), tmp_path / f"{name}.onnx", kind=spec.kind)
        logits, _ = OrtModel(str(tmp_path / f"{name}.onnx")).forward(IDS[:1].numpy())
        return logits

    broken = ort_logits(model, "plain")
    assert not np.isfinite(broken).all()  # inf/NaN: the fp16 graph cannot hold the residual stream
    factors = rescale.choose(peaks, spec, len(blocks_of(model, spec)))
    # 4x over with 2x headroom and the 2x margin for quantization: 16, or 32 where rounding put the peak a hair above 4x
    assert factors["residual"] in (16.0, 32.0) and min(factors["up_down"].values()) >= 16.0
    assert len(factors["up_down"]) == len(blocks_of(model, spec))
    rescale.apply(model, spec, factors)
    after = _peaks(model, spec)
    assert not fp16_overflow({"max": max(after.values()), "where": "x"})
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS[:1]).logits, torch.from_numpy(ref), rtol=1e-4, atol=1e-4)
    fixed = ort_logits(model, "rescaled")
    span = float(ref.max() - ref.min())
    np.testing.assert_allclose(fixed, ref, atol=2e-2 * span, rtol=0)


def test_jetson_bundle_of_a_model_beyond_fp16(tmp_path, capsys):
    """The CLI on a Llama that peaks at 4x fp16's largest value: rescaled, calibrated, exported in
    fp16 and verified; the recipe records the factors and the report states them."""
    from qublast.export import main
    from qublast.recipe import read_recipe
    from qublast.text import calib_text
    from tests.tiny import tiny_tokenizer

    model, _ = _inflated("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer(calib_text().text).save_pretrained(tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "--target", "jetson", "--calib-seqlen", "32", "--calib-windows", "2",
            "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--context", "64",
            "--max-ppl-increase", "0.05", "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "residual stream divided by " in err
    recipe = read_recipe(tmp_path / "b" / "recipe.json")
    factors = recipe["model"]["rescale"]
    assert factors["residual"] in (16.0, 32.0) and factors["peak_before"] > 2 * FP16_MAX and factors["peak_after"] <= FP16_MAX / 4
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    assert "Rescaled for fp16" in (tmp_path / "b" / "report.md").read_text()
    # the recipe replays on the original (inflated) weights: the same factors fold again
    assert main([*args[:4], "--seqlen", "32", "--max-eval-windows", "3", "--context", "64", "--recipe",
                 str(tmp_path / "b" / "recipe.json"), "--out", str(tmp_path / "again"), "--cache-dir", str(tmp_path / "c")]) == 0
    again = json.loads((tmp_path / "again" / "recipe.json").read_text())
    assert again["metrics"]["ppl_quant_ort"] == pytest.approx(m["ppl_quant_ort"], rel=1e-6)


def test_vocabulary_heavy_gemma_on_jetson_takes_a_host_table(tmp_path):
    """A tied Gemma 3 whose table is 78% of its weights (Gemma-3-270M's is 63%): with a size
    budget the allocation picks what NVIDIA's edge stack deploys, a host-side INT4 table and an
    INT4 ``lm_head`` in the graph, and the bundle's files hold it."""
    from transformers import AutoModelForCausalLM

    from qublast.export import main
    from qublast.recipe import read_recipe
    from qublast.text import calib_text
    from tests.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("gemma3_text")
    config.vocab_size = 4096  # rows beyond the tokenizer's are never looked up, but count as they would
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(tmp_path / "g")
    tiny_tokenizer(calib_text().text).save_pretrained(tmp_path / "g")
    assert main(["--model", str(tmp_path / "g"), "--target", "jetson", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--context", "64",
                 "--target-size", "0.6", "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(tmp_path / "b" / "recipe.json")
    m = recipe["metrics"]
    assert recipe["embedding"]["storage"] == "side_table" and recipe["embedding"]["format"] == "w4"
    assert recipe["lm_head"]["format"] == "w4"
    assert m["size_bytes"] <= 0.6 * m["size_bytes_fp16"]
    assert m["size_files"]["embedding.safetensors"] < 4096 * 64  # under a byte a row entry: INT4 codes and their scales


def test_attention_scores_are_recorded_and_an_overflow_there_is_refused_by_name(tmp_path, capsys):
    """q·kᵀ is a tensor the fp16 graph stores (an fp16 MatMul before the fp32 softmax): its peak is
    recorded as the export's attention computes it, and where it exceeds fp16's headroom, which no
    exact rescaling moves, the Jetson target refuses the model naming that tensor."""
    from qublast.evaluate import SCORES
    from qublast.export import main
    from qublast.text import calib_text
    from tests.tiny import tiny_tokenizer

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    attn = blocks_of(model, spec)[1].self_attn
    seen = []
    handle = attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    peaks = _peaks(model, spec)
    handle.remove()
    # the same scores by hand, as transformers' eager attention forms them (before the mask)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    by_hand = 0.0
    with torch.no_grad():
        for kwargs in seen:
            x, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
            shape = (*x.shape[:2], -1, attn.head_dim)
            q, k = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
            by_hand = max(by_hand, float((q @ k.transpose(-1, -2) * attn.scaling).abs().max()))
    key = f"{spec.blocks}.1.self_attn{SCORES}"
    assert peaks[key] == pytest.approx(by_hand, rel=1e-5)
    boost = (64 * FP16_MAX / peaks[key]) ** 0.5  # scores grow with the product of the two factors
    with torch.no_grad():
        attn.q_proj.weight.mul_(boost)
        attn.k_proj.weight.mul_(boost)
    after = _peaks(model, spec)
    assert after[key] == pytest.approx(64 * FP16_MAX, rel=1e-3)
    assert max(v for k, v in after.items() if not k.endswith(SCORES)) < FP16_MAX / 2  # nothing else is near
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer(calib_text().text).save_pretrained(tmp_path / "m")
    code = main(["--model", str(tmp_path / "m"), "--target", "jetson", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--context", "64",
                 "--max-ppl-increase", "0.05", "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{spec.blocks}.1.self_attn{SCORES} reaches" in err and "exact rescaling moves only" in err
    assert not (tmp_path / "b").exists()


def test_factors_leave_room_for_quantization_once_rescaling_is_needed():
    """Below LIMIT nothing moves; once one tensor exceeds it, every rescalable tensor is brought to
    LIMIT / QUANT_MARGIN (the quantized model peaks higher than the fp one: docs/results.md)."""
    spec = REGISTRY["llama"]
    names = {"residual": f"{spec.blocks}.0", "product": f"{spec.blocks}.1.{spec.up_down[1]}{rescale.INPUT}"}
    near = {names["residual"]: 0.9 * rescale.LIMIT, names["product"]: 0.9 * rescale.LIMIT}
    assert rescale.choose(near, spec, 2) is None
    over = {**near, names["residual"]: 3 * rescale.LIMIT}
    factors = rescale.choose(over, spec, 2)
    target = rescale.LIMIT / rescale.QUANT_MARGIN
    assert factors["residual"] == 8.0 and 3 * rescale.LIMIT / 8 <= target  # 3x over: 4 would leave 0.75 LIMIT
    assert factors["up_down"] == {"1": 2.0}  # the product at 0.9 LIMIT is moved below the margin too
