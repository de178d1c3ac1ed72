"""Byte accounting of a mixed-precision model (DESIGN.md "Size accounting")."""
from __future__ import annotations

import torch

from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .formats import FP16_BYTES, block_size_for, get_format, linear_bytes


def linear_bytes_in(linear: torch.nn.Linear, fmt_name: str) -> int:
    """Bytes one linear stores in format ``fmt_name``."""
    return linear_bytes(get_format(fmt_name), linear.out_features, linear.in_features, has_bias=linear.bias is not None)


def block_bytes(block: torch.nn.Module, spec: ArchSpec, fmt_name: str) -> int:
    """Bytes of a block's quantizable linears in one format."""
    return sum(linear_bytes_in(get_module(block, name), fmt_name) for name in spec.linears)


def linear_entry(linear: torch.nn.Linear, *, name: str, path: str, fmt_name: str) -> dict:
    """Recipe entry for one linear (error statistics are added by the caller when quantized)."""
    fmt = get_format(fmt_name)
    return {
        "name": name,
        "path": path,
        "format": fmt_name,
        "bits": fmt.weight_bits,
        "block_size": block_size_for(fmt, linear.in_features) if fmt.weight_bits else None,
        "shape": [linear.out_features, linear.in_features],
        "bias": linear.bias is not None,
        "bytes": linear_bytes_in(linear, fmt_name),
    }


def is_tied(model: torch.nn.Module, spec: ArchSpec) -> bool:
    """True when lm_head and the embedding share one tensor."""
    return get_module(model, spec.lm_head).weight.data_ptr() == get_module(model, spec.embed).weight.data_ptr()


def model_sizes(model: torch.nn.Module, spec: ArchSpec, plan: list[str], *, lm_head: str) -> dict[str, int]:
    """fp16 and deployed bytes, for the whole model and for the block linears alone."""
    seen, total_fp16 = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total_fp16 += FP16_BYTES * param.numel()
    layers = blocks_of(model, spec)
    blocks_fp16 = sum(block_bytes(layer, spec, "fp16") for layer in layers)
    blocks = sum(block_bytes(layer, spec, fmt) for layer, fmt in zip(layers, plan))
    head = get_module(model, spec.lm_head)
    head_delta = 0
    if lm_head != "fp16":
        head_delta = linear_bytes_in(head, lm_head)
        if not is_tied(model, spec):  # untied: the quantized copy replaces the fp16 one
            head_delta -= linear_bytes_in(head, "fp16")
    return {
        "size_bytes_fp16": total_fp16,
        "size_bytes": total_fp16 - blocks_fp16 + blocks + head_delta,
        "size_bytes_blocks_fp16": blocks_fp16,
        "size_bytes_blocks": blocks,
    }
