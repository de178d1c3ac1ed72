"""The ONNX input/output table every QuBLAST graph follows.

| name                           | dtype        | shape                                    | families          |
|--------------------------------|--------------|------------------------------------------|-------------------|
| input_ids                      | int64        | [batch, seq]                             | all               |
|   or inputs_embeds             | graph float  | [batch, seq, hidden] (host-side table)   | all               |
| attention_mask                 | int64        | [batch, past + seq] (1 = real token)     | attention, hybrid |
| position_ids                   | int64        | [batch, seq]                             | attention, hybrid |
| past_conv.{i}                  | graph float  | [batch, conv_channels, conv_kernel]      | ssm, hybrid       |
| past_ssm.{i}                   | float32 (1)  | [batch, ...state] (Mamba: [B, I, N];     | ssm, hybrid       |
|                                |              | Mamba2 / Falcon-H1: [B, heads, d, N])    |                   |
| past_key_values.{i}.key/value  | graph float  | [batch, kv_heads, past, head_dim]        | attention, hybrid |
| logits (output)                | float32      | [batch, seq, vocab]                      | all               |
| present... (outputs)           | as the past  | the state after these tokens             | all               |

Per layer the state inputs come in the family's order (``LAYER_STATES``); presents mirror them
(``present.{i}.key``, ``present_conv.{i}``, ...). "graph float" is the target's graph dtype
(float16 on Jetson, float32 on the CPU target); (1) the SSM state keeps the dtype transformers
gives it (float32 even in a half-precision model).

Attention families export one graph for prefill and decode (``seq`` dynamic, ``past = 0`` at
prefill). State-space and hybrid families export a single-token step (``seq`` = 1): a prefill
runs it once per prompt token from the zero state, which reproduces the model's own full
forward (checked in tests). A graph takes ``inputs_embeds`` when its bundle stores the
embedding table outside the graph (``embedding.safetensors``); the runtime looks the rows up.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
KV_KINDS = ("key", "value")
LAYER_STATES = {"attention": KV_KINDS, "ssm": ("conv", "ssm"), "hybrid": ("conv", "ssm", *KV_KINDS)}


def past_name(layer: int, kind: str) -> str:
    """Name of a state input: ``past_key_values.{i}.key`` / ``.value``, ``past_conv.{i}``, ``past_ssm.{i}``."""
    return f"past_key_values.{layer}.{kind}" if kind in KV_KINDS else f"past_{kind}.{layer}"


def present_name(layer: int, kind: str) -> str:
    """Name of a state output: ``present.{i}.key`` / ``.value``, ``present_conv.{i}``, ``present_ssm.{i}``."""
    return f"present.{layer}.{kind}" if kind in KV_KINDS else f"present_{kind}.{layer}"


def has_attention(family: str) -> bool:
    return "key" in LAYER_STATES[family]


def input_names(num_layers: int, *, embeds: bool = False, family: str = "attention") -> list[str]:
    """Graph inputs in order."""
    first = [INPUTS_EMBEDS if embeds else INPUT_IDS] + ([ATTENTION_MASK, POSITION_IDS] if has_attention(family) else [])
    return first + [past_name(i, k) for i in range(num_layers) for k in LAYER_STATES[family]]


def output_names(num_layers: int, *, family: str = "attention") -> list[str]:
    """Graph outputs in order."""
    return [LOGITS] + [present_name(i, k) for i in range(num_layers) for k in LAYER_STATES[family]]


@dataclass(frozen=True)
class Layout:
    """What a graph's inputs say about it: family, layers, the KV shape, the recurrent state shapes."""

    family: str
    num_layers: int
    kv_heads: int | None  # None without attention
    head_dim: int | None
    recurrent: dict  # state input name -> shape without the batch dimension (static)
    step_only: bool  # the graph takes one token at a time (state-space and hybrid families)

    def past_names(self) -> list[str]:
        return [past_name(i, k) for i in range(self.num_layers) for k in LAYER_STATES[self.family]]

    def present_names(self) -> list[str]:
        return output_names(self.num_layers, family=self.family)[1:]


def layout_from_shapes(shapes: dict[str, tuple]) -> Layout:
    """Layout from input shapes ``{name: dims}`` (dynamic dims as -1, None or a name); ``ValueError``
    naming the defect when the inputs do not follow this table."""
    kv = sorted(n for n in shapes if n.startswith("past_key_values."))
    conv = sorted(n for n in shapes if n.startswith("past_conv."))
    family = "hybrid" if kv and conv else "ssm" if conv else "attention" if kv else None
    if family is None:
        raise ValueError("no past key/value or recurrent state inputs: not a QuBLAST graph")
    num_layers = (len(kv) // 2) if kv else len(conv)
    expected = input_names(num_layers, family=family)[3 if has_attention(family) else 1:]
    present = sorted(n for n in shapes if n.startswith("past"))
    if present != sorted(expected):
        raise ValueError(f"state inputs {present[:4]}... do not follow io_spec ({expected[:4]}...)")
    kv_heads = head_dim = None
    if kv:
        dims = tuple(shapes[past_name(0, "key")])
        if len(dims) != 4 or not (_static(dims[1]) and _static(dims[3])):
            raise ValueError(f"{past_name(0, 'key')} must be [batch, kv_heads, past, head_dim] with static heads, got {dims}")
        kv_heads, head_dim = int(dims[1]), int(dims[3])
        for name in (n for n in expected if n.startswith("past_key_values.")):
            other = tuple(shapes[name])
            if len(other) != 4 or (other[1], other[3]) != dims[1::2]:
                raise ValueError(f"{name} has shape {other}, unlike {past_name(0, 'key')} {dims}")
    recurrent = {}
    for name in (n for n in expected if not n.startswith("past_key_values.")):
        rest = tuple(shapes[name])[1:]
        if not all(_static(d) for d in rest):
            raise ValueError(f"{name} needs a static shape after the batch, got {tuple(shapes[name])}")
        recurrent[name] = tuple(int(d) for d in rest)
    return Layout(family, num_layers, kv_heads, head_dim, recurrent, step_only=family != "attention")


def _static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim > 0


def empty_state(layout: Layout, batch: int, dtypes: dict[str, np.dtype]) -> list[np.ndarray]:
    """The state before the first token: empty KV (past = 0), zero conv and SSM states."""
    out = []
    for name in layout.past_names():
        if name in layout.recurrent:
            out.append(np.zeros((batch, *layout.recurrent[name]), dtypes[name]))
        else:
            out.append(np.zeros((batch, layout.kv_heads, 0, layout.head_dim), dtypes[name]))
    return out


def model_feeds(input_ids: np.ndarray, past: list[np.ndarray], *, layout: Layout, embeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The graph's inputs for ``input_ids`` [B, S] after ``past`` (the state arrays in the layout's
    order); ``embeds`` [B, S, hidden] replaces the ids for a graph that takes ``inputs_embeds``."""
    batch, seq = input_ids.shape
    feeds: dict[str, np.ndarray] = {INPUTS_EMBEDS: embeds} if embeds is not None else {INPUT_IDS: input_ids.astype(np.int64)}
    if has_attention(layout.family):
        past_len = past[layout.past_names().index(past_name(0, "key"))].shape[2]
        feeds[ATTENTION_MASK] = np.ones((batch, past_len + seq), np.int64)  # [B, P + S]
        feeds[POSITION_IDS] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
    feeds.update(zip(layout.past_names(), past))
    return feeds
