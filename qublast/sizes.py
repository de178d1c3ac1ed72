"""Byte accounting of a mixed-precision model as a target deploys it (DESIGN.md "Size accounting").

These are *predictions* from shapes and formats, used by allocation; the bundle's reported
sizes are read from the written files (``export.sizes``) and tested against these.
"""
from __future__ import annotations

import torch

from runtime.targets import Target

from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .formats import FP16_BYTES, block_size_for, embed_format, get_format, linear_bytes, linear_format, table_bytes
from .vocab import is_tied, side_table


def linear_bytes_in(linear: torch.nn.Linear, fmt_name: str, target: Target) -> int:
    """Bytes one linear stores in the plain format ``fmt_name`` on ``target``."""
    return linear_bytes(get_format(fmt_name, target), linear.out_features, linear.in_features, target=target,
                        has_bias=linear.bias is not None)


def block_bytes(block: torch.nn.Module, spec: ArchSpec, fmt_name: str, target: Target) -> int:
    """Bytes of a block's quantizable linears in one block format (a mixed one: each linear in its part)."""
    fmt = get_format(fmt_name, target)
    return sum(linear_bytes_in(get_module(block, name), linear_format(fmt, spec, name).name, target) for name in spec.linears)


def linear_entry(linear: torch.nn.Linear, *, name: str, path: str, fmt_name: str, target: Target) -> dict:
    """Recipe entry for one linear in the plain format ``fmt_name`` (error statistics are added by
    the caller when quantized)."""
    fmt = get_format(fmt_name, target)
    return {
        "name": name,
        "path": path,
        "format": fmt_name,
        "bits": fmt.bits,
        "block_size": block_size_for(fmt, linear.in_features) if fmt.bits else None,
        "act": fmt.act,
        "per_channel": fmt.per_channel,
        "shape": [linear.out_features, linear.in_features],
        "bias": linear.bias is not None,
        "bytes": linear_bytes_in(linear, fmt_name, target),
    }


def vocab_bytes(model: torch.nn.Module, spec: ArchSpec, target: Target, *, embed: str, head: str) -> int:
    """Bytes of the embedding table and lm_head as deployed (``vocab_unit_bytes``)."""
    head_module = get_module(model, spec.lm_head)
    return vocab_unit_bytes(target, embed=embed, head=head, tied=is_tied(model, spec),
                            table_shape=tuple(get_module(model, spec.embed).weight.shape),
                            head_shape=tuple(head_module.weight.shape), head_bias=head_module.bias is not None)


def vocab_unit_bytes(target: Target, *, embed: str, head: str, tied: bool, table_shape: tuple[int, int],
                     head_shape: tuple[int, int], head_bias: bool = False) -> int:
    """The vocabulary unit's bytes from shapes (what calibration prices and the report re-prices):
    one in-graph copy of a tied table kept in the graph (both unquantized, or lm_head's codes on a
    target that gathers from them), else the host table plus the graph's lm_head."""
    head_bytes = linear_bytes(get_format(head, target), *head_shape, target=target, has_bias=head_bias)
    if not side_table(tied=tied, embed=embed, head=head, shared_quantized=target.shared_quantized_table):
        return head_bytes
    return table_bytes(embed_format(embed), *table_shape) + head_bytes


def fp16_bytes(model: torch.nn.Module) -> int:
    """The reference: every distinct parameter tensor in fp16."""
    seen = {p.data_ptr(): p.numel() for p in model.parameters()}
    return FP16_BYTES * sum(seen.values())


GRAPH_BYTES_PER_BLOCK = 16 << 10  # model.onnx's own bytes (nodes, small inline constants): 11.7 KiB a block for SmolLM2


def rest_bytes(model: torch.nn.Module, spec: ArchSpec, target: Target) -> int:
    """Everything but the block linears and the embedding / lm_head: the other parameters (norms, ...)
    in the graph's float type, and an allowance for the graph file's structure."""
    skip = {get_module(model, spec.embed).weight.data_ptr(), get_module(model, spec.lm_head).weight.data_ptr()}
    for layer in blocks_of(model, spec):
        for name in spec.linears:
            linear = get_module(layer, name)
            skip.update(p.data_ptr() for p in linear.parameters())
    seen = {p.data_ptr(): p.numel() for p in model.parameters() if p.data_ptr() not in skip}
    return target.float_bytes * sum(seen.values()) + GRAPH_BYTES_PER_BLOCK * len(blocks_of(model, spec))


def predicted_sizes(model: torch.nn.Module, spec: ArchSpec, target: Target, formats: list[str], *, embed: str, head: str) -> dict[str, int]:
    """Predicted deployed bytes (whole model, block linears) next to the fp16 references."""
    layers = blocks_of(model, spec)
    blocks = sum(block_bytes(layer, spec, fmt, target) for layer, fmt in zip(layers, formats))
    return {
        "size_bytes_fp16": fp16_bytes(model),
        "size_bytes_predicted": blocks + vocab_bytes(model, spec, target, embed=embed, head=head) + rest_bytes(model, spec, target),
        "size_bytes_blocks_fp16": sum(fp16_bytes(get_module(layer, name)) for layer in layers for name in spec.linears),
        "size_bytes_blocks_predicted": blocks,
    }

