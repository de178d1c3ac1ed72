"""Exact rescaling for fp16 graphs: fit a model whose activations exceed fp16 without changing it.

Some models carry "massive activations" in their residual stream (Gemma 3 reaches 1e5, beyond
fp16's 65504; transformers PR #37226). The residual stream is read only through RMSNorms, which
are scale-invariant but for their epsilon, so dividing the whole stream by one factor ``s`` is
exact when

- what writes into the stream takes 1/s: the embedding's output (its table), and every module
  whose output is added to the stream (``ArchSpec.residual_writers``: Llama's ``o_proj`` and
  ``down_proj``, Gemma's post-attention / post-feedforward norms in their (offset + weight) form,
  Mamba's ``out_proj``);
- every norm that reads the stream (``ArchSpec.residual_readers`` and the final norm) takes
  eps / s^2;
- a tied ``lm_head`` (its table took 1/s) gets s back from the final norm's gain.

Where the gated MLP's product act(gate) * up or ``up_proj``'s output peaks on its own (``down_proj``'s
input), a factor ``t`` moves from ``up_proj`` into ``down_proj`` (``ArchSpec.up_down``): down reads (act(gate) * up) / t
and its weight is t times larger, so its output is unchanged.

All factors are powers of two, so the weights change exponent only and the rescaled fp32 model
computes the same numbers (up to the epsilon's rounding). They are chosen from the peaks the fp
model reaches on calibration text, with the headroom rule of ``qublast.evaluate`` (each peak at
most ``FP16_MAX / FP16_HEADROOM`` after rescaling), recorded in the recipe's ``model.rescale``
and applied again when a recipe is replayed. What rescaling cannot fix stays refused.
"""
from __future__ import annotations

import math

import torch

from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .evaluate import FP16_HEADROOM, FP16_MAX, INPUT

LIMIT = FP16_MAX / FP16_HEADROOM
# A model that needs rescaling has every rescalable tensor brought to LIMIT / QUANT_MARGIN, not just
# under LIMIT: the quantized model's peaks are not the fp model's. Measured (docs/results.md): the
# de-gridded SmolLM2 inflated to 7.8x beyond fp16, rescaled to at most LIMIT, then quantized for 5%
# (w4/w4m, GPTQ, reconstruction) reached 4.8e4 at a gated product that was 3.3e4 in the fp model.
QUANT_MARGIN = 2.0
_APPLIED = "_qublast_rescale"  # set on a model once its factors are folded: applying twice would rescale twice


def supported(spec: ArchSpec) -> bool:
    """True when the registry says where an architecture's residual stream is written and read."""
    return bool(spec.residual_writers and spec.residual_readers)


def power_of_two_above(peak: float, limit: float = LIMIT) -> float:
    """The smallest power of two ``f`` with ``peak / f <= limit`` (1.0 when the peak already fits)."""
    return 1.0 if peak <= limit else float(2 ** math.ceil(math.log2(peak / limit)))


def residual_peak(peaks: dict[str, float], spec: ArchSpec, num_blocks: int) -> tuple[float, str | None]:
    """Largest value the residual stream reaches: the embedding's output, every block's output, and
    the input of every norm that reads the stream (mid-block residual included)."""
    names = [spec.embed, *(f"{spec.blocks}.{i}" for i in range(num_blocks))]
    readers = [f"{spec.blocks}.{i}.{r}" for i in range(num_blocks) for r in spec.residual_readers] + [spec.final_norm]
    names += [f"{r}{INPUT}" for r in readers]
    found = [(peaks[n], n) for n in names if n in peaks]
    return max(found) if found else (0.0, None)


def choose(peaks: dict[str, float], spec: ArchSpec, num_blocks: int) -> dict | None:
    """The factors that bring the residual stream and the gated products within fp16's headroom;
    None when nothing needs rescaling (no peak above ``LIMIT``) or the architecture has no entry
    for it. When something does, every rescalable tensor is brought to ``LIMIT / QUANT_MARGIN``."""
    if not supported(spec):
        return None
    residual, _ = residual_peak(peaks, spec, num_blocks)
    products = {}
    if spec.up_down:
        for i in range(num_blocks):
            up, down = (f"{spec.blocks}.{i}.{name}" for name in spec.up_down)
            products[str(i)] = max(peaks.get(f"{down}{INPUT}", 0.0), peaks.get(up, 0.0))  # the product, and up itself
    if max([residual, *products.values()]) <= LIMIT:
        return None
    target = LIMIT / QUANT_MARGIN
    up_down = {i: t for i, p in products.items() if (t := power_of_two_above(p, target)) > 1}
    return {"residual": power_of_two_above(residual, target), "up_down": up_down}


def apply(model: torch.nn.Module, spec: ArchSpec, factors: dict | None) -> None:
    """Fold ``factors`` (from ``choose``, or a recipe's ``model.rescale``) into the model in place; once."""
    if not factors or getattr(model, _APPLIED, None) is not None:
        return
    s = float(factors.get("residual", 1.0))
    layers = blocks_of(model, spec)
    with torch.no_grad():
        if s != 1:
            embed = get_module(model, spec.embed)
            head = get_module(model, spec.lm_head)
            tied = head.weight.data_ptr() == embed.weight.data_ptr()
            embed.weight.div_(s)
            for layer in layers:
                for name in spec.residual_writers:
                    _scale_output(layer, name, 1 / s, spec.norm_weight_offset)
                for name in spec.residual_readers:
                    _scale_eps(get_module(layer, name), 1 / s**2)
            _scale_eps(get_module(model, spec.final_norm), 1 / s**2)
            if tied:  # lm_head's weights are the table, now 1/s: the final norm's output takes s
                _scale_output(model, spec.final_norm, s, spec.norm_weight_offset)
        for index, t in factors.get("up_down", {}).items():
            layer = layers[int(index)]
            _scale_output(layer, spec.up_down[0], 1 / float(t), spec.norm_weight_offset)
            get_module(layer, spec.up_down[1]).weight.mul_(float(t))
    setattr(model, _APPLIED, dict(factors))


def _scale_output(root: torch.nn.Module, path: str, factor: float, offset: float) -> None:
    """Multiply the output of the linear or norm at ``path`` under ``root`` by ``factor``.

    A norm whose gain is ``offset + weight`` (Gemma's 1 + w) and must shrink is replaced by a
    ``GainNorm`` holding the gain itself: (1 + w) / s stored as w' = (1 + w) / s - 1 would keep
    only a few bits of the gain once w' is close to -1 (fp16 has 11)."""
    module = get_module(root, path)
    if isinstance(module, torch.nn.Linear):
        module.weight.mul_(factor)
        if module.bias is not None:
            module.bias.mul_(factor)
    elif isinstance(module, GainNorm) or offset == 0:
        module.weight.mul_(factor)
    elif factor >= 1:
        weight = module.weight
        weight.copy_((weight.double() + offset).mul(factor).sub(offset).to(weight.dtype))
    else:
        parent, _, name = path.rpartition(".")
        setattr(get_module(root, parent) if parent else root, name, GainNorm.of(module, factor, offset))


class GainNorm(torch.nn.Module):
    """An RMSNorm computed in fp32 whose weight is its gain (no offset): Gemma's norm, rescaled."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    @classmethod
    def of(cls, norm: torch.nn.Module, factor: float, offset: float) -> GainNorm:
        eps = getattr(norm, _eps_attr(norm))
        gain = (norm.weight.detach().float() + offset) * factor
        return cls(gain.to(norm.weight.dtype), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).type_as(x)


def _scale_eps(norm: torch.nn.Module, factor: float) -> None:
    attr = _eps_attr(norm)
    setattr(norm, attr, getattr(norm, attr) * factor)


def _eps_attr(norm: torch.nn.Module) -> str:
    """The name under which a norm module keeps its epsilon (transformers' families differ)."""
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(norm, attr, None), float):
            return attr
    raise TypeError(f"{type(norm).__name__} has no epsilon attribute to rescale")
