"""Error-compensating quantization of one block (GPTQ per linear) inside the sensitivity sweep.

For a block transform (format, scaling map folds), the Hessian of every linear's input is
collected *after* the folds, so the map and GPTQ compose (AWQ-style scales, then GPTQ on the
scaled weights), on GPTQ's own calibration windows (``--gptq-windows``, disjoint from the
sweep's: the sweep compares GPTQ with round-to-nearest on its search windows, tokens GPTQ did
not fit). A Hessian of a 1536-wide input from a few thousand tokens overfits; 32 windows of
512 (16k tokens) measurably beat 6 on held-out block error (docs/results.md). The result is a
``BlockTransform`` carrying its integer codes and scales (``codes``), which every later stage
replays exactly.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .apply import BlockTransform, QuantMemo, fold_block, restored
from .blocks import BlockRunner, get_module
from .formats import block_size_for
from .gptq import InverseFactors, gptq_quantize


@torch.no_grad()
def block_hessians(runner: BlockRunner, index: int, hidden: torch.Tensor, t: BlockTransform, *,
                   with_output: bool = False):
    """``{linear: H [in, in]}`` of block ``index``'s linears on ``hidden`` [M, S, H], with ``t``'s folds
    applied; with ``with_output``, ``(hessians, block output)`` (the fp output when ``t`` folds nothing,
    so the caller need not run the block again). Linears that read the same tensor (q/k/v, gate/up)
    share one product; each chunk's X^T X is computed in fp32 and the chunks summed in float64."""
    block, spec = runner.layers[index], runner.spec
    sums: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # (the input tensor, its X^T X) of the linear before: q, k, v read one tensor
    handles = []
    for name in spec.linears:
        def hook(_module, args, name=name):
            x = args[0]
            if x is not last[0]:
                flat = x.detach().reshape(-1, x.shape[-1])
                flat = flat.float()
                last[0], last[1] = x, (flat.T @ flat).double()
            sums[name] = sums[name] + last[1] if name in sums else last[1]

        handles.append(get_module(block, name).register_forward_pre_hook(hook))
    try:
        with restored(block):
            fold_block(block, spec, t.smooth)
            output = runner.run_block_chunked(index, hidden)
    finally:
        for handle in handles:
            handle.remove()
        last[0] = last[1] = None
    tokens = hidden.shape[0] * hidden.shape[1]
    hessians = {name: (total * (2.0 / tokens)).float() for name, total in sums.items()}
    return (hessians, output) if with_output else hessians


def folded_hessians(spec, base: dict[str, torch.Tensor], smooth: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hessians after a scaling map's folds, from the unfolded ones: a group whose producer's
    output is divided by s sees inputs X / s, so H becomes diag(1/s) H diag(1/s); other inputs are
    unchanged (a fold keeps every producer's output elsewhere as it was)."""
    out = dict(base)
    for group in spec.groups:
        s = smooth.get(group.producer) if group.producer else None
        if s is not None:
            inv = 1.0 / s.to(base[group.linears[0]].device).float()
            for name in group.linears:
                out[name] = base[name] * inv[:, None] * inv[None, :]
    return out


def gptq_transform(runner: BlockRunner, index: int, fit: torch.Tensor, t: BlockTransform, *, act_order: bool = True,
                   hessians: dict[str, torch.Tensor] | None = None, memo: QuantMemo | None = None,
                   factors: InverseFactors | None = None) -> BlockTransform:
    """``t`` with every linear quantized by GPTQ (codes and scales in ``codes``), fitted on block
    ``index``'s fp inputs ``fit`` [M, S, H] (GPTQ's own windows). ``hessians``: the block's
    unfolded Hessians, when the caller has them (every format and map of a block shares them).
    ``memo``: GPTQ results to reuse for a linear whose folded weight and Hessian are unchanged
    (the map and the map off share every linear the map does not fold). ``factors``: the
    factorisations of the unfolded Hessians, shared with the block's other calls (a folded
    Hessian is this call's own and is not kept)."""
    block, spec = runner.layers[index], runner.spec
    base = hessians if hessians is not None else block_hessians(runner, index, fit, BlockTransform(t.fmt))
    hessians = folded_hessians(spec, base, t.smooth)
    codes = {}
    with restored(block):
        fold_block(block, spec, t.smooth)
        for name, fmt in t.formats(spec).items():
            if fmt.bits is None:  # a mixed format's float part
                continue
            linear = get_module(block, name)

            def solve(linear=linear, fmt=fmt, h=hessians[name]):  # on the Hessian's device
                return gptq_quantize(linear.weight, h, bits=fmt.bits, act_order=act_order,
                                     block_size=block_size_for(fmt, linear.in_features),
                                     factors=factors if h is base[name] else None)
            codes[name] = solve() if memo is None else memo.get(name, linear.weight, (fmt, act_order, "gptq"),
                                                                 hessians[name], solve)
    return replace(t, codes=codes, quantizer="gptq")
