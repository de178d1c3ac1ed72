"""Error-compensating quantization of one block (GPTQ per linear) inside the sensitivity sweep.

For a block transform (format, scaling map folds), the Hessian of every linear's input is
collected on the sweep's calibration windows *after* the folds, so the map and GPTQ compose
(AWQ-style scales, then GPTQ on the scaled weights). The windows the map search scores on
(the first ``SEARCH_TOKENS``) are left out of the Hessians: the sweep compares GPTQ with
round-to-nearest on them, tokens GPTQ did not fit. The result is a ``BlockTransform`` carrying
its integer codes and scales (``codes``), which every later stage replays exactly.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .apply import BlockTransform, fold_block, restored
from .blocks import BlockRunner, get_module
from .formats import block_size_for
from .gptq import gptq_quantize, hessian
from .mapsearch import SEARCH_TOKENS


def fit_windows(hidden: torch.Tensor) -> torch.Tensor:
    """The windows GPTQ fits on: all but the map search's (all of them when there are too few)."""
    held = max(1, SEARCH_TOKENS // hidden.shape[1])
    return hidden[held:] if hidden.shape[0] > held else hidden


@torch.no_grad()
def block_hessians(runner: BlockRunner, index: int, hidden: torch.Tensor, t: BlockTransform) -> dict[str, torch.Tensor]:
    """``{linear: H [in, in]}`` of block ``index``'s linears on ``hidden`` [n, S, H], with ``t``'s folds applied."""
    block, spec = runner.layers[index], runner.spec
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name in spec.linears:
        def hook(_module, args, name=name):
            sums[name] = hessian(args[0].detach().float())

        handles.append(get_module(block, name).register_forward_pre_hook(hook))
    try:
        with restored(block):
            fold_block(block, spec, t.smooth)
            runner.run_block(index, hidden)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def gptq_transform(runner: BlockRunner, index: int, hidden: torch.Tensor, t: BlockTransform, *, act_order: bool = False) -> BlockTransform:
    """``t`` with every linear quantized by GPTQ (codes and scales in ``codes``) on the fit windows."""
    block, spec = runner.layers[index], runner.spec
    hessians = block_hessians(runner, index, fit_windows(hidden), t)
    codes = {}
    with restored(block):
        fold_block(block, spec, t.smooth)
        for name in spec.linears:
            linear = get_module(block, name)
            codes[name] = gptq_quantize(linear.weight, hessians[name], bits=t.fmt.bits, act_order=act_order,
                                        block_size=block_size_for(t.fmt, linear.in_features))
    return replace(t, codes=codes, quantizer="gptq")
