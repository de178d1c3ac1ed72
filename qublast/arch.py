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
    """Where an architecture keeps its blocks, linears, embeddings and head, and what state it carries.

    ``kind``: "attention" (KV cache), "ssm" (per layer conv and SSM state) or "hybrid" (both in
    every layer); it picks the graph's inputs (``runtime.io_spec``). ``kept`` names the block's
    parameters that stay in the graph's float type and why (reported; nothing is dropped silently).
    """

    name: str
    blocks: str = "model.layers"
    groups: tuple[LinearGroup, ...] = ()
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm_weight_offset: float = 0.0  # Gemma norms scale by (1 + weight)
    kind: str = "attention"
    embed_multiplier: str | None = None  # config attribute the model multiplies the embedding output by
    logits_multiplier: str | None = None  # config attribute the model multiplies lm_head's output by
    kept: tuple[tuple[str, str], ...] = ()  # (parameter, why it is not quantized)
    bulk: tuple[str, ...] = ()  # the linears holding most of a block's weights: a mixed format's low-precision part
    # Where the residual stream is written and read (``qublast.rescale``; empty: not rescalable, an fp16
    # overflow stays refused): modules whose output is added to it, norms that read it (the final norm aside),
    # and the (up, down) pair of a gated MLP whose product act(gate) * up can move a factor into down.
    residual_writers: tuple[str, ...] = ()
    residual_readers: tuple[str, ...] = ()
    up_down: tuple[str, str] | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        """All quantizable linears of one block, in a fixed order."""
        return tuple(name for group in self.groups for name in group.linears)


_ATTN_QKV = LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm")
_ATTN_O = LinearGroup(("self_attn.o_proj",))
_MLP_DOWN = LinearGroup(("mlp.down_proj",), "mlp.up_proj")

_GATED_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_RESIDUAL = {"residual_writers": ("self_attn.o_proj", "mlp.down_proj"),
                   "residual_readers": ("input_layernorm", "post_attention_layernorm"), "up_down": ("mlp.up_proj", "mlp.down_proj")}
_MAMBA_RESIDUAL = {"residual_writers": ("mixer.out_proj",), "residual_readers": ("norm",)}
_LLAMA_LIKE = (
    _ATTN_QKV,
    _ATTN_O,
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    _MLP_DOWN,
)

_SSM_KEPT = (
    ("mixer.conv1d", "depthwise causal conv: 4 taps per channel, under 1% of the block's weights"),
    ("mixer.A_log, mixer.D, mixer.dt_bias", "the recurrence's own parameters: per-channel vectors that set the state's decay"),
)
_MAMBA = ArchSpec(
    "mamba", blocks="backbone.layers", embed="backbone.embeddings", final_norm="backbone.norm_f", kind="ssm",
    bulk=("mixer.in_proj",), **_MAMBA_RESIDUAL,
    groups=(LinearGroup(("mixer.in_proj",), "norm"), LinearGroup(("mixer.x_proj",)), LinearGroup(("mixer.out_proj",))),
    kept=(*_SSM_KEPT, ("mixer.dt_proj", "not called as a Linear (weight @ dt before softplus); sets the step size of "
                                        "exp(A dt), and is 2% of the block's weights")),
)
_MAMBA2 = ArchSpec(
    "mamba2", blocks="backbone.layers", embed="backbone.embeddings", final_norm="backbone.norm_f", kind="ssm",
    bulk=("mixer.in_proj",), **_MAMBA_RESIDUAL,
    groups=(LinearGroup(("mixer.in_proj",), "norm"), LinearGroup(("mixer.out_proj",), "mixer.norm")),
    kept=_SSM_KEPT,
)
_FALCON_H1 = ArchSpec(
    "falcon_h1", kind="hybrid", final_norm="model.final_layernorm",
    groups=(
        # attention and the Mamba-2 mixer read the same input norm (each times its own muP scalar, which a fold commutes with)
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mamba.in_proj"), "input_layernorm"),
        LinearGroup(("self_attn.o_proj",)),
        LinearGroup(("mamba.out_proj",), "mamba.norm"),  # foldable only with mamba_rms_norm (else an Identity)
        LinearGroup(("feed_forward.gate_proj", "feed_forward.up_proj"), "pre_ff_layernorm"),
        LinearGroup(("feed_forward.down_proj",), "feed_forward.up_proj"),
    ),
    embed_multiplier="embedding_multiplier", logits_multiplier="lm_head_multiplier",
    bulk=("feed_forward.gate_proj", "feed_forward.up_proj"),
    # the muP multipliers scale these outputs linearly, so a factor folded into the weights commutes with them
    residual_writers=("self_attn.o_proj", "mamba.out_proj", "feed_forward.down_proj"),
    residual_readers=("input_layernorm", "pre_ff_layernorm"), up_down=("feed_forward.up_proj", "feed_forward.down_proj"),
    kept=(("mamba.conv1d", "depthwise causal conv"), ("mamba.A_log, mamba.D, mamba.dt_bias", "the recurrence's parameters")),
)

REGISTRY: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", groups=_LLAMA_LIKE, bulk=_GATED_MLP_IN, **_LLAMA_RESIDUAL),
    "mistral": ArchSpec("mistral", groups=_LLAMA_LIKE, bulk=_GATED_MLP_IN, **_LLAMA_RESIDUAL),
    "qwen2": ArchSpec("qwen2", groups=_LLAMA_LIKE, bulk=_GATED_MLP_IN, **_LLAMA_RESIDUAL),
    "qwen3": ArchSpec("qwen3", groups=_LLAMA_LIKE, bulk=_GATED_MLP_IN, **_LLAMA_RESIDUAL),
    "gemma3_text": ArchSpec(
        "gemma3_text",
        groups=(
            _ATTN_QKV,
            _ATTN_O,
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm"),
            _MLP_DOWN,
        ),
        norm_weight_offset=1.0,
        bulk=_GATED_MLP_IN,
        residual_writers=("post_attention_layernorm", "post_feedforward_layernorm"),  # (1 + w) * norm(sublayer output)
        residual_readers=("input_layernorm", "pre_feedforward_layernorm"),
        up_down=("mlp.up_proj", "mlp.down_proj"),
    ),
    "mamba": _MAMBA,
    "mamba2": _MAMBA2,
    "falcon_h1": _FALCON_H1,
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
