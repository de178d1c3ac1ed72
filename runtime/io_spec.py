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
