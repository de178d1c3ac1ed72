"""What the deployed graph computes, in PyTorch: a linear's input quantized as the target does
(forward pre-hooks: a static INT8 Q/DQ pair, or ONNX Runtime's dynamic per-block INT8), and a
weight as ``DequantizeLinear`` reconstructs it from a recipe's codes and scales.

``apply`` uses it for the blocks, ``vocab`` for lm_head and the embedding table.
"""
from __future__ import annotations

import torch

from runtime.targets import WeightFormat

from .blocks import get_module
from .errors import RecipeError
from .formats import block_size_for
from .quant import dequantize, fake_quant_dynamic, qrange, quantize_with_scale
from .scaling import fake_quant

_HOOKS = "_qublast_act_hooks"


def act_quantizers(formats: dict[str, WeightFormat], linears: dict[str, torch.nn.Linear], act_scales: dict[str, float]) -> dict[str, tuple]:
    """``{name: ("static", scale) | ("dynamic", block)}``: what the target does to each linear's input,
    given each linear's plain format (``formats``)."""
    out = {}
    for name, lin in linears.items():
        fmt = formats[name]
        if fmt.bits is not None and fmt.act == "static" and name in act_scales:
            out[name] = ("static", act_scales[name])
        elif fmt.bits is not None and fmt.act == "dynamic":
            out[name] = ("dynamic", block_size_for(fmt, lin.in_features))
    return out


def set_act_quant(module: torch.nn.Module, quantizers: dict[str, tuple]) -> None:
    """Fake-quantize the inputs of the named sub-modules (``act_quantizers``); replaces earlier hooks."""
    clear_act_quant(module)
    handles = []
    for name, (kind, value) in quantizers.items():
        if kind == "static":
            def hook(_module, args, scale=value):
                return (fake_quant(args[0], scale),) + tuple(args[1:])
        else:
            def hook(_module, args, block=value):
                return (fake_quant_dynamic(args[0], block),) + tuple(args[1:])

        target = module if name == "" else get_module(module, name)
        handles.append(target.register_forward_pre_hook(hook))
    setattr(module, _HOOKS, handles)


def clear_act_quant(module: torch.nn.Module) -> None:
    """Remove activation fake-quant hooks from ``module`` and everything below it."""
    for sub in module.modules():
        for handle in getattr(sub, _HOOKS, []):
            handle.remove()
        if hasattr(sub, _HOOKS):
            delattr(sub, _HOOKS)


def recipe_codes(weight: torch.Tensor, tensors: dict, path: str, *, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale [out, G]) of a recipe's linear: its stored codes (GPTQ), else
    ``clamp(round(weight / scale))``; a missing or mismatched tensor is a ``RecipeError``."""
    scale, codes = tensors.get(f"{path}.scale"), tensors.get(f"{path}.qweight")
    if scale is None:
        raise RecipeError(f"scales file has no scale for {path}")
    if codes is None:
        try:
            return quantize_with_scale(weight, scale, bits=bits, block_size=block_size), scale
        except ValueError as exc:
            raise RecipeError(f"{path}: {exc}") from exc
    qmin, qmax = qrange(bits)
    if tuple(codes.shape) != tuple(weight.shape) or codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
        raise RecipeError(f"{path}: stored codes {tuple(codes.shape)} do not fit the weight {tuple(weight.shape)} in {bits} bits")
    if tuple(scale.shape) != (weight.shape[0], weight.shape[1] // block_size):
        raise RecipeError(f"{path}: scale shape {tuple(scale.shape)} does not fit block size {block_size}")
    return codes.to(torch.int8), scale


def requantize(weight: torch.Tensor, tensors: dict, path: str, *, bits: int, block_size: int) -> torch.Tensor:
    """The weight as the deployed graph reconstructs it from the recipe (``recipe_codes``)."""
    q, scale = recipe_codes(weight, tensors, path, bits=bits, block_size=block_size)
    return dequantize(q, scale, block_size)
