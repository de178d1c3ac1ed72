"""The multiple-choice knapsack against brute force, and measured repair with a fake measure."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from qublast.allocate import (
    Choice,
    Plan,
    best_upgrade,
    pareto_frontier,
    predicted,
    repair,
    solve_for_loss,
    solve_for_size,
)
from qublast.errors import BudgetError

SEEDS = range(8)


def _instance(seed: int, blocks: int = 6, per_block: int = 3) -> list[list[Choice]]:
    """Random options; losses are multiples of 1/8 (exact float sums, ties happen), some negative."""
    rng = random.Random(seed)
    options = []
    for b in range(blocks):
        sizes = rng.sample(range(1, 12), per_block)
        options.append([Choice(f"f{k}", sizes[k], rng.randint(-4, 16) / 8) for k in range(per_block)])
    return options


def _all_plans(options):
    for combo in itertools.product(*options):
        yield tuple(c.format for c in combo), sum(c.bytes for c in combo), sum(c.loss for c in combo)


def _brute_frontier(options) -> set[tuple[int, float]]:
    points = {(b, loss) for _, b, loss in _all_plans(options)}
    return {
        p for p in points
        if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points)
    }


def _totals(options, formats) -> tuple[int, float]:
    chosen = [next(c for c in block if c.format == f) for block, f in zip(options, formats)]
    return sum(c.bytes for c in chosen), sum(c.loss for c in chosen)


@pytest.mark.parametrize("seed", SEEDS)
def test_pareto_frontier_matches_brute_force(seed):
    options = _instance(seed)
    frontier = pareto_frontier(options)
    assert {(p.bytes, p.loss) for p in frontier} == _brute_frontier(options)
    assert len(frontier) == len({(p.bytes, p.loss) for p in frontier})  # one plan per point
    assert [p.bytes for p in frontier] == sorted(p.bytes for p in frontier)
    assert all(a.bytes < b.bytes and a.loss > b.loss for a, b in zip(frontier, frontier[1:]))
    for plan in frontier:
        assert len(plan.formats) == len(options)
        assert _totals(options, plan.formats) == (plan.bytes, plan.loss)


@pytest.mark.parametrize("seed", SEEDS)
def test_solve_for_size_matches_brute_force(seed):
    options = _instance(seed)
    plans = list(_all_plans(options))
    smallest = min(b for _, b, _ in plans)
    largest = max(b for _, b, _ in plans)
    for budget in range(smallest, largest + 2):
        plan = solve_for_size(options, budget)
        best = min(loss for _, b, loss in plans if b <= budget)
        assert plan.bytes <= budget
        assert plan.loss == best
        assert _totals(options, plan.formats) == (plan.bytes, plan.loss)


@pytest.mark.parametrize("seed", SEEDS)
def test_solve_for_loss_matches_brute_force(seed):
    options = _instance(seed)
    plans = list(_all_plans(options))
    losses = sorted({loss for _, _, loss in plans})
    for max_loss in losses[:: max(1, len(losses) // 25)] + [losses[-1] + 1.0]:
        plan = solve_for_loss(options, max_loss)
        fewest = min(b for _, b, loss in plans if loss <= max_loss)
        assert plan.loss <= max_loss
        assert plan.bytes == fewest
        # among the fewest-byte plans it has the least loss
        assert plan.loss == min(loss for _, b, loss in plans if b == fewest and loss <= max_loss)
        assert _totals(options, plan.formats) == (plan.bytes, plan.loss)


@pytest.mark.parametrize("seed", SEEDS)
def test_budget_errors(seed):
    options = _instance(seed)
    smallest = sum(min(c.bytes for c in block) for block in options)
    with pytest.raises(BudgetError, match=str(smallest)):
        solve_for_size(options, smallest - 1)
    assert solve_for_size(options, smallest).bytes == smallest
    least = min(loss for _, _, loss in _all_plans(options))
    with pytest.raises(BudgetError):
        solve_for_loss(options, least - 0.125)
    assert solve_for_loss(options, least).loss == least


# Repair: three blocks, fp16 / w8 / w4; predicted losses are optimistic, the "true" ones are not.
REPAIR_OPTIONS = [
    [Choice("fp16", 100, 0.0), Choice("w8", 50, 0.010), Choice("w4", 25, 0.040)],
    [Choice("fp16", 100, 0.0), Choice("w8", 50, 0.002), Choice("w4", 25, 0.030)],
    [Choice("fp16", 200, 0.0), Choice("w8", 100, 0.004), Choice("w4", 50, 0.100)],
]
TRUE_LOSS = {"fp16": 0.0, "w8": 0.02, "w4": 0.06}


def _measure(formats: list[str]) -> float:
    return sum(TRUE_LOSS[f] * (i + 1) for i, f in enumerate(formats))


def _rate_table(formats, options) -> list[tuple[float, int, str]]:
    """Every upgrade of the most coarsely stored blocks as (loss saved per extra byte, block, format)."""
    def coarseness(i, f):
        return round({c.format: c.bytes for c in options[i]}[f] / max(c.bytes for c in options[i]), 3)

    open_blocks = [i for i, f in enumerate(formats) if f != "fp16"]
    coarsest = min(coarseness(i, formats[i]) for i in open_blocks)
    rates = []
    for i, f in enumerate(formats):
        now = {c.format: c for c in options[i]}[f]
        if coarseness(i, f) != coarsest:
            continue
        larger = [c.bytes for c in options[i] if c.bytes > now.bytes]
        for c in options[i]:
            if larger and c.bytes == min(larger):
                rates.append(((now.loss - c.loss) / (c.bytes - now.bytes), i, c.format))
    return rates


def test_best_upgrade_picks_highest_rate():
    formats = ["w4", "w4", "w4"]
    step = best_upgrade(formats, REPAIR_OPTIONS)
    rates = _rate_table(formats, REPAIR_OPTIONS)
    top = max(r for r, _, _ in rates)
    assert step is not None
    index, option = step
    assert (top, index, option.format) in rates
    # block 2 w4 -> w8 saves 0.096 over 50 bytes: the best rate here
    assert (index, option.format) == (2, "w8")
    assert best_upgrade(["fp16", "fp16", "fp16"], REPAIR_OPTIONS) is None


def test_repair_upgrades_until_measured_fits():
    plan = Plan(("w4", "w4", "w4"), 100, 0.17)
    max_loss = 0.1
    logs: list[str] = []
    calls: list[list[str]] = []

    def measure(formats):
        calls.append(list(formats))
        return _measure(formats)

    formats, history = repair(plan, REPAIR_OPTIONS, max_loss=max_loss, measure=measure, log=logs.append, far=math.inf)
    assert history[0] == {"formats": ["w4", "w4", "w4"], "measured": _measure(["w4", "w4", "w4"]), "predicted": pytest.approx(0.17),
                          "bytes": 100, "action": "plan"}
    assert history[-1]["measured"] <= max_loss
    assert all(h["measured"] > max_loss for h in history[:-1])
    assert formats == history[-1]["formats"]
    assert len(history) >= 3 and len(logs) == len(history) - 1 and len(calls) == len(history)
    for before, after in zip(history, history[1:]):
        rates = _rate_table(before["formats"], REPAIR_OPTIONS)
        top = max(r for r, _, _ in rates)
        assert (top, after["upgraded"], after["to"]) in rates
        changed = [i for i, (a, b) in enumerate(zip(before["formats"], after["formats"])) if a != b]
        assert changed == [after["upgraded"]]
        assert after["formats"][after["upgraded"]] == after["to"]
        assert after["measured"] == _measure(after["formats"])


def test_repair_far_over_the_bound_jumps_by_the_measured_ratio():
    """Measured 3.6x the bound: the next plan is the knapsack's for the predicted loss scaled by
    predicted / measured (a larger plan, in one measurement), then single upgrades near the bound."""
    plan = Plan(("w4", "w4", "w4"), 100, 0.17)
    formats, history = repair(plan, REPAIR_OPTIONS, max_loss=0.1, measure=_measure, log=lambda _m: None)
    jump = history[1]
    assert jump["action"] == "jump"
    scaled = 0.1 * history[0]["predicted"] / history[0]["measured"]
    expected = next(p for p in pareto_frontier(REPAIR_OPTIONS) if p.loss <= scaled)
    assert jump["formats"] == list(expected.formats) and jump["bytes"] > history[0]["bytes"]
    assert history[-1]["measured"] <= 0.1 and formats == history[-1]["formats"]
    _, stepwise = repair(plan, REPAIR_OPTIONS, max_loss=0.1, measure=_measure, log=lambda _m: None, far=math.inf)
    assert len(history) < len(stepwise)  # fewer measurements than one block at a time


def test_repair_just_over_the_bound_jumps_too():
    """Predictions 0.7x the truth (what Qwen2.5-0.5B measured) and a first plan 1.3x over: one
    calibrated jump lands under the bound, where one block at a time takes several measurements."""
    options = [[Choice("fp16", 100, 0.0), Choice("w8", 50, 0.004), Choice("w4", 25, 0.010)] for _ in range(12)]

    def measure(formats):
        return sum(next(c.loss for c in unit if c.format == f) for f, unit in zip(formats, options)) / 0.7

    plan = solve_for_loss(options, 0.1)
    assert 1.0 < measure(list(plan.formats)) / 0.1 < 1.5
    formats, history = repair(plan, options, max_loss=0.1, measure=measure, log=lambda _m: None)
    assert [h["action"] for h in history] == ["plan", "jump"] and measure(formats) <= 0.1
    _, stepwise = repair(plan, options, max_loss=0.1, measure=measure, log=lambda _m: None, far=math.inf)
    assert len(stepwise) > len(history)


def test_best_upgrade_takes_the_coarsest_blocks_first():
    # block 1's w8 -> fp16 has the best predicted rate, but block 0 is still w4: its upgrade comes first
    options = [
        [Choice("fp16", 100, 0.0), Choice("w8", 50, 0.001), Choice("w4", 25, 0.0005)],  # noisy: w4 looks free
        [Choice("fp16", 100, 0.0), Choice("w8", 50, 0.010), Choice("w4", 25, 0.030)],
    ]
    assert best_upgrade(["w4", "w8"], options) == (0, options[0][1])
    assert best_upgrade(["w8", "w8"], options) == (1, options[1][0])


def test_repair_leaves_a_good_plan_alone():
    plan = Plan(("w8", "fp16", "fp16"), 250, 0.01)
    formats, history = repair(plan, REPAIR_OPTIONS, max_loss=0.05, measure=_measure, log=lambda s: None)
    assert formats == ["w8", "fp16", "fp16"]
    assert len(history) == 1


def test_repair_stops_when_nothing_is_left_to_upgrade():
    plan = Plan(("w4", "w4", "w4"), 100, 0.17)
    formats, history = repair(plan, REPAIR_OPTIONS, max_loss=-1.0, measure=_measure, log=lambda s: None)
    assert formats == ["fp16", "fp16", "fp16"]
    assert history[-1]["measured"] == 0.0


def test_two_sided_repair_spends_the_room_the_measurement_leaves():
    """Predictions 10x too pessimistic: the measured bound of the first plan leaves room, so the
    repair moves to smaller plans (calibrating predicted to measured), never past max_loss, and
    every step records predicted and measured loss."""
    options = [[Choice("fp16", 100, 0.0), Choice("w8", 50, 0.02), Choice("w4", 25, 0.08)] for _ in range(4)]

    def measure(formats):  # the truth: a tenth of the prediction
        return 0.1 * sum(next(c.loss for c in unit if c.format == f) for f, unit in zip(formats, options))

    plan = solve_for_loss(options, 0.05)  # predicted <= 0.05: two w8 blocks
    formats, history = repair(plan, options, max_loss=0.05, measure=measure, log=lambda _m: None, spend_tries=4)
    final = next(h for h in history if h["action"] == "kept")
    assert final["formats"] == formats and final["measured"] <= 0.05
    assert final["bytes"] < plan.bytes  # the budget was spent, not left unused
    assert all({"predicted", "measured", "bytes", "action"} <= set(h) for h in history)
    assert all(h["measured"] == pytest.approx(0.1 * h["predicted"]) for h in history)
    assert len([h for h in history if h["action"] == "down"]) <= 4
    unspent, _ = repair(plan, options, max_loss=0.05, measure=measure, log=lambda _m: None, spend_tries=0)
    assert unspent == list(plan.formats)


def test_two_sided_repair_backs_off_from_a_plan_that_does_not_fit():
    """A plan that looks cheap but measures over the bound is not kept."""
    options = [[Choice("fp16", 100, 0.0), Choice("w8", 50, 0.01), Choice("w4", 25, 0.02)] for _ in range(3)]

    def measure(formats):  # w4 is much worse than predicted
        return sum({"fp16": 0.0, "w8": 0.001, "w4": 0.2}[f] for f in formats)

    plan = solve_for_loss(options, 0.03)
    formats, history = repair(plan, options, max_loss=0.03, measure=measure, log=lambda _m: None, spend_tries=3)
    assert measure(formats) <= 0.03
    assert any(h["measured"] > 0.03 for h in history if h["action"] == "down")


def test_spend_measures_one_step_down_when_the_calibrated_target_admits_no_smaller_plan():
    """The first plan measures a little under its prediction, so the calibrated target admits no
    smaller plan; w4 is in truth far better than predicted. Spend measures the next plan down the
    frontier anyway and keeps each that fits; a step that measures over is not kept and ends it."""
    options = [[Choice("fp16", 100, 0.0), Choice("w8", 50, 0.02), Choice("w4", 25, 0.08)] for _ in range(2)]

    def measure_with(w4):
        return lambda formats: sum({"fp16": 0.0, "w8": 0.018, "w4": w4}[f] for f in formats)

    plan = solve_for_loss(options, 0.05)
    assert plan.formats == ("w8", "w8")
    formats, history = repair(plan, options, max_loss=0.05, measure=measure_with(0.02), log=lambda _m: None,
                              spend_tries=4)
    assert formats == ["w4", "w4"]
    assert [h["bytes"] for h in history if h["action"] == "down"] == [75, 50]
    formats, history = repair(plan, options, max_loss=0.05, measure=measure_with(0.2), log=lambda _m: None,
                              spend_tries=4)
    assert formats == ["w8", "w8"]
    assert [h["bytes"] for h in history if h["action"] == "down"] == [75]
    assert history[-1]["action"] == "kept" and history[-1]["measured"] <= 0.05


def test_spend_measures_no_plan_that_saves_next_to_nothing():
    """A unit whose smaller option saves one byte in eleven thousand (in the README's run: 14 KB of
    240 MB, measured twice, each a held-out pass, after reconstruction a reconstruction): spend
    never measures a plan saving less than MIN_SAVING of the kept plan's bytes, and says why it stops."""
    from qublast.allocate import MIN_SAVING

    options = [[Choice("fp16", 1000, 0.0), Choice("w4", 250, 0.04)], [Choice("a", 10000, 0.0), Choice("b", 9999, 0.001)]]
    truth = {"fp16": 0.0, "w4": 0.04, "a": 0.0, "b": 0.0}
    measured = []

    def measure(formats):
        measured.append(predicted(formats, options)[0])
        return sum(truth[f] for f in formats)

    lines = []
    plan = solve_for_loss(options, 0.0005)
    assert plan.formats == ("fp16", "a")
    formats, history = repair(plan, options, max_loss=0.0005, measure=measure, log=lines.append, spend_tries=4)
    assert formats == ["fp16", "a"]
    assert measured == [11000, 10250]  # the plan, then the first plan worth a measurement (over the bound)
    accepted = 11000
    for step in history:
        if step["action"] == "down":
            assert step["bytes"] <= accepted * (1 - MIN_SAVING)
    assert any("stops" in line for line in lines)
    # with no minimum the one-byte plan is what spend measures first (and keeps: it fits)
    measured.clear()
    formats, _ = repair(plan, options, max_loss=0.0005, measure=measure, log=lambda _m: None, spend_tries=1,
                        min_saving=0.0)
    assert measured == [11000, 10999] and formats == ["fp16", "b"]


def test_spend_after_reconstruction_aims_with_the_slope_not_the_kept_plans_ratio():
    """Reconstruction takes the kept plan to about zero measured loss (an offset, not a factor), and
    measured loss grows ever slower with predicted loss (as the twenty-first session measured). Aimed
    with the kept plan's own ratio (about zero), the first try is the smallest plan, far over the
    bound; aimed with the slope the plan had before reconstruction, the first try fits. With two
    tries the slope keeps a smaller plan; the ratio keeps none."""
    from qublast.allocate import _step, spend

    options = [[Choice("fp16", 100, 0.0), Choice("w8", 50, 0.0005), Choice("w4", 25, 0.002 + 0.0003 * i)]
               for i in range(30)]

    def measure(formats):  # concave in the prediction, zero at predicted 0.035
        return 0.07 * (1 - math.exp(-(predicted(formats, options)[1] - 0.035) / 0.04))

    plan = solve_for_loss(options, 0.035)
    smallest = pareto_frontier(options)[0]
    kept = {}
    for slope in (None, 1.2):
        history = [_step(list(plan.formats), options, measure(list(plan.formats)), action="reconstructed")]
        assert history[0]["measured"] <= 0
        formats = spend(list(plan.formats), options, history, max_loss=0.0415, measure=measure, tries=2,
                        log=lambda _m: None, slope=slope)
        downs = [h for h in history if h["action"] == "down"]
        assert 1 <= len(downs) <= 2
        assert history[-1]["action"] == "kept" and history[-1]["measured"] <= 0.0415
        assert measure(formats) <= 0.0415
        kept[slope] = (downs, history[-1]["bytes"])
    ratio_downs, ratio_bytes = kept[None]
    slope_downs, slope_bytes = kept[1.2]
    assert ratio_downs[0]["bytes"] == smallest.bytes and ratio_downs[0]["measured"] > 0.0415
    assert all(h["measured"] > 0.0415 for h in ratio_downs) and ratio_bytes == plan.bytes
    assert slope_downs[0]["measured"] <= 0.0415 and slope_bytes < plan.bytes


@pytest.mark.parametrize("loss", ["kl", "dce"])
def test_calibrate_allocates_on_the_chosen_loss(tmp_path, monkeypatch, loss):
    """A block whose dCE is negative (favourable noise) but whose KL is the largest: the KL
    allocation keeps it at w8 and puts the other block at w4, the dCE allocation the reverse.
    The recipe records which loss was summed."""
    import torch

    import qublast.calibrate as calibrate_mod
    from qublast.arch import arch_for
    from qublast.calibrate import CalibConfig, calibrate
    from qublast.formats import get_target
    from qublast.sensitivity import Sensitivity
    from qublast.sizes import block_bytes
    from tests.tiny import VOCAB, tiny_model

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    measured = {0: (-0.01, 0.05), 1: (0.002, 0.003)}  # block -> (dCE, KL) of its w4

    def table(*_args, **_kwargs):
        return ([{"fp16": Sensitivity(i, "fp16", 0.0, 0.0), "w8": Sensitivity(i, "w8", 0.0, 1e-4),
                  "w4": Sensitivity(i, "w4", *measured[i])} for i in (0, 1)],
                {unit: {"fp16": Sensitivity(unit, "fp16", 0.0, 0.0)} for unit in ("embed", "lm_head")})

    monkeypatch.setattr(calibrate_mod, "sweep", table)
    layers, cpu = model.model.layers, get_target("cpu")
    one_w4 = ((block_bytes(layers[0], spec, "w4", cpu) + block_bytes(layers[1], spec, "w8", cpu))
              / sum(p.numel() * 2 for layer in layers for n in spec.linears for p in layer.get_submodule(n).parameters()))
    cfg = CalibConfig(target="cpu", candidates=("fp16", "w8", "w4"), blocks_size=one_w4 + 1e-6, alloc_loss=loss, calib_seqlen=16,
                      sens_windows=2, holdout_windows=2, quantizers=("rtn",), cache_dir=tmp_path)
    ids = torch.randint(0, VOCAB, (16 * 4,), generator=torch.Generator().manual_seed(0)).numpy()
    recipe, _ = calibrate(model, spec, model_info={"weight_sha256": "x"}, calib_ids=ids, calib_label="t", cfg=cfg, log=lambda _m: None)
    formats = [b["format"] for b in recipe["blocks"]]
    assert formats == (["w8", "w4"] if loss == "kl" else ["w4", "w8"])
    assert recipe["calibration"]["alloc_loss"] == loss
    w8_w4 = (1e-4 + measured[1][1]) if loss == "kl" else (0.0 + measured[0][0])
    assert recipe["allocation"]["predicted_loss"] == pytest.approx(w8_w4)
    assert recipe["embedding"]["format"] == recipe["lm_head"]["format"] == "fp16"  # --blocks-size keeps them


def test_unknown_allocation_loss_is_an_input_error():
    from qublast.calibrate import CalibConfig
    from qublast.errors import InputError

    with pytest.raises(InputError, match="allocation loss"):
        CalibConfig(alloc_loss="mse")


def test_calibrate_measures_each_plan_once(tmp_path, monkeypatch):
    """Repair may come back to a plan it measured (a spend step landing on an earlier jump's plan,
    as in the README's run): the held-out windows are run once per plan, the repeat answers from
    the first measurement, and the recipe records both steps."""
    import torch

    import qublast.calibrate as calibrate_mod
    import qublast.heldout as heldout_mod
    from qublast.arch import arch_for
    from qublast.calibrate import CalibConfig, calibrate
    from qublast.sensitivity import Sensitivity
    from tests.tiny import VOCAB, tiny_model

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)

    def table(*_args, **_kwargs):
        return ([{"fp16": Sensitivity(i, "fp16", 0.0, 0.0), "w8": Sensitivity(i, "w8", 0.0, 1e-4),
                  "w4": Sensitivity(i, "w4", 0.001, 0.002)} for i in (0, 1)],
                {unit: {"fp16": Sensitivity(unit, "fp16", 0.0, 0.0)} for unit in ("embed", "lm_head")})

    def twice(plan, options, *, max_loss, measure, log, spend_tries):
        history = []
        for _ in range(2):
            history.append({"formats": list(plan.formats), "measured": measure(list(plan.formats)),
                            "predicted": plan.loss, "bytes": plan.bytes, "action": "plan"})
        return list(plan.formats), history

    runs = []
    real = calibrate_mod.window_ce
    monkeypatch.setattr(calibrate_mod, "window_ce", lambda *a, **k: runs.append(1) or real(*a, **k))
    monkeypatch.setattr(heldout_mod, "window_ce", lambda *a, **k: runs.append(1) or real(*a, **k))  # the plans' passes
    monkeypatch.setattr(calibrate_mod, "sweep", table)
    monkeypatch.setattr(calibrate_mod, "repair", twice)
    cfg = CalibConfig(target="cpu", candidates=("fp16", "w8", "w4"), max_ppl_increase=0.5, calib_seqlen=16, sens_windows=2,
                      holdout_windows=2, quantizers=("rtn",), cache_dir=tmp_path, reconstruct=0, lm_head="fp16", embeddings="fp16")
    ids = torch.randint(0, VOCAB, (16 * 4,), generator=torch.Generator().manual_seed(0)).numpy()
    recipe, _ = calibrate(model, spec, model_info={"weight_sha256": "x"}, calib_ids=ids, calib_label="t", cfg=cfg, log=lambda _m: None)
    steps = recipe["allocation"]["repair"]
    assert len(steps) == 2 and steps[0]["measured"] == steps[1]["measured"] and steps[0]["dce"] == steps[1]["dce"]
    assert len(runs) == 2  # the fp model's windows, then the plan's: not the plan's twice
