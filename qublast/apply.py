"""Applying a block's transform to a model in place: fold smoothing scales, fake-quantize
weights, and (``w8a8``) fake-quantize linear inputs with static per-tensor scales.

The model keeps fp32 weights holding exactly ``q * scale``, which is what the deployed
graph's ``DequantizeLinear`` reconstructs; activation hooks compute what its
QuantizeLinear/DequantizeLinear pair computes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .formats import Format, block_size_for, get_format
from .quant import CLIP_GRID, QuantizedWeight, dequantize, quantize_weight, quantize_with_scale
from .scaling import fake_quant, fold_into_norm, fold_into_rows, scale_columns

_HOOKS = "_qublast_act_hooks"


@dataclass(frozen=True)
class BlockTransform:
    """Everything done to one block: its format, the map's alpha and smoothing scales per
    producer (relative name -> alpha, s [in]), activation scales per linear (w8a8), and
    the map's input-channel importance per linear (mean x^2 after the folds; weights the
    clip search)."""

    format: str
    alpha: dict[str, float] = field(default_factory=dict)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    act_scales: dict[str, float] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] = field(default_factory=dict)


def quantize_linear(linear: torch.nn.Linear, fmt: Format, *, clip_grid: tuple[float, ...] = CLIP_GRID,
                    importance: torch.Tensor | None = None) -> QuantizedWeight | None:
    """Quantized form of a linear's weight in ``fmt``; ``None`` for fp16 (kept)."""
    if fmt.weight_bits is None:
        return None
    return quantize_weight(linear.weight, bits=fmt.weight_bits, block_size=block_size_for(fmt, linear.in_features),
                           clip_grid=clip_grid, importance=importance)


def fold_block(block: torch.nn.Module, spec: ArchSpec, smooth: dict[str, torch.Tensor]) -> None:
    """Fold each producer's scales into it (norm weight, or a linear's output rows) and into its
    group's linear columns, in place."""
    for group in spec.groups:
        if group.producer not in smooth:
            continue
        s = smooth[group.producer]
        producer = get_module(block, group.producer)
        if isinstance(producer, torch.nn.Linear):
            weight, bias = fold_into_rows(producer.weight, producer.bias, s)
            producer.weight.data.copy_(weight)
            if bias is not None:
                producer.bias.data.copy_(bias)
        else:
            producer.weight.data.copy_(fold_into_norm(producer.weight, s, norm_offset=spec.norm_weight_offset))
        linears = [get_module(block, name) for name in group.linears]
        for lin, w in zip(linears, scale_columns([lin.weight for lin in linears], s)):
            lin.weight.data.copy_(w)


def set_act_quant(block: torch.nn.Module, spec: ArchSpec, act_scales: dict[str, float]) -> None:
    """Fake-quantize the inputs of the named linears (INT8, per tensor); replaces earlier hooks."""
    clear_act_quant(block)
    handles = []
    for name, scale in act_scales.items():
        def hook(_module, args, scale=scale):
            return (fake_quant(args[0], scale),) + tuple(args[1:])

        handles.append(get_module(block, name).register_forward_pre_hook(hook))
    setattr(block, _HOOKS, handles)


def clear_act_quant(module: torch.nn.Module) -> None:
    """Remove activation fake-quant hooks from ``module`` and everything below it."""
    for sub in module.modules():
        for handle in getattr(sub, _HOOKS, []):
            handle.remove()
        if hasattr(sub, _HOOKS):
            delattr(sub, _HOOKS)


def transform_block(block: torch.nn.Module, spec: ArchSpec, t: BlockTransform, *, clip_grid: tuple[float, ...] = CLIP_GRID) -> dict[str, QuantizedWeight]:
    """Fold, quantize weights and set activation quantization for one block, in place."""
    fold_block(block, spec, t.smooth)
    fmt = get_format(t.format)
    out = {}
    for name in spec.linears:
        linear = get_module(block, name)
        qw = quantize_linear(linear, fmt, clip_grid=clip_grid, importance=t.importance.get(name))
        if qw is not None:
            linear.weight.data.copy_(qw.dequantize())
            out[name] = qw
    set_act_quant(block, spec, t.act_scales)
    return out


@contextmanager
def restored(module: torch.nn.Module):
    """On leaving the context, ``module``'s parameters hold their values again and its hooks are gone."""
    saved = {name: p.data.clone() for name, p in module.named_parameters()}
    try:
        yield
    finally:
        clear_act_quant(module)
        for name, p in module.named_parameters():
            p.data.copy_(saved[name])


@contextmanager
def block_transformed(block: torch.nn.Module, spec: ArchSpec, t: BlockTransform, *, clip_grid: tuple[float, ...] = CLIP_GRID):
    """Within the context ``block`` is transformed (yields its quantized weights); restored after."""
    with restored(block):
        yield transform_block(block, spec, t, clip_grid=clip_grid)


def apply_transforms(model: torch.nn.Module, spec: ArchSpec, transforms: list[BlockTransform], *, lm_head: str = "fp16") -> dict[str, QuantizedWeight]:
    """Transform every block (and lm_head); keys of the result are full module paths."""
    layers = blocks_of(model, spec)
    if len(transforms) != len(layers):
        raise ValueError(f"{len(transforms)} transforms for {len(layers)} blocks")
    out: dict[str, QuantizedWeight] = {}
    for index, (layer, t) in enumerate(zip(layers, transforms)):
        for name, qw in transform_block(layer, spec, t).items():
            out[f"{spec.blocks}.{index}.{name}"] = qw
    head_fmt = get_format(lm_head)
    if head_fmt.weight_bits is not None:
        head = _untied_lm_head(model, spec)
        qw = quantize_linear(head, head_fmt)
        head.weight.data = qw.dequantize()
        out[spec.lm_head] = qw
    return out


def apply_plan(model: torch.nn.Module, spec: ArchSpec, plan: list[str], *, lm_head: str = "fp16") -> dict[str, QuantizedWeight]:
    """``apply_transforms`` with plain formats (no scaling map)."""
    return apply_transforms(model, spec, [BlockTransform(f) for f in plan], lm_head=lm_head)


@contextmanager
def transforms_applied(model: torch.nn.Module, spec: ArchSpec, transforms: list[BlockTransform], *, lm_head: str = "fp16"):
    """Within the context the model is transformed; every weight is restored and hooks removed after."""
    head = get_module(model, spec.lm_head)
    saved_head = head.weight
    try:
        with restored(blocks_of(model, spec)):
            yield apply_transforms(model, spec, transforms, lm_head=lm_head)
    finally:
        head.weight = saved_head


def fold_recipe(model: torch.nn.Module, spec: ArchSpec, recipe: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Fold a recipe's scaling map into the fp model in place (norm weights, linear columns)."""
    from .errors import RecipeError

    for block, layer in zip(recipe["blocks"], blocks_of(model, spec)):
        smooth = {}
        for producer in block.get("smooth", []):
            key = f"{spec.blocks}.{block['index']}.{producer}.smooth"
            if key not in tensors:
                raise RecipeError(f"scales file has no smoothing scales {key}")
            smooth[producer] = tensors[key]
        fold_block(layer, spec, smooth)


def quantize_recipe(model: torch.nn.Module, spec: ArchSpec, recipe: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Quantize a folded model in place as the recipe says: weight codes from its scales, activation scales."""
    from .errors import RecipeError
    from .recipe import quantized_linears

    for block, layer in zip(recipe["blocks"], blocks_of(model, spec)):
        set_act_quant(layer, spec, {lin["name"]: lin["act_scale"] for lin in block["linears"] if lin.get("act_scale")})
    for path, entry in quantized_linears(recipe).items():
        scale = tensors.get(f"{path}.scale")
        if scale is None:
            raise RecipeError(f"scales file has no scale for {path}")
        linear = _untied_lm_head(model, spec) if path == spec.lm_head else get_module(model, path)
        try:
            q = quantize_with_scale(linear.weight, scale, bits=entry["bits"], block_size=entry["block_size"])
        except ValueError as exc:
            raise RecipeError(f"{path}: {exc}") from exc
        linear.weight.data = dequantize(q, scale, entry["block_size"])


def _untied_lm_head(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.Linear:
    """The lm_head with its own weight tensor, so quantizing it leaves the embedding alone."""
    head = get_module(model, spec.lm_head)
    embed = get_module(model, spec.embed)
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    return head
