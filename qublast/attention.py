"""The attention the exported graphs compute: grouped-query attention without copying K/V.

transformers' SDPA path expands the cached keys and values to every query head
(``repeat_kv``) before attending; in the exported graph that is an Expand plus a transpose of
the whole KV cache at every decode step (about 20% of a SmolLM2 decode step in ONNX Runtime,
docs/results.md). Here the query heads are grouped under their KV head instead:

    q [B, H, S, D] -> [B, Hkv, G*S, D];  scores = q @ K^T [B, Hkv, G*S, P]  (G = H / Hkv)

and the mask [B, 1, S, P] broadcasts over the group. The query is scaled before the product, so
the scores the fp16 MatMul stores are the softmax's logits (q·kᵀ / sqrt(d), not sqrt(d) x larger);
softmax runs in fp32 (as transformers' eager attention does for half-precision models);
everything else in the model's dtype. ``registered`` makes a model use it for the duration of an
export; ``observing`` also hands every score tensor to a callback (``qublast.evaluate.PeakRecorder``
records their peaks: a tensor the fp16 graph stores).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

NAME = "qublast_grouped"
_observers: list[Callable[[torch.nn.Module, torch.Tensor], None]] = []  # see ``observing``


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: returns (output [B, S, H, D], None)."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the export attention")
    batch, heads, seq, dim = query.shape  # [B, H, S, D]
    kv_heads, total = key.shape[1], key.shape[2]  # key/value [B, Hkv, P, D]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    q = (query * scale).reshape(batch, kv_heads, groups * seq, dim)  # head h = kv * G + g
    scores = torch.matmul(q, key.transpose(-1, -2))  # [B, Hkv, G*S, P], in the model's dtype
    for observe in _observers:
        observe(module, scores)
    scores = scores.view(batch, kv_heads, groups, seq, total).float()
    if attention_mask is None:  # transformers skips the mask when causality alone decides: build it
        rows = torch.arange(seq, device=query.device)[:, None] + (total - seq)
        attention_mask = (torch.arange(total, device=query.device)[None, :] <= rows)[None, None]  # [1, 1, S, P]
    mask = attention_mask[:, :, None]  # [B, 1, 1, S, P]
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    else:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, groups * seq, total)
    out = torch.matmul(probs, value)  # [B, Hkv, G*S, D]
    return out.view(batch, heads, seq, dim).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface  # deferred heavy import: qublast.export's --help imports this module
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # deferred heavy import (~4 s with the above)

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean [B, 1, S, P] masks, as SDPA takes


@contextmanager
def registered(model: torch.nn.Module):
    """Within the context ``model`` attends with ``grouped_attention``."""
    _register()
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@contextmanager
def observing(model: torch.nn.Module, callback: Callable[[torch.nn.Module, torch.Tensor], None]):
    """Within the context ``model`` attends with ``grouped_attention``, which passes every attention
    module's scores (q·kᵀ, scaled, before the mask) to ``callback(module, scores)``."""
    with registered(model):
        _observers.append(callback)
        try:
            yield model
        finally:
            _observers.remove(callback)
