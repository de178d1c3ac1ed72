"""The attention the exported graphs compute: grouped-query attention without copying K/V.

transformers' SDPA path expands the cached keys and values to every query head
(``repeat_kv``) before attending; in the exported graph that is an Expand plus a transpose of
the whole KV cache at every decode step (about 20% of a SmolLM2 decode step in ONNX Runtime,
docs/results.md). Here the query heads are grouped under their KV head instead:

    q [B, H, S, D] -> [B, Hkv, G*S, D];  scores = q @ K^T [B, Hkv, G*S, P]  (G = H / Hkv)

and the mask [B, 1, S, P] broadcasts over the group. Softmax runs in fp32 (as transformers'
eager attention does for half-precision models); everything else in the model's dtype.
``registered`` makes a model use it for the duration of an export.

For ONNX Runtime on CPU the whole step (attention of the new tokens over the past, and the
past grown by them) is one ``com.microsoft::GroupQueryAttention`` node instead (``gqa``): in
a SmolLM2 decode step after 512 tokens the attention subgraph and its KV Concat were ~30 of
the ~45 nodes per layer and ~5 ms of ~21 (docs/results.md). The model then runs without a
transformers cache: ``GqaState`` carries each layer's past in and present out, the new keys
and values reach the attention interface unconcatenated, rotary embedding stays transformers'
own (``do_rotary=0``), and the causal mask is GroupQueryAttention's: ``seqlens_k`` (real
tokens per row - 1, from ``attention_mask``) and ``total_sequence_length``, so rows may be
right-padded only. ONNX Runtime's kernel takes a prompt over a non-empty past only at batch 1
(``group_query_attention_helper.h``); a prompt from an empty past and single-token steps at any
batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

NAME = "qublast_grouped"
GQA_NAME = "qublast_ort_gqa"


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: returns (output [B, S, H, D], None)."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the export attention")
    batch, heads, seq, dim = query.shape  # [B, H, S, D]
    kv_heads, total = key.shape[1], key.shape[2]  # key/value [B, Hkv, P, D]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(batch, kv_heads, groups * seq, dim)  # head h = kv * G + g
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # [B, Hkv, G*S, P]
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


@dataclass
class GqaState:
    """One traced forward's state for ``gqa_attention``: each layer's past in (flat k0, v0, k1, ...),
    its present out, and GroupQueryAttention's length inputs."""

    past: tuple[torch.Tensor, ...]
    seqlens_k: torch.Tensor  # int32 [B]: real tokens of each row, minus 1
    total: torch.Tensor  # int32 scalar: past + new length
    presents: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]) -> GqaState:
        seqlens = (attention_mask.sum(dim=1) - 1).to(torch.int32)
        total = torch.ones_like(attention_mask[0]).sum().to(torch.int32)
        return cls(tuple(past), seqlens, total)

    def flat_presents(self) -> list[torch.Tensor]:
        return [t for i in sorted(self.presents) for t in self.presents[i]]


_STATE: list[GqaState] = []  # the state of the forward being traced (set by ``gqa_forward``)


@contextmanager
def gqa_forward(state: GqaState):
    """Within the context ``gqa_attention`` reads and fills ``state``."""
    _STATE.append(state)
    try:
        yield state
    finally:
        _STATE.pop()


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface over the new tokens' ``key`` / ``value`` [B, Hkv, S, D] and the
    layer's past from the current ``GqaState``: one GroupQueryAttention node; (output [B, S, H, D], None)."""
    for unsupported in ("softcap", "sliding_window"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"GroupQueryAttention export: {unsupported} is not supported")
    state = _STATE[-1]
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    layer = module.layer_idx
    past_key, past_value = state.past[2 * layer], state.past[2 * layer + 1]
    total = past_key.shape[2] + seq
    scale = scaling if scaling is not None else dim ** -0.5
    out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [query.transpose(1, 2).reshape(batch, seq, heads * dim), key.transpose(1, 2).reshape(batch, seq, kv_heads * dim),
         value.transpose(1, 2).reshape(batch, seq, kv_heads * dim), past_key, past_value, state.seqlens_k, state.total],
        {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(scale)},
        dtypes=(query.dtype, key.dtype, value.dtype),
        shapes=([batch, seq, heads * dim], [batch, kv_heads, total, dim], [batch, kv_heads, total, dim]),
        version=1,
    )
    state.presents[layer] = (present_key, present_value)
    return out.view(batch, seq, heads, dim), None


def gqa_unsupported(config) -> str | None:
    """Why a model cannot attend through GroupQueryAttention as ``gqa_attention`` writes it, or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) is not None or "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "sliding-window attention"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if head_dim % 8:
        return f"head size {head_dim} is not a multiple of 8"
    return None


def _no_mask(*args, **kwargs):
    return None  # GroupQueryAttention masks by seqlens_k itself


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean [B, 1, S, P] masks, as SDPA takes
    AttentionInterface.register(GQA_NAME, gqa_attention)
    AttentionMaskInterface.register(GQA_NAME, _no_mask)


@contextmanager
def registered(model: torch.nn.Module, name: str = NAME):
    """Within the context ``model`` attends with ``grouped_attention`` (or ``gqa_attention`` when
    ``name`` is ``GQA_NAME``)."""
    _register()
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
