"""Architecture knowledge as data: one ``ArchSpec`` per supported ``config.model_type``.

Adding a model family means adding an entry to ``REGISTRY``, not a branch in the code.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input.

    ``producer`` (relative to the block) is where the scaling map's 1/s is folded: the norm whose
    output feeds them, or a linear whose output channels reach them unmixed and scaled only
    linearly (``up_proj`` of a gated MLP: down_proj reads act(gate) * up, so dividing up's rows
    by s divides down's input by s), or ``None`` when nothing foldable precedes them (o_proj).
    """

    linears: tuple[str, ...]
    producer: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its blocks, linears, embeddings and head."""

    name: str
    blocks: str = "model.layers"
    groups: tuple[LinearGroup, ...] = ()
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm_weight_offset: float = 0.0  # Gemma norms scale by (1 + weight)

    @property
    def linears(self) -> tuple[str, ...]:
        """All quantizable linears of one block, in a fixed order."""
        return tuple(name for group in self.groups for name in group.linears)


_ATTN_QKV = LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm")
_ATTN_O = LinearGroup(("self_attn.o_proj",))
_MLP_DOWN = LinearGroup(("mlp.down_proj",), "mlp.up_proj")

_LLAMA_LIKE = (
    _ATTN_QKV,
    _ATTN_O,
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    _MLP_DOWN,
)

REGISTRY: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", groups=_LLAMA_LIKE),
    "mistral": ArchSpec("mistral", groups=_LLAMA_LIKE),
    "qwen2": ArchSpec("qwen2", groups=_LLAMA_LIKE),
    "qwen3": ArchSpec("qwen3", groups=_LLAMA_LIKE),
    "gemma3_text": ArchSpec(
        "gemma3_text",
        groups=(
            _ATTN_QKV,
            _ATTN_O,
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm"),
            _MLP_DOWN,
        ),
        norm_weight_offset=1.0,
    ),
}


def arch_for(model_type: str) -> ArchSpec:
    """Return the registry entry for ``model_type`` or raise ``UnsupportedModelError``."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}; supported: {known}"
        ) from None
