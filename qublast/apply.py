"""Applying weight formats to a model: fake quantization in place, with error statistics.

The model keeps fp32 weights holding exactly ``q * scale``, which is what the deployed
graph's ``DequantizeLinear`` reconstructs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .formats import Format, block_size_for, get_format
from .quant import QuantizedWeight, dequantize, quantize_weight, quantize_with_scale


def quantize_linear(linear: torch.nn.Linear, fmt: Format) -> QuantizedWeight | None:
    """Quantized form of a linear's weight in ``fmt``; ``None`` for fp16 (kept)."""
    if fmt.weight_bits is None:
        return None
    return quantize_weight(
        linear.weight, bits=fmt.weight_bits, block_size=block_size_for(fmt, linear.in_features)
    )


def quantize_block(block: torch.nn.Module, spec: ArchSpec, fmt: Format) -> dict[str, QuantizedWeight]:
    """Quantize every linear of one block in place; returns the quantized weights by name."""
    out = {}
    for name in spec.linears:
        linear = get_module(block, name)
        qw = quantize_linear(linear, fmt)
        if qw is not None:
            linear.weight.data.copy_(qw.dequantize())
            out[name] = qw
    return out


@contextmanager
def block_quantized(block: torch.nn.Module, spec: ArchSpec, fmt: Format):
    """Within the context, ``block``'s linears hold ``fmt``-quantized weights; restored after."""
    saved = {name: get_module(block, name).weight.data.clone() for name in spec.linears}
    try:
        yield quantize_block(block, spec, fmt)
    finally:
        for name, weight in saved.items():
            get_module(block, name).weight.data.copy_(weight)


def apply_plan(
    model: torch.nn.Module, spec: ArchSpec, plan: list[str], *, lm_head: str = "fp16"
) -> dict[str, QuantizedWeight]:
    """Quantize the whole model per ``plan`` (one format name per block); keys are full module paths."""
    layers = blocks_of(model, spec)
    if len(plan) != len(layers):
        raise ValueError(f"plan has {len(plan)} entries for {len(layers)} blocks")
    out: dict[str, QuantizedWeight] = {}
    for index, (layer, fmt_name) in enumerate(zip(layers, plan)):
        for name, qw in quantize_block(layer, spec, get_format(fmt_name)).items():
            out[f"{spec.blocks}.{index}.{name}"] = qw
    head_fmt = get_format(lm_head)
    if head_fmt.weight_bits is not None:
        head = _untied_lm_head(model, spec)
        qw = quantize_linear(head, head_fmt)
        head.weight.data = qw.dequantize()
        out[spec.lm_head] = qw
    return out


@contextmanager
def plan_applied(model: torch.nn.Module, spec: ArchSpec, plan: list[str], *, lm_head: str = "fp16"):
    """Within the context the model is quantized per ``plan``; every weight is restored after."""
    head = get_module(model, spec.lm_head)
    saved_head = head.weight
    paths = [f"{spec.blocks}.{i}.{name}" for i in range(len(plan)) for name in spec.linears]
    saved = {path: get_module(model, path).weight.data.clone() for path in paths}
    try:
        yield apply_plan(model, spec, plan, lm_head=lm_head)
    finally:
        for path, weight in saved.items():
            get_module(model, path).weight.data.copy_(weight)
        head.weight = saved_head


def apply_scales(model: torch.nn.Module, spec: ArchSpec, linears: dict[str, dict], scales: dict[str, torch.Tensor]) -> None:
    """Quantize the named linears in place with given scales (a recipe's decisions, re-applied)."""
    from .errors import RecipeError

    for path, entry in linears.items():
        if path not in scales:
            raise RecipeError(f"scales file has no scale for {path}")
        linear = _untied_lm_head(model, spec) if path == spec.lm_head else get_module(model, path)
        try:
            q = quantize_with_scale(linear.weight, scales[path], bits=entry["bits"], block_size=entry["block_size"])
        except ValueError as exc:
            raise RecipeError(f"{path}: {exc}") from exc
        linear.weight.data = dequantize(q, scales[path], entry["block_size"])


def _untied_lm_head(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.Linear:
    """The lm_head with its own weight tensor, so quantizing it leaves the embedding alone."""
    head = get_module(model, spec.lm_head)
    embed = get_module(model, spec.embed)
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    return head
