"""PyTorch causal LM -> ONNX (opset 21) with its state as graph inputs and outputs.

Attention families: one graph for prefill and decode, flat past key/value tensors in (a
``DynamicCache`` is built inside ``forward``), fp32 logits and flat presents out. State-space
and hybrid families (Mamba, Mamba2, Falcon-H1): a single-token step with every layer's conv
and SSM state (and, for hybrids, key/value cache) in and out; transformers' single-token
recurrent path (``has_previous_state``) is what traces to a dynamic graph for all three (the
reference Mamba scan is a Python loop over the sequence, and Mamba2's chunked scan traces to a
dynamic length only from some trace lengths), and stepping from the zero state reproduces the
full forward, so a prefill runs the step once per token. Names follow ``runtime.io_spec``. The
graph's float type is the model's dtype at export (fp16 for Jetson:
weights, activations, KV cache; transformers' RMSNorm and rotary tables still compute in
fp32 inside, softmax too, see ``qublast.attention``). Its first input is ``input_ids``, or
``inputs_embeds`` when the embedding table is looked up on the host. The dynamo exporter
pre-transposes linear weights to ``[in, out]`` constants and keeps each node's module path in
its metadata: ``linear_modules`` reads that map before any editing (onnx-graphsurgeon drops
metadata).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import onnx
import torch
from transformers import DynamicCache

from qublast.attention import registered
from runtime import io_spec

OPSET = 21
_LINEAR_NS = re.compile(r"([\w.]+): torch\.nn\.modules\.linear\.Linear")


class _KvWrapper(torch.nn.Module):
    """flat (input_ids | inputs_embeds, attention_mask, position_ids, *past) -> (fp32 logits, *present)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, *, embeds: bool):
        super().__init__()
        self.model, self.num_layers, self.embeds = model, num_layers, embeds

    def forward(self, first, attention_mask, position_ids, *past):
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


class _StepWrapper(torch.nn.Module):
    """flat (input_ids | inputs_embeds [B, 1], [attention_mask, position_ids,] *state) -> (fp32 logits, *new state)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, *, embeds: bool, hybrid: bool, conv_kernel: int):
        super().__init__()
        self.model, self.num_layers, self.embeds, self.hybrid, self.conv_kernel = model, num_layers, embeds, hybrid, conv_kernel

    def forward(self, first, *rest):
        extra = {}
        if self.hybrid:
            mask, positions, *rest = rest
            extra = {"attention_mask": mask, "position_ids": positions}
        tokens = {"inputs_embeds": first} if self.embeds else {"input_ids": first}
        out = self.model(**tokens, cache=self._cache(rest), use_cache=True, **extra)
        return (out.logits.float(), *recurrent_state(out.cache, hybrid=self.hybrid))

    def _cache(self, flat):
        """A ``DynamicCache`` whose layers hold the given states, marked as after a previous step (decode path)."""
        per = 4 if self.hybrid else 2
        cache = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            conv, ssm = flat[per * i].clone(), flat[per * i + 1].clone()  # the decode path updates them in place
            layer.conv_states[0], layer.recurrent_states[0] = conv, ssm
            layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
            layer.has_previous_state[0] = True
            layer.conv_kernel_size[0] = self.conv_kernel
            layer.dtype, layer.device = conv.dtype, conv.device
            if self.hybrid:
                layer.keys, layer.values = flat[per * i + 2], flat[per * i + 3]
                layer.is_initialized = True
        return cache


def recurrent_state(cache, *, hybrid: bool) -> list[torch.Tensor]:
    """Every layer's (conv, ssm[, key, value]) state of a transformers ``DynamicCache``, io_spec order."""
    out = []
    for layer in cache.layers:
        out += [layer.conv_states[0], layer.recurrent_states[0]]
        if hybrid:
            out += [layer.keys, layer.values]
    return out


@torch.no_grad()
def state_examples(model: torch.nn.Module, *, hybrid: bool, batch: int, past: int) -> list[torch.Tensor]:
    """Zero states with the shapes and dtypes the model's own cache has after one token (KV: ``past`` long)."""
    out = model(input_ids=torch.zeros(1, 1, dtype=torch.int64), use_cache=True)
    examples = []
    for t in recurrent_state(out.cache, hybrid=hybrid):
        shape = (batch, *t.shape[1:])
        if t.dim() == 4 and hybrid and len(examples) % 4 >= 2:  # key / value: [B, kv_heads, past, head_dim]
            shape = (batch, t.shape[1], past, t.shape[3])
        examples.append(torch.zeros(shape, dtype=t.dtype))
    return examples


def export_onnx(model: torch.nn.Module, path: str | Path, *, embeds: bool = False, kind: str = "attention") -> onnx.ModelProto:
    """Export ``model`` (in the dtype the graph should have) to ``path`` with external data;
    returns the loaded proto (no weights). ``embeds``: the graph takes ``inputs_embeds``;
    ``kind``: the architecture's state (``ArchSpec.kind``)."""
    if kind != "attention":
        return _export_step(model, Path(path), embeds=embeds, hybrid=kind == "hybrid")
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


def _export_step(model: torch.nn.Module, path: Path, *, embeds: bool, hybrid: bool) -> onnx.ModelProto:
    """The single-token step graph of a state-space or hybrid model."""
    config = model.config
    dtype = next(model.parameters()).dtype
    num_layers = config.num_hidden_layers
    batch, past = 2, 4  # trace sizes: neither 0 nor 1, so no dimension is specialised
    family = "hybrid" if hybrid else "ssm"
    first = torch.zeros(batch, 1, config.hidden_size, dtype=dtype) if embeds else torch.zeros(batch, 1, dtype=torch.int64)
    states = state_examples(model, hybrid=hybrid, batch=batch, past=past)
    b, p, t = torch.export.Dim("batch"), torch.export.Dim("past"), torch.export.Dim("total")
    extra, extra_shapes = (), ()
    if hybrid:
        extra = (torch.ones(batch, past + 1, dtype=torch.int64), torch.full((batch, 1), past, dtype=torch.int64))
        extra_shapes = ({0: b, 1: t}, {0: b})
    state_shapes = tuple({0: b, 2: p} if hybrid and i % 4 >= 2 else {0: b} for i in range(len(states)))
    kernel = getattr(config, "mamba_d_conv", None) or config.conv_kernel
    wrapper = _StepWrapper(model, num_layers, embeds=embeds, hybrid=hybrid, conv_kernel=kernel).eval()
    with (registered(model) if hybrid else contextlib.nullcontext()), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (first, *extra, *states), dynamic_shapes=({0: b}, (*extra_shapes, *state_shapes)), dynamo=True,
            opset_version=OPSET, input_names=io_spec.input_names(num_layers, embeds=embeds, family=family),
            output_names=io_spec.output_names(num_layers, family=family), verbose=False,
        )
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
