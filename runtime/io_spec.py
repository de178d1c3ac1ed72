"""The ONNX input/output table every QuBLAST graph follows (prefill and decode in one graph).

| name                           | dtype        | shape                                   |
|--------------------------------|--------------|-----------------------------------------|
| input_ids                      | int64        | [batch, seq]                            |
|   or inputs_embeds             | graph float  | [batch, seq, hidden] (host-side table)  |
| attention_mask                 | int64        | [batch, past + seq] (1 = real token)    |
| position_ids                   | int64        | [batch, seq]                            |
| past_key_values.{i}.key/value  | graph float  | [batch, kv_heads, past, head_dim]       |
| logits (output)                | float32      | [batch, seq, vocab]                     |
| present.{i}.key/value (output) | graph float  | [batch, kv_heads, past + seq, head_dim] |

"graph float" is the target's graph dtype: float16 on Jetson, float32 on the CPU target.
A graph takes ``inputs_embeds`` when its bundle stores the embedding table outside the graph
(``embedding.safetensors``); the runtime looks the rows up. Prefill passes ``past = 0``
(empty past tensors); decode feeds the presents back as pasts.
"""
from __future__ import annotations

import numpy as np

INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
KV_KINDS = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    """Name of a past key/value input."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Name of a present key/value output."""
    return f"present.{layer}.{kind}"


def input_names(num_layers: int, *, embeds: bool = False) -> list[str]:
    """Graph inputs in order."""
    first = INPUTS_EMBEDS if embeds else INPUT_IDS
    return [first, ATTENTION_MASK, POSITION_IDS] + [past_name(i, k) for i in range(num_layers) for k in KV_KINDS]


def output_names(num_layers: int) -> list[str]:
    """Graph outputs in order."""
    return [LOGITS] + [present_name(i, k) for i in range(num_layers) for k in KV_KINDS]


def model_feeds(input_ids: np.ndarray, past: list[np.ndarray], *, embeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The graph's inputs for ``input_ids`` [B, S] after ``past`` (2 * layers arrays [B, H, P, D]);
    ``embeds`` [B, S, hidden] replaces the ids for a graph that takes ``inputs_embeds``."""
    batch, seq = input_ids.shape
    past_len = past[0].shape[2]
    feeds = {
        ATTENTION_MASK: np.ones((batch, past_len + seq), np.int64),  # [B, P + S]
        POSITION_IDS: np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
    }
    if embeds is None:
        feeds[INPUT_IDS] = input_ids.astype(np.int64)
    else:
        feeds[INPUTS_EMBEDS] = embeds
    feeds.update(zip(input_names(len(past) // 2)[3:], past))
    return feeds
