"""Cross-block reconstruction on a tiny model: it lowers the window error, keeps codes and the
deployed format, and its recipe replays exactly through ONNX Runtime."""
from __future__ import annotations

import json

import pytest
import torch

from qublast.apply import BlockTransform
from qublast.arch import arch_for
from qublast.blocks import blocks_of
from qublast.calibrate import CalibConfig
from qublast.formats import get_format, get_target
from qublast.reconstruct import WindowCache, reconstruct
from qublast.vocab import VocabTransform
from tests.tiny import VOCAB, tiny_model


def test_reconstruction_lowers_the_window_error_and_keeps_the_codes():
    model = tiny_model("llama")
    spec = arch_for("llama")
    target = get_target("jetson")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    transforms = [BlockTransform(get_format("w4", target)) for _ in range(2)]
    vocab = VocabTransform.of(target, embed="fp16", head="fp16")
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    tuned, records = reconstruct(model, spec, transforms, vocab, ids, window=2, steps=30, log=lambda _m: None)
    assert len(records) == 1 and records[0]["after"] < records[0]["before"]
    for t in tuned:
        assert t.quantizer == "rtn+cbq" and set(t.codes) == set(spec.linears)
        for qw in t.codes.values():
            assert torch.equal(qw.scale, qw.scale.half().float()) and bool((qw.scale > 0).all())
            assert int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
    for name, p in model.named_parameters():  # the model comes back as it went in
        assert torch.equal(p, before[name]), name


def test_learned_rounding_moves_codes_one_step_towards_the_fp_weight_and_beats_fixed_codes():
    """``rounding="learned"``: from the codes it is given (round-to-nearest here), every code stays
    or moves one step towards the fp weight, inside the INT4 range, with fp16 scales; on the tiny
    model its first window (same start as the scales alone) ends with a lower error than tuning the
    scales alone (deterministic: seeded)."""
    from qublast.apply import fold_block, quantize_linear, restored
    from qublast.blocks import blocks_of, get_module

    model = tiny_model("llama", layers=4)
    spec = arch_for("llama")
    target = get_target("jetson")
    vocab = VocabTransform.of(target, embed="fp16", head="fp16")
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = [BlockTransform(get_format("w4", target)) for _ in range(4)]
    run = dict(window=2, steps=40, log=lambda _m: None)
    _, fixed_records = reconstruct(model, spec, plan, vocab, ids, **run)
    learned, records = reconstruct(model, spec, plan, vocab, ids, rounding="learned", **run)
    assert records[0]["before"] == fixed_records[0]["before"] and records[0]["after"] < fixed_records[0]["after"]
    assert all(r["after"] < r["before"] for r in records) and sum(r["moved"] for r in records) > 0
    moved = 0
    for layer, t in zip(blocks_of(model, spec), learned):
        assert t.quantizer == "rtn+cbq-round"
        with restored(layer):
            fold_block(layer, spec, t.smooth)
            for name, qw in t.codes.items():
                weight = get_module(layer, name).weight
                start = quantize_linear(get_module(layer, name), t.formats(spec)[name])  # the codes it started from
                step = qw.q.int() - start.q.int()
                assert int(step.abs().max()) <= 1 and int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
                exact = (weight.detach().view(qw.q.shape[0], -1, qw.block_size) / start.scale.unsqueeze(-1)).view_as(weight)
                towards = torch.sign(exact - start.q.float())
                assert bool((step[step != 0] == towards[step != 0]).all())  # only ever towards the fp weight
                assert torch.equal(qw.scale, qw.scale.half().float())
                moved += int((step != 0).sum())
    assert moved == sum(r["moved"] for r in records)


def _codes(tuned):
    return [{n: (qw.q.clone(), qw.scale.clone()) for n, qw in t.codes.items()} for t in tuned]


def _setting(layers: int, target_name: str = "jetson"):
    """(model, spec, target, vocab with fp16 table and head, token windows [4, 24], plan(*formats))."""
    model = tiny_model("llama", layers=layers)
    spec = arch_for("llama")
    target = get_target(target_name)
    vocab = VocabTransform.of(target, embed="fp16", head="fp16")
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))

    def plan(*formats):
        return [BlockTransform(get_format(f, target)) for f in formats]

    return model, spec, target, vocab, ids, plan


def test_window_cache_reuses_the_windows_before_the_first_changed_block():
    model, spec, target, vocab, ids, plan = _setting(4)
    run = dict(window=2, steps=10, log=lambda _m: None)
    cache = WindowCache()
    first, _ = reconstruct(model, spec, plan("w4", "w4", "w4", "w4"), vocab, ids, cache=cache, **run)
    changed = plan("w4", "w4", "w8a8", "w4")  # the second window changes, the first does not
    cached, records = reconstruct(model, spec, changed, vocab, ids, cache=cache, **run)
    fresh, fresh_records = reconstruct(model, spec, changed, vocab, ids, **run)
    assert [bool(r.get("cached")) for r in records] == [True, False] and cache.hits == 1
    for a, b in zip(_codes(cached), _codes(fresh)):  # reusing a window changes nothing
        assert a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert [r["after"] for r in records] == [r["after"] for r in fresh_records]
    other_vocab = VocabTransform.of(target, embed="w8", head="fp16")  # block 0's input changes: nothing reused
    _, records = reconstruct(model, spec, changed, other_vocab, ids, cache=cache, **run)
    assert not any(r.get("cached") for r in records)
    for i in (0, 1):  # the reused window's codes are the first plan's
        assert all(torch.equal(_codes(first)[i][n][1], _codes(cached)[i][n][1]) for n in _codes(first)[i])


def test_fp_windows_cost_no_tuning_and_the_fp_targets_serve_every_plan():
    """A plan's fp16 windows before its first quantized block output the fp targets themselves (no
    pass), a later fp16 window runs once and tunes nothing; the cache's fp targets serve a second
    plan; codes and errors are those of a reconstruction with no cache, bit for bit."""
    model, spec, _target, vocab, ids, plan = _setting(8, "cpu")
    run = dict(window=2, steps=5, log=lambda _m: None)
    cache = WindowCache()
    first = plan("fp16", "fp16", "w4", "fp16", "fp16", "fp16", "w4", "w4")
    second = plan("fp16", "fp16", "fp16", "fp16", "w4", "fp16", "fp16", "fp16")
    calls = []
    hook = blocks_of(model, spec)[0].register_forward_hook(lambda *_a: calls.append(1))
    for p in (first, second):
        calls.clear()
        cached, records = reconstruct(model, spec, p, vocab, ids, cache=cache, **run)
        assert len(calls) == (0 if p is second else 1)  # block 0 runs only in the first plan's fp capture pass
        fresh, fresh_records = reconstruct(model, spec, p, vocab, ids, **run)
        assert [(r["before"], r["after"], r["steps"]) for r in records] == [
            (r["before"], r["after"], r["steps"]) for r in fresh_records]
        for a, b in zip(_codes(cached), _codes(fresh)):
            assert a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert records[0] == {"blocks": [0, 1], "before": 0.0, "after": 0.0, "steps": 0}  # fp blocks, fp input
    assert records[3]["steps"] == 0 and records[3]["before"] == records[3]["after"] > 0  # fp blocks after a quantized one
    hook.remove()
    assert cache._fp is not None and cache.hits == 0


def test_retune_changed_keeps_the_tuned_scales_of_windows_whose_blocks_did_not_change():
    """retune="changed": after block 0 changes, the windows of blocks 2-5 keep the first plan's tuned
    codes (they fit the new input better than the plan's untuned ones), only blocks 0-1 are tuned
    again; the default tunes every window after the change; the model is left as it came."""
    model, spec, _target, vocab, ids, plan = _setting(6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = dict(window=2, steps=10, log=lambda _m: None)
    cache = WindowCache(retune="changed")
    first, _ = reconstruct(model, spec, plan(*["w4"] * 6), vocab, ids, cache=cache, **run)
    changed = plan("w8a8", *["w4"] * 5)
    kept, records = reconstruct(model, spec, changed, vocab, ids, cache=cache, **run)
    assert [bool(r.get("reused")) for r in records] == [False, True, True] and cache.reused == 2
    assert all(r["after"] <= r["before"] and r["steps"] == 0 for r in records[1:])
    for i in range(2, 6):  # the first plan's tuned codes and scales, unchanged
        assert all(torch.equal(_codes(first)[i][n][0], _codes(kept)[i][n][0]) and torch.equal(_codes(first)[i][n][1], _codes(kept)[i][n][1])
                   for n in _codes(first)[i])
    _, all_records = reconstruct(model, spec, changed, vocab, ids, cache=WindowCache(), **run)
    assert not any(r.get("reused") for r in all_records) and all(r["steps"] == 10 for r in all_records)
    assert records[0]["after"] == all_records[0]["after"]  # the changed window is tuned as before
    later = plan("w8a8", "w4", "w4", "w4", "w4m", "w4")  # then block 4 changes: its window is tuned, not reused
    _, records = reconstruct(model, spec, later, vocab, ids, cache=cache, **run)
    assert [(bool(r.get("cached")), bool(r.get("reused")) and not r.get("cached"), r["steps"]) for r in records] == [
        (True, False, 10), (True, False, 0), (False, False, 10)]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_plan_the_repair_keeps_is_deployed_as_it_was_measured():
    """calibrate's builder holds the last plan measured within the bound beside later builds: after
    three more reconstructed tries (the window cache keeps three plans), asking for it again returns
    the very build that was measured, with no fourth tuning (with --retune changed a second
    tuning could differ from the first)."""
    import numpy as np

    from qublast.calibrate import CalibConfig, _Builder
    from qublast.sensitivity import Sensitivity

    model = tiny_model("llama", layers=2)
    spec = arch_for("llama")
    formats = ("fp16", "w4m", "w4", "w8a8")
    table = [{f: Sensitivity(i, f, 0.0, 0.0) for f in formats} for i in range(2)]
    vocab_table = {"embed": {"fp16": Sensitivity("embed", "fp16", 0.0, 0.0)}, "lm_head": {"fp16": Sensitivity("lm_head", "fp16", 0.0, 0.0)}}
    cfg = CalibConfig(target="jetson", reconstruct_steps=2, retune="changed")
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    builder = _Builder(model, spec, get_target("jetson"), table, vocab_table, None, ids, cfg, log=lambda _m: None)
    kept = ["w4", "w4", "fp16/fp16"]
    measured = builder.build(kept)
    builder.keep(kept, reconstructed=True)
    for other in (["w4m", "w4"], ["w4", "w4m"], ["w8a8", "w4"]):
        builder.build([*other, "fp16/fp16"])
    assert builder.count == 4
    assert builder.build(kept) is measured and builder.count == 4
    assert builder.build(kept, reconstructed=False) is not measured  # another plan: built, not the kept one


def test_reused_codes_are_kept_only_where_they_fit_better():
    """An earlier plan's codes that match the fp output worse than the plan's own untuned codes on
    this input, or no better (the untuned codes themselves), are refused (None: the window is tuned)
    and its weights are put back; codes tuned on this input are kept, their weights in the model."""
    from dataclasses import replace

    from qublast.apply import transforms_applied
    from qublast.blocks import BlockRunner, get_module
    from qublast.reconstruct import _reused_window

    model = tiny_model("llama", layers=2)
    spec = arch_for("llama")
    target = get_target("jetson")
    vocab = VocabTransform.of(target, embed="fp16", head="fp16")
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    runner = BlockRunner(model, spec, ids, outputs=(1,), scored=False)
    with transforms_applied(model, spec, [BlockTransform(get_format("w4", target))] * 2, vocab) as qweights:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        worse = {i: {n: replace(qweights[f"{spec.blocks}.{i}.{n}"], scale=qweights[f"{spec.blocks}.{i}.{n}"].scale * 1.5)
                     for n in spec.linears} for i in (0, 1)}
        assert _reused_window(runner, range(2), runner.first_hidden, runner.outputs[1], worse) is None
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        same = {i: {n: qweights[f"{spec.blocks}.{i}.{n}"] for n in spec.linears} for i in (0, 1)}
        assert _reused_window(runner, range(2), runner.first_hidden, runner.outputs[1], same) is None  # no better: tuned instead
    tuned, records = reconstruct(model, spec, [BlockTransform(get_format("w4", target))] * 2, vocab, ids, window=2, steps=10,
                                 log=lambda _m: None)
    assert records[0]["after"] < records[0]["before"]
    better = {i: tuned[i].codes for i in (0, 1)}  # tuned on this very input: they fit better than the untuned codes
    with transforms_applied(model, spec, [BlockTransform(get_format("w4", target))] * 2, vocab):
        record, codes, out = _reused_window(runner, range(2), runner.first_hidden, runner.outputs[1], better)
        assert codes is better and record["reused"] and record["steps"] == 0
        assert record["before"] == pytest.approx(records[0]["before"]) and record["after"] == pytest.approx(records[0]["after"])
        assert torch.equal(get_module(model, f"{spec.blocks}.0.mlp.up_proj").weight, better[0]["mlp.up_proj"].dequantize())


@pytest.mark.parametrize("rounding", ["fixed", "learned"])
def test_reconstructed_bundle_replays_exactly(tiny_model_dir, tmp_path, rounding):
    from qublast.export import main
    from qublast.recipe import read_recipe

    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--uniform", "w4",
                 "--reconstruct", "2", "--reconstruct-steps", "10", "--rounding", rounding,
                 "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(out / "recipe.json")
    assert all(b["quantizer"].endswith("+cbq" if rounding == "fixed" else "+cbq-round") for b in recipe["blocks"])
    assert recipe["calibration"]["rounding"] == rounding
    assert recipe["allocation"]["reconstruction"][0]["after"] <= recipe["allocation"]["reconstruction"][0]["before"]
    costs = json.loads((out / "run.json").read_text())["calibration_costs"]  # the run's record, apart from the recipe
    assert "costs" not in recipe["calibration"]
    assert costs["reconstructions"] == 1 and costs["reconstruction_s"] > 0  # a fixed plan is reconstructed once
    assert f"cross-block reconstruction {costs['reconstruction_s']:.0f} s (1 plan reconstructed)" in (out / "report.md").read_text()
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 1e-4


@pytest.mark.parametrize("bound", ["0.05", "0.003"])  # 0.003: reconstruction leaves room, a smaller plan is tried
def test_repair_reconstructs_only_the_plan_it_keeps(tiny_model_dir, tmp_path, bound):
    """Under a PPL bound, repair compares plans as quantized; the kept plan is reconstructed and
    measured again, then repaired again if that left it over the bound or spent down if it left
    room, measuring reconstructed plans: one reconstruction per reconstructed measurement (the plan
    deployed is the build that was measured, even when later tries measured over), and the deployed
    plan fits."""
    from qublast.export import main
    from qublast.recipe import read_recipe

    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--max-ppl-increase", bound,
                 "--reconstruct", "2", "--reconstruct-steps", "5", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(out / "recipe.json")
    allocation = recipe["allocation"]
    history = allocation["repair"]
    if bound == "0.003":  # the reconstructed plan's room is spent on a smaller plan, measured reconstructed
        down = [step for step in history if step["action"] == "reconstructed down"]
        kept = next(step for step in history if step["action"] == "reconstructed")
        assert down and all(step["bytes"] < kept["bytes"] for step in down)
    # each reconstructed spend try is a reconstruction: the default --spend-tries caps them
    assert len([step for step in history if step["action"] == "reconstructed down"]) <= CalibConfig().spend_tries
    tuned = [step for step in history if step["action"].startswith("reconstruct")]
    measured = [step for step in tuned if step["action"] != "reconstructed kept"]  # "kept" repeats a measured plan
    costs = json.loads((out / "run.json").read_text())["calibration_costs"]
    deployed = [b["format"] for b in recipe["blocks"]]
    quantized = [b for b in recipe["blocks"] if b["format"] != "fp16"]
    assert tuned and costs["reconstructions"] == len(measured)
    if allocation["reconstructed"]:  # kept: it lowered the bound, and repair went on until it fit (or spent the room)
        assert tuned[0]["action"] == "reconstructed" and tuned[-1]["measured"] <= allocation["repair_target_dce"]
        assert tuned[-1]["formats"][:-1] == deployed
        assert all(b["quantizer"].endswith("+cbq") for b in quantized)
    else:  # dropped: the plan repair kept is deployed as quantized
        assert [step["action"] for step in tuned] == ["reconstruction dropped"]
        kept = next(step for step in history if step["action"] in ("kept", "plan", "up", "jump")
                    and step["formats"] == tuned[0]["formats"])
        assert tuned[0]["measured"] >= kept["measured"] and tuned[0]["formats"][:-1] == deployed
        assert not any(b["quantizer"].endswith("+cbq") for b in quantized)


def test_reconstruction_that_does_not_lower_the_heldout_loss_is_dropped(tiny_model_dir, tmp_path, monkeypatch):
    """A reconstruction that leaves the held-out bound where it was (here: one that changes
    nothing) is not deployed: the bundle carries the plan as quantized, and the recipe says why."""
    import qublast.calibrate as calibrate
    from qublast.export import main
    from qublast.recipe import read_recipe

    monkeypatch.setattr(calibrate, "reconstruct", lambda model, spec, transforms, *a, **k: (transforms, [{"before": 1.0, "after": 1.0}]))
    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--max-ppl-increase", "0.05",
                 "--reconstruct", "2", "--reconstruct-steps", "5", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(out / "recipe.json")
    allocation = recipe["allocation"]
    assert allocation["reconstructed"] is False and "reconstruction" not in allocation
    assert [s["action"] for s in allocation["repair"]].count("reconstruction dropped") == 1
    assert not any(b["quantizer"].endswith("+cbq") for b in recipe["blocks"])


def test_reconstruction_starts_from_the_models_own_block_input(monkeypatch):
    """Block 0's input is what the model feeds it: the (deployed) table's rows times Falcon-H1's
    embedding multiplier (1.7 in the tiny config), as the sweep's runner computes it."""
    import qublast.reconstruct as rec
    from qublast.blocks import BlockRunner

    model = tiny_model("falcon_h1")
    spec = arch_for("falcon_h1")
    target = get_target("cpu")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    transforms = [BlockTransform(get_format("w8", target)) for _ in range(model.config.num_hidden_layers)]
    seen = []
    real = rec._tune_window

    def spy(runner, spec, blocks, qweights, x_q, target, **kwargs):
        seen.append(x_q.clone())
        return real(runner, spec, blocks, qweights, x_q, target, **kwargs)

    monkeypatch.setattr(rec, "_tune_window", spy)
    reconstruct(model, spec, transforms, VocabTransform.of(target, embed="fp16", head="fp16"), ids, window=1, steps=1,
                log=lambda _m: None)
    fp = BlockRunner(model, spec, ids).first_hidden
    # equal up to the fp16 table's rounding (relative 2^-11 a row); without the multiplier it is 1.7x off
    torch.testing.assert_close(seen[0], fp, rtol=2e-3, atol=1e-3)
    assert float((seen[0] - fp).norm() / fp.norm()) < 1e-3


def test_an_all_fp16_plan_is_not_reconstructed(tiny_model_dir, tmp_path):
    """Nothing is quantized, so reconstruction has nothing to fit: no plan is reconstructed (it cost 75 s on SmolLM2)."""
    from qublast.export import main
    from qublast.recipe import read_recipe

    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--uniform", "fp16",
                 "--embeddings", "fp16", "--lm-head", "fp16", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    costs = json.loads((out / "run.json").read_text())["calibration_costs"]
    assert "reconstructions" not in costs
    assert "reconstruction" not in read_recipe(out / "recipe.json")["allocation"]


@pytest.mark.parametrize("quantizers", ["rtn,gptq", "rtn"])
def test_reconstruct_windows_are_the_sweeps_then_its_own(tiny_model_dir, tmp_path, monkeypatch, quantizers):
    """``--reconstruct-windows N`` tunes on N windows: the sweep's first, then windows drawn for it,
    none of them a held-out window or one GPTQ fitted its codes to; the recipe records N."""
    import numpy as np

    import qublast.calibrate as calibrate
    from qublast.export import main
    from qublast.recipe import read_recipe

    seen, drawn = {}, {}
    real_windows, real_reconstruct = calibrate.calib_windows, calibrate.reconstruct

    def windows(*a, **k):
        drawn["sets"] = real_windows(*a, **k)
        return drawn["sets"]

    def spy(model, spec, transforms, vocab, ids, **k):
        seen["ids"] = ids.numpy().copy()
        return real_reconstruct(model, spec, transforms, vocab, ids, **k)

    monkeypatch.setattr(calibrate, "calib_windows", windows)
    monkeypatch.setattr(calibrate, "reconstruct", spy)
    out = tmp_path / "r"
    gptq = ["--gptq-windows", "3"] if "gptq" in quantizers else []
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--uniform", "w4",
                 "--quantizers", quantizers, *gptq, "--reconstruct-windows", "4",
                 "--reconstruct-steps", "5", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    sens, *others, own = drawn["sets"]
    assert [len(s) for s in drawn["sets"]] == [2, 2, *([3] if gptq else []), 2]
    np.testing.assert_array_equal(seen["ids"], np.concatenate([sens, own]))
    elsewhere = {row.tobytes() for s in others for row in s}  # held-out windows, and GPTQ's
    assert not any(row.tobytes() in elsewhere for row in seen["ids"])
    assert read_recipe(out / "recipe.json")["calibration"]["reconstruct_windows"] == 4


def test_end_to_end_tuning_lowers_the_logit_kl_and_keeps_the_codes():
    """``tune_end_to_end``: after reconstruction, every quantized block's scales tuned at once against
    the fp model's logits lower the KL on the windows it tuned on; the codes stay, the scales are
    fp16 values, the quantizer says so, and the model comes back as it went in."""
    import copy

    from qublast.apply import transforms_applied
    from qublast.reconstruct import logit_kl, tune_end_to_end

    model = tiny_model("llama", layers=4)
    spec = arch_for("llama")
    target = get_target("jetson")
    vocab = VocabTransform.of(target, embed="fp16", head="fp16")
    ids = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(0))
    plan = [BlockTransform(get_format("w4", target)) for _ in range(4)]
    tuned, _ = reconstruct(model, spec, plan, vocab, ids, window=2, steps=10, log=lambda _m: None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = copy.deepcopy(model).eval()

    @torch.no_grad()
    def kl_of(transforms) -> float:
        with torch.no_grad():
            target_logits = teacher(input_ids=ids, use_cache=False).logits
        with transforms_applied(model, spec, transforms, vocab):
            return float(logit_kl(model(input_ids=ids, use_cache=False).logits, target_logits))

    lines = []
    e2e, record = tune_end_to_end(model, teacher, spec, tuned, vocab, ids, epochs=3, lr=1e-2, log=lines.append)
    assert record["steps"] == 18 and record["last_pass_kl"] < record["first_pass_kl"] and len(lines) == 3
    assert kl_of(e2e) < kl_of(tuned)
    for t, t0 in zip(e2e, tuned):
        assert t.quantizer == "rtn+cbq+e2e" and set(t.codes) == set(t0.codes) == set(spec.linears)
        for name, qw in t.codes.items():
            assert torch.equal(qw.q, t0.codes[name].q)
            assert torch.equal(qw.scale, qw.scale.half().float()) and bool((qw.scale > 0).all())
        assert any(not torch.equal(qw.scale, t0.codes[n].scale) for n, qw in t.codes.items())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad == before[name].requires_grad, name


def test_end_to_end_tuned_bundle_replays_exactly(tiny_model_dir, tmp_path):
    """``--e2e-windows``: the deployed bundle carries the end-to-end tuned scales (quantizer
    "+cbq+e2e", the record in the recipe) and ONNX Runtime measures what PyTorch measured."""
    from qublast.export import main
    from qublast.recipe import read_recipe

    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), "--target", "jetson", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--uniform", "w4",
                 "--reconstruct-steps", "5", "--e2e-windows", "2", "--e2e-epochs", "2",
                 "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(out / "recipe.json")
    assert all(b["quantizer"].endswith("+cbq+e2e") for b in recipe["blocks"])
    assert recipe["calibration"]["e2e_windows"] == 2 and recipe["allocation"]["end_to_end"]["steps"] == 4
    costs = json.loads((out / "run.json").read_text())["calibration_costs"]
    assert 0 < costs["e2e_s"] <= costs["reconstruction_s"]
    assert f"end-to-end tuning {costs['e2e_s']:.0f} s of it" in (out / "report.md").read_text()
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 1e-4


@pytest.mark.parametrize("flags", [["--e2e-epochs", "3"], ["--e2e-windows", "2", "--reconstruct", "0"],
                                   ["--e2e-windows", "-1"], ["--e2e-windows", "2", "--e2e-epochs", "0"]])
def test_end_to_end_flags_are_checked_before_any_work(tiny_model_dir, tmp_path, capsys, flags):
    from qublast.export import main

    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), "--uniform", "w4", *flags, "--out", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 2
    assert not out.exists() and "e2e" in capsys.readouterr().err
