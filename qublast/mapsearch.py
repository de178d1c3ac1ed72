"""Per-block search of the activation scaling map (alpha) and activation ranges.

For one block, one format and the block's fp input: collect per-channel input statistics of
each foldable linear group, then search one alpha per group on the grid (fold the scales,
quantize, measure the block's output error against fp; keep the best). The map off is a
candidate, so the map never makes a block's output worse on the search tokens. To keep
the sweep affordable the search scores at most ``SEARCH_TOKENS`` tokens and a coarse clip grid.
The search returns the map's best and the map off; the sweep measures both (dCE) with the full
quantizer and keeps the lower, since output error and dCE can disagree.
"""
from __future__ import annotations

import torch

from runtime.targets import WeightFormat

from .apply import BlockTransform, QuantMemo, block_transformed, fold_block, restored
from .arch import ArchSpec
from .blocks import BlockRunner, foldable, get_module
from .formats import linear_format
from .scaling import ALPHA_GRID, act_range, act_scale, smooth_scales

SEARCH_TOKENS = 1024
SEARCH_CLIP_GRID = (1.0, 0.9, 0.8)


def search_windows(hidden: torch.Tensor) -> torch.Tensor:
    """The first windows of ``hidden`` [N, S, H] that the search scores (at most ``SEARCH_TOKENS`` tokens)."""
    return hidden[: max(1, SEARCH_TOKENS // hidden.shape[1])]


@torch.no_grad()
def input_samples(runner: BlockRunner, index: int, hidden: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Inputs of the named linears of block ``index`` for ``hidden``: ``{name: [tokens, in]}``."""
    block = runner.layers[index]
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_module, args, name=name):
            seen[name] = args[0].detach().flatten(0, -2).float()

        handles.append(get_module(block, name).register_forward_pre_hook(hook))
    try:
        runner.run_block(index, hidden)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def group_smoothing(spec: ArchSpec, block: torch.nn.Module, inputs: dict[str, torch.Tensor], alpha: float, *,
                    act_aware: bool) -> dict[str, torch.Tensor]:
    """``{producer: s [in]}`` for every foldable group at ``alpha`` (empty at alpha 0)."""
    if alpha == 0:
        return {}
    out = {}
    for group in spec.groups:
        if group.producer is None or not foldable(get_module(block, group.producer)):
            continue
        x = inputs[group.linears[0]]
        if act_aware:  # weight-only formats: AWQ-style mean |x|
            out[group.producer] = smooth_scales(x.abs().mean(dim=0), None, alpha)
        else:  # w8a8: SmoothQuant max|x|^a / max|w|^(1-a)
            w_absmax = torch.stack([get_module(block, n).weight.abs().amax(dim=0) for n in group.linears]).amax(dim=0)
            out[group.producer] = smooth_scales(x.abs().amax(dim=0), w_absmax, alpha)
    return out


def search_transform(runner: BlockRunner, index: int, hidden: torch.Tensor, fmt: WeightFormat, *, scaling: bool,
                     range_method: str) -> tuple[tuple[BlockTransform, float], tuple[BlockTransform, float]]:
    """``(map, error), (off, error)``: the best ``BlockTransform`` of block ``index`` in
    ``fmt`` (as the target stores and computes it) and the transform with the map off, each with its relative output error.
    With ``scaling`` off, or where nothing beats the map off, both are the same object.

    The map off is plain weight-MSE clipping and no folds. The map on adds activation-aware
    clipping (``importance``) and gives each foldable group its own alpha, found by coordinate
    search: one group at a time tries every alpha on the grid with the others at their best
    so far, scored on the whole block's output. The map off is a candidate too, so the
    chosen transform is never worse than it on the search tokens.
    """
    if fmt.bits is None:
        unquantized = (BlockTransform(fmt), 0.0)
        return unquantized, unquantized
    spec, block = runner.spec, runner.layers[index]
    hidden = search_windows(hidden)
    ref = runner.run_block(index, hidden)
    ref_norm = max(ref.pow(2).mean().item(), 1e-12)
    inputs = input_samples(runner, index, hidden, spec.linears)
    grid = ALPHA_GRID if scaling else (0.0,)
    scales = {a: group_smoothing(spec, block, inputs, a, act_aware=fmt.act != "static") for a in grid}
    memo = QuantMemo()  # a candidate changes one group's folds: the other linears' codes are reused

    def scored(alpha: dict[str, float], *, weighted: bool = True) -> tuple[BlockTransform, float]:
        smooth = {p: scales[a][p] for p, a in alpha.items() if a > 0}
        acts = _act_scales(runner, index, hidden, smooth, range_method) if fmt.act == "static" else {}
        t = BlockTransform(fmt, alpha, smooth, acts, importance(spec, inputs, smooth) if weighted else {})
        with block_transformed(block, spec, t, clip_grid=SEARCH_CLIP_GRID, memo=memo):
            return t, (runner.run_block(index, hidden) - ref).pow(2).mean().item() / ref_norm

    zeros = {g.producer: 0.0 for g in spec.groups if g.producer and foldable(get_module(block, g.producer))}
    off = scored(zeros, weighted=False)
    if not scaling:
        return off, off
    best = min(off, scored(zeros), key=lambda c: c[1])  # activation-aware clipping alone
    for producer in searched(spec, fmt, zeros):
        for a in grid[1:]:
            candidate = scored({**best[0].alpha, producer: a})
            if candidate[1] < best[1]:
                best = candidate
    return best, off


def searched(spec: ArchSpec, fmt: WeightFormat, producers) -> list[str]:
    """The producers whose alpha the search tries: those with a linear of their group that ``fmt``
    quantizes. A fold multiplies the group's input channels by s (their codes and, for w8a8, their
    input ranges change) and divides the producer's output rows by s, which no code notices: every
    scale group, per-channel scale and GPTQ update lies within one row, and the clip search is
    scale-free. Where a mixed format keeps a group unquantized (Jetson's ``w4m``: attention and
    ``down_proj`` in fp16) a winning alpha would be the fp rounding's noise; it stays 0 (no fold)."""
    def quantized(name: str) -> bool:
        return linear_format(fmt, spec, name).bits is not None

    reach = {g.producer for g in spec.groups if g.producer and any(map(quantized, g.linears))}
    return [p for p in producers if p in reach]


@torch.no_grad()
def block_error(runner: BlockRunner, index: int, hidden: torch.Tensor, t: BlockTransform, *,
                ref: torch.Tensor | None = None) -> float:
    """Relative MSE of block ``index``'s output under ``t`` (full clip grid) on the search windows of ``hidden``
    (``ref``: the fp output on them, when the caller has it)."""
    hidden = search_windows(hidden)
    ref = runner.run_block(index, hidden) if ref is None else ref
    with block_transformed(runner.layers[index], runner.spec, t):
        out = runner.run_block(index, hidden)
    return (out - ref).pow(2).mean().item() / max(ref.pow(2).mean().item(), 1e-12)


def importance(spec: ArchSpec, inputs: dict[str, torch.Tensor], smooth: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean x^2 of every linear's input channels once the folds divide them by s."""
    out = {}
    for group in spec.groups:
        s = smooth.get(group.producer) if group.producer else None
        for name in group.linears:
            power = inputs[name].pow(2).mean(dim=0)
            out[name] = power if s is None else power / s.float().pow(2)
    return out


def _act_scales(runner: BlockRunner, index: int, hidden: torch.Tensor, smooth: dict, range_method: str) -> dict[str, float]:
    """Per-tensor INT8 scales of every linear input with the folds applied (weights unquantized)."""
    block, spec = runner.layers[index], runner.spec
    with restored(block):
        fold_block(block, spec, smooth)
        inputs = input_samples(runner, index, hidden, spec.linears)
    return {name: act_scale(act_range(x, range_method)) for name, x in inputs.items()}
