"""Applying a transform to a model in place: fold smoothing scales, fake-quantize weights, and
fake-quantize linear inputs the way the target computes them.

The model keeps fp32 weights holding exactly ``q * scale``, which is what the deployed
graph's ``DequantizeLinear`` reconstructs; activation hooks (module ``deployed``) compute what
the target does to a linear's input: a static INT8 Q/DQ pair (``w8a8`` on Jetson) or ONNX
Runtime's dynamic per-block INT8 quantization (``w8``/``w4`` on the CPU target). The embedding table and
``lm_head`` are transformed by ``VocabTransform`` (module ``vocab``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from runtime.targets import WeightFormat

from . import rescale
from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .deployed import act_quantizers, clear_act_quant, requantize, set_act_quant
from .errors import RecipeError
from .formats import block_size_for, get_format, get_target, linear_format
from .quant import CLIP_GRID, QuantizedWeight, measured, quantize_weight
from .recipe import block_linears
from .scaling import fold_into_norm, fold_into_rows, scale_columns
from .schema import Recipe
from .vocab import VocabTransform, vocab_restored


@dataclass(frozen=True)
class BlockTransform:
    """Everything done to one block: its format (as the target stores it), the map's alpha and
    smoothing scales per producer (relative name -> alpha, s [in]), static activation scales
    per linear (``act="static"`` formats), the map's input-channel importance per linear
    (mean x^2 after the folds; weights the clip search), and the quantizer: ``"rtn"`` rounds
    to nearest with a clip search when applied; ``"gptq"`` carries its codes and scales per
    linear (``codes``, of the folded weights) from ``compensate.gptq_transform``."""

    fmt: WeightFormat
    alpha: dict[str, float] = field(default_factory=dict)
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)
    act_scales: dict[str, float] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    quantizer: str = "rtn"
    codes: dict[str, QuantizedWeight] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.fmt.name

    def formats(self, spec: ArchSpec) -> dict[str, WeightFormat]:
        """The plain format of each of the block's linears (a mixed format's parts, else ``fmt``)."""
        return {name: linear_format(self.fmt, spec, name) for name in spec.linears}


class QuantMemo:
    """Quantized weights already computed for a block's linears, reused where a linear's weight,
    format, clip grid and importance are all equal to what computed them (a map search changes
    one group's folds at a time; the other linears need not be quantized again)."""

    def __init__(self):
        self._seen: dict[str, tuple] = {}

    def get(self, name: str, weight: torch.Tensor, key: tuple, importance: torch.Tensor | None, compute):
        seen = self._seen.get(name)
        if seen is not None and seen[1] == key and _same(seen[0], weight) and _same(seen[2], importance):
            return seen[3]
        value = compute()
        self._seen[name] = (weight.detach().clone(), key, None if importance is None else importance.clone(), value)
        return value


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def quantize_linear(linear: torch.nn.Linear, fmt: WeightFormat, *, clip_grid: tuple[float, ...] = CLIP_GRID,
                    importance: torch.Tensor | None = None) -> QuantizedWeight | None:
    """Quantized form of a linear's weight in ``fmt``; ``None`` for an unquantized format."""
    if fmt.bits is None:
        return None
    importance = None if importance is None else importance.to(linear.weight.device)
    return quantize_weight(linear.weight, bits=fmt.bits, block_size=block_size_for(fmt, linear.in_features),
                           clip_grid=clip_grid, importance=importance)


def fold_block(block: torch.nn.Module, spec: ArchSpec, smooth: dict[str, torch.Tensor]) -> None:
    """Fold each producer's scales into it (norm weight, or a linear's output rows) and into its
    group's linear columns, in place."""
    for group in spec.groups:
        if group.producer not in smooth:
            continue
        producer = get_module(block, group.producer)
        s = smooth[group.producer].to(producer.weight.device)
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


def transform_block(block: torch.nn.Module, spec: ArchSpec, t: BlockTransform, *,
                    clip_grid: tuple[float, ...] = CLIP_GRID, memo: QuantMemo | None = None) -> dict[str, QuantizedWeight]:
    """Fold, quantize weights and set activation quantization for one block, in place (``memo``:
    round-to-nearest results to reuse where a linear's inputs to the quantizer are unchanged)."""
    fold_block(block, spec, t.smooth)
    out = {}
    linears = {name: get_module(block, name) for name in spec.linears}
    formats = t.formats(spec)
    for name, linear in linears.items():
        if name in t.codes:
            qw = measured(t.codes[name], linear.weight)
        else:
            def compute(linear=linear, fmt=formats[name], imp=t.importance.get(name)):
                return quantize_linear(linear, fmt, clip_grid=clip_grid, importance=imp)
            qw = compute() if memo is None else memo.get(
                name, linear.weight, (formats[name], clip_grid), t.importance.get(name), compute)
        if qw is not None:
            linear.weight.data.copy_(qw.dequantize())
            out[name] = qw
    set_act_quant(block, act_quantizers(formats, linears, t.act_scales))
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
def block_transformed(block: torch.nn.Module, spec: ArchSpec, t: BlockTransform, *, clip_grid: tuple[float, ...] = CLIP_GRID,
                      memo: QuantMemo | None = None):
    """Within the context ``block`` is transformed (yields its quantized weights); restored after."""
    with restored(block):
        yield transform_block(block, spec, t, clip_grid=clip_grid, memo=memo)


def apply_transforms(model: torch.nn.Module, spec: ArchSpec, transforms: list[BlockTransform], vocab=None) -> dict[str, QuantizedWeight]:
    """Transform every block, then the embedding table and lm_head (``vocab``: a
    ``vocab.VocabTransform``, None keeps both); keys of the result are full module paths."""
    layers = blocks_of(model, spec)
    if len(transforms) != len(layers):
        raise ValueError(f"{len(transforms)} transforms for {len(layers)} blocks")
    out: dict[str, QuantizedWeight] = {}
    for index, (layer, t) in enumerate(zip(layers, transforms)):
        for name, qw in transform_block(layer, spec, t).items():
            out[f"{spec.blocks}.{index}.{name}"] = qw
    if vocab is not None:
        out.update(vocab.apply(model, spec))
    return out


@contextmanager
def transforms_applied(model: torch.nn.Module, spec: ArchSpec, transforms: list[BlockTransform], vocab=None):
    """Within the context the model is transformed; every weight, module and hook is restored after."""
    with vocab_restored(model, spec), restored(blocks_of(model, spec)):
        yield apply_transforms(model, spec, transforms, vocab)


def fold_recipe(model: torch.nn.Module, spec: ArchSpec, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> None:
    """Fold a recipe's rescaling (once; ``qublast.rescale``) and scaling map into the fp model in
    place (norm weights and epsilons, linear columns)."""
    rescale.apply(model, spec, recipe.model.rescale)
    for block, layer in zip(recipe.blocks, blocks_of(model, spec)):
        smooth = {}
        for producer in block.smooth:
            key = f"{spec.blocks}.{block.index}.{producer}.smooth"
            if key not in tensors:
                raise RecipeError(f"scales file has no smoothing scales {key}")
            smooth[producer] = tensors[key]
        fold_block(layer, spec, smooth)


def quantize_recipe(model: torch.nn.Module, spec: ArchSpec, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> None:
    """Quantize a folded model in place as the recipe says: weight codes from its scales, activation
    quantization as its target computes it, embedding table and lm_head included."""
    target = get_target(recipe.target.name)
    for block, layer in zip(recipe.blocks, blocks_of(model, spec)):
        formats = {lin.name: get_format(lin.format, target) for lin in block.linears}
        linears = {lin.name: get_module(layer, lin.name) for lin in block.linears}
        scales = {lin.name: lin.act_scale for lin in block.linears if lin.act_scale}
        set_act_quant(layer, act_quantizers(formats, linears, scales))
    for path, entry in block_linears(recipe).items():
        linear = get_module(model, path)
        linear.weight.data = requantize(linear.weight, tensors, path, bits=entry.bits, block_size=entry.block_size).to(linear.weight.dtype)
    VocabTransform.from_recipe(recipe, target).replay(model, spec, tensors)
