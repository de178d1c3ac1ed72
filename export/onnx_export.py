"""PyTorch causal LM -> ONNX (opset 21) with a KV cache, one graph for prefill and decode.

The model is wrapped so the graph takes flat past key/value tensors (a ``DynamicCache`` is
built inside ``forward``) and returns fp32 logits and flat presents; names follow
``runtime.io_spec``. The graph's float type is the model's dtype at export (fp16 for Jetson:
weights, activations, KV cache; transformers' RMSNorm and rotary tables still compute in
fp32 inside, softmax too, see ``export.attention``). Its first input is ``input_ids``, or
``inputs_embeds`` when the embedding table is looked up on the host. The dynamo exporter
pre-transposes linear weights to ``[in, out]`` constants and keeps each node's module path in
its metadata: ``linear_modules`` reads that map before any editing (onnx-graphsurgeon drops
metadata).
"""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import torch

from runtime import io_spec

from .attention import registered

OPSET = 21
_LINEAR_NS = re.compile(r"([\w.]+): torch\.nn\.modules\.linear\.Linear")


class _KvWrapper(torch.nn.Module):
    """flat (input_ids | inputs_embeds, attention_mask, position_ids, *past) -> (fp32 logits, *present)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, *, embeds: bool):
        super().__init__()
        self.model, self.num_layers, self.embeds = model, num_layers, embeds

    def forward(self, first, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        tokens = {"inputs_embeds": first} if self.embeds else {"input_ids": first}
        out = self.model(**tokens, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits.float(), *presents)


def kv_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def export_onnx(model: torch.nn.Module, path: str | Path, *, embeds: bool = False) -> onnx.ModelProto:
    """Export ``model`` (in the dtype the graph should have) to ``path`` with external data;
    returns the loaded proto (no weights). ``embeds``: the graph takes ``inputs_embeds``."""
    config = model.config
    dtype = next(model.parameters()).dtype
    num_layers = config.num_hidden_layers
    kv_heads, head_dim = kv_shape(config)
    batch, seq, past = 1, 3, 4  # trace sizes: neither 0 nor 1, so no dimension is specialised
    first = torch.zeros(batch, seq, config.hidden_size, dtype=dtype) if embeds else torch.zeros(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64)[None]
    pasts = tuple(torch.zeros(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * num_layers))
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    p, t = torch.export.Dim("past"), torch.export.Dim("total")
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in pasts))
    wrapper = _KvWrapper(model, num_layers, embeds=embeds).eval()
    with registered(model), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (first, mask, pos, *pasts), dynamic_shapes=shapes, dynamo=True,
            opset_version=OPSET, input_names=io_spec.input_names(num_layers, embeds=embeds),
            output_names=io_spec.output_names(num_layers), verbose=False,
        )
    path = Path(path)
    program.save(str(path), external_data=True)
    return onnx.load(str(path), load_external_data=False)


def linear_modules(proto: onnx.ModelProto) -> dict[str, str]:
    """``{node name: module path}`` for every MatMul/Gemm the exporter made from an nn.Linear."""
    out = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for prop in node.metadata_props:
            if prop.key == "namespace":
                found = _LINEAR_NS.findall(prop.value)
                if found:
                    out[node.name] = _strip_wrapper(found[-1])
    return out


def _strip_wrapper(path: str) -> str:
    """'model.model.layers.0.self_attn.q_proj' (wrapper attribute first) -> the model's own path."""
    return path.split(".", 1)[1] if path.startswith("model.") else path
