"""Mixed-precision allocation: an exact multiple-choice knapsack, then measured repair.

Every block picks one format. The solver keeps, block after block, the Pareto frontier of
(total bytes, total predicted loss) over all partial assignments: a dynamic programme over
byte totals that keeps only the states no other state beats on both axes. It is exact (no
byte rounding) and small in practice because blocks share a few sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import BudgetError


@dataclass(frozen=True)
class Choice:
    """One block's option: format name, bytes it stores, predicted loss (dCE)."""

    format: str
    bytes: int
    loss: float


@dataclass(frozen=True)
class Plan:
    """A format per block with its total bytes and predicted loss."""

    formats: tuple[str, ...]
    bytes: int
    loss: float


def pareto_frontier(options: list[list[Choice]]) -> list[Plan]:
    """All assignments not dominated in (bytes, loss), sorted by bytes ascending, loss descending."""
    frontier = [Plan((), 0, 0.0)]
    for block_options in options:
        states = [
            Plan(p.formats + (c.format,), p.bytes + c.bytes, p.loss + c.loss)
            for p in frontier
            for c in block_options
        ]
        states.sort(key=lambda s: (s.bytes, s.loss))
        frontier = []
        for state in states:
            if not frontier or state.loss < frontier[-1].loss:
                frontier.append(state)
    return frontier


def solve_for_size(options: list[list[Choice]], max_bytes: int) -> Plan:
    """Least predicted loss with total bytes <= ``max_bytes``."""
    feasible = [p for p in pareto_frontier(options) if p.bytes <= max_bytes]
    if not feasible:
        smallest = sum(min(c.bytes for c in block) for block in options)
        raise BudgetError(f"size budget {max_bytes} bytes is below the smallest reachable {smallest} bytes")
    return feasible[-1]


def solve_for_loss(options: list[list[Choice]], max_loss: float) -> Plan:
    """Fewest bytes with predicted loss <= ``max_loss`` (all-fp16 always qualifies when max_loss >= 0)."""
    for plan in pareto_frontier(options):
        if plan.loss <= max_loss:
            return plan
    raise BudgetError(f"no allocation has predicted loss <= {max_loss:.6f} nats")


def best_upgrade(formats: list[str], options: list[list[Choice]]) -> tuple[int, Choice] | None:
    """One step up for one block: among the blocks stored most coarsely (fewest bytes relative to
    the block's largest option), the next larger option with the most predicted loss saved per
    extra byte.

    Repair runs because the predictions were wrong; a w8 block's predicted gain is then noise
    next to a w4 block's real error, so the coarsest blocks go up first, one size at a time.
    """
    steps = []
    for index, (current, block_options) in enumerate(zip(formats, options)):
        now = next(c for c in block_options if c.format == current)
        coarseness = now.bytes / max(c.bytes for c in block_options)
        larger = [c.bytes for c in block_options if c.bytes > now.bytes]
        for option in block_options:
            if larger and option.bytes == min(larger):
                rate = (now.loss - option.loss) / (option.bytes - now.bytes)
                steps.append((round(coarseness, 3), -rate, index, option))
    if not steps:
        return None
    coarsest = min(s[0] for s in steps)
    _, _, index, option = min((s for s in steps if s[0] == coarsest), key=lambda s: s[1])
    return index, option


def predicted(formats: list[str], options: list[list[Choice]]) -> tuple[int, float]:
    """(bytes, predicted loss) of a plan."""
    chosen = [next(c for c in unit if c.format == f) for f, unit in zip(formats, options)]
    return sum(c.bytes for c in chosen), sum(c.loss for c in chosen)


FAR = 1.0  # a measured loss above FAR x the bound is repaired by a calibrated jump (1: any loss over the bound)
MIN_SAVING = 0.0025  # spend measures a smaller plan only when it saves at least this fraction of the kept plan's bytes


def repair(
    plan: Plan, options: list[list[Choice]], *, max_loss: float, measure: Callable[[list[str]], float],
    log: Callable[[str], None] = print, spend_tries: int = 0, far: float = FAR, min_saving: float = MIN_SAVING,
) -> tuple[list[str], list[dict]]:
    """Measure the plan; while the measured loss (``measure`` may return an upper confidence bound)
    exceeds ``max_loss``, move up and measure again: to the knapsack's plan for the predicted loss
    scaled by predicted / measured (a calibrated jump, aimed at the bound in one measurement)
    when that plan is larger and the loss is over ``far`` x the bound, else one ``best_upgrade``
    (``far=inf``: one block at a time throughout). Then, with ``spend_tries``,
    spend what the measurement leaves (``spend``). Every step records its predicted and measured loss."""
    formats = list(plan.formats)
    history = [_step(formats, options, measure(formats), action="plan")]
    frontier = None
    while history[-1]["measured"] > max_loss:
        last = history[-1]
        if max_loss > 0 and last["measured"] > far * max_loss:  # one calibrated jump, not one block at a time
            frontier = frontier or pareto_frontier(options)
            target = max_loss * max(last["predicted"], 1e-9) / last["measured"]
            jump = next((p for p in frontier if p.loss <= target), None)
            if jump is not None and jump.bytes > last["bytes"]:
                log(f"repair: measured {last['measured']:.5f} > {max_loss:.5f}; the knapsack's plan for "
                    f"predicted loss <= {target:.5f} (predictions scaled by the measurement)")
                formats = list(jump.formats)
                history.append(_step(formats, options, measure(formats), action="jump"))
                continue
        step = best_upgrade(formats, options)
        if step is None:
            break
        index, option = step
        log(f"repair: measured {last['measured']:.5f} > {max_loss:.5f}; unit {index}: {formats[index]} -> {option.format}")
        formats[index] = option.format
        history.append(_step(formats, options, measure(formats), action="up", upgraded=index, to=option.format))
    if spend_tries and history[-1]["measured"] <= max_loss:
        formats = spend(formats, options, history, max_loss=max_loss, measure=measure, tries=spend_tries, log=log,
                        min_saving=min_saving)
    return formats, history


def spend(formats: list[str], options: list[list[Choice]], history: list[dict], *, max_loss: float,
          measure: Callable[[list[str]], float], tries: int, log: Callable[[str], None] = print,
          min_saving: float = MIN_SAVING, slope: float | None = None) -> list[str]:
    """Two-sided repair: while the measured bound leaves room under ``max_loss``, move to a smaller plan.

    The predictions are calibrated by the last accepted measurement (ratio = measured bound /
    predicted loss): the next plan is the knapsack's smallest with predicted loss <= max_loss /
    ratio. It is measured; accepted if its bound fits, else the predicted target is halved back
    towards the accepted plan's. When the calibrated target admits no smaller plan and none has
    measured over yet, one step down the frontier (the least-loss plan smaller than the accepted
    one) is measured instead: one plan's ratio is a noisy calibration, and the measurement, not
    the prediction, decides. A plan that saves less than ``min_saving`` of the accepted plan's
    bytes is not worth a measurement (after reconstruction each one is a reconstruction too) and
    counts as no smaller plan. At most ``tries`` measurements; appends each to ``history``.

    ``slope`` (measured per predicted nat) replaces the ratio where the accepted plan's own ratio
    says nothing: after reconstruction, whose gain is an offset (it took a plan at the bound to
    0.00 measured; the ratio then sends the first try to the smallest plan). The target is then the
    accepted plan's predicted loss plus the room left over the slope, and once a smaller plan is
    accepted, the secant between the last two accepted plans (where it is positive) is the slope:
    measured loss grows ever slower with predicted loss on the plans repair reaches, so the secant
    behind is the cautious estimate ahead."""
    accepted, ceiling = history[-1], float("inf")  # ceiling: predicted loss of the smallest plan that did not fit
    frontier = pareto_frontier(options)  # bytes ascending, predicted loss descending
    before = None  # the accepted plan before ``accepted`` (for the secant, with ``slope``)
    for _ in range(tries):
        if slope is None:
            ratio = max(accepted["measured"], 1e-9) / max(accepted["predicted"], 1e-9)
            target = max_loss / ratio
        else:
            rate = slope
            if before is not None and accepted["predicted"] > before["predicted"]:
                secant = (accepted["measured"] - before["measured"]) / (accepted["predicted"] - before["predicted"])
                rate = secant if secant > 0 else slope
            target = accepted["predicted"] + (max_loss - accepted["measured"]) / max(rate, 1e-9)
        if ceiling < float("inf"):
            target = min(target, (accepted["predicted"] + ceiling) / 2)
        worth = accepted["bytes"] * (1 - min_saving)  # a plan must store at most this many bytes
        candidate = next((p for p in frontier if p.loss <= target), None)
        if candidate is None or candidate.bytes >= accepted["bytes"] or candidate.bytes > worth:
            if ceiling < float("inf"):
                log(f"spend: stops; no plan between the kept one and the smallest that measured over saves "
                    f"{min_saving:.2%} of {accepted['bytes']} bytes")
                break
            candidate = next((p for p in reversed(frontier) if p.bytes < accepted["bytes"] and p.bytes <= worth), None)
            if candidate is None:
                break
        step = _step(list(candidate.formats), options, measure(list(candidate.formats)), action="down")
        history.append(step)
        log(f"spend: predicted {step['predicted']:.5f}, measured {step['measured']:.5f} "
            f"({'fits' if step['measured'] <= max_loss else 'over'} {max_loss:.5f}), {step['bytes']} bytes")
        if step["measured"] <= max_loss:
            before, accepted = accepted, step
        else:
            ceiling = step["predicted"]
    history.append({**accepted, "action": "kept"})
    return list(accepted["formats"])


def _step(formats: list[str], options: list[list[Choice]], measured: float, **extra) -> dict:
    size, loss = predicted(formats, options)
    return {"formats": list(formats), "measured": measured, "predicted": loss, "bytes": size, **extra}
