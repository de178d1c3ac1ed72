"""The ONNX input/output table every QuBLAST graph follows (prefill and decode in one graph).

| name                           | dtype   | shape                                   |
|--------------------------------|---------|-----------------------------------------|
| input_ids                      | int64   | [batch, seq]                            |
| attention_mask                 | int64   | [batch, past + seq] (1 = real token)    |
| position_ids                   | int64   | [batch, seq]                            |
| past_key_values.{i}.key/value  | float32 | [batch, kv_heads, past, head_dim]       |
| logits (output)                | float32 | [batch, seq, vocab]                     |
| present.{i}.key/value (output) | float32 | [batch, kv_heads, past + seq, head_dim] |

Prefill passes ``past = 0`` (empty past tensors); decode feeds the presents back as pasts.
SSM state for Mamba / hybrid models will sit beside the KV cache as further ``past_*`` /
``present_*`` pairs.
"""
from __future__ import annotations

import numpy as np

INPUT_IDS = "input_ids"
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


def input_names(num_layers: int) -> list[str]:
    """Graph inputs in order."""
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + [past_name(i, k) for i in range(num_layers) for k in KV_KINDS]


def output_names(num_layers: int) -> list[str]:
    """Graph outputs in order."""
    return [LOGITS] + [present_name(i, k) for i in range(num_layers) for k in KV_KINDS]


def model_feeds(input_ids: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs for ``input_ids`` [B, S] after ``past`` (2 * layers arrays [B, H, P, D])."""
    batch, seq = input_ids.shape
    past_len = past[0].shape[2]
    feeds = {
        INPUT_IDS: input_ids.astype(np.int64),
        ATTENTION_MASK: np.ones((batch, past_len + seq), np.int64),  # [B, P + S]
        POSITION_IDS: np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
    }
    feeds.update(zip(input_names(len(past) // 2)[3:], past))
    return feeds
