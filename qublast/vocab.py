"""The embedding table and ``lm_head`` as allocation units: quantize, measure, apply, replay.

The embedding table is what the model's embedding module outputs per token id (for Gemma the
rows are already multiplied by its scale), so a table looked up on the host and fed as
``inputs_embeds`` computes exactly what the module did. It is stored outside the graph
(``embedding.safetensors``) whenever it or ``lm_head`` is quantized: fp16 rows, INT8 with one
scale per row, or INT4 blocks along the row. A tied table is kept in the graph, once, shared
by the token lookup and the lm_head MatMul, when its two uses stay unquantized, or, on a
target that gathers rows from lm_head's codes (``Target.shared_quantized_table``), when both
take one quantized format: the table is then lm_head's quantized weight, row for row.

``lm_head`` is a graph MatMul like the blocks' linears, in the target's formats, its weight
clip search weighted by the mean square of its input channels (the final norm's output).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from runtime.targets import Target, WeightFormat

from .arch import ArchSpec
from .blocks import BlockRunner, Score, get_module, multiplier
from .deployed import clear_act_quant, requantize, set_act_quant
from .errors import InputError
from .formats import block_size_for, embed_format, get_format
from .gptq import gptq_quantize, hessian
from .quant import QuantizedWeight, measured, quantize_weight
from .schema import Recipe

EMBED_CHUNK = 4096  # token ids per call of the embedding module when reading its table


def is_tied(model: torch.nn.Module, spec: ArchSpec) -> bool:
    """True when lm_head and the embedding share one tensor."""
    return get_module(model, spec.lm_head).weight.data_ptr() == get_module(model, spec.embed).weight.data_ptr()


def side_table(*, tied: bool, embed: str, head: str, shared_quantized: bool) -> bool:
    """True when the embedding table is stored outside the graph (see module docstring);
    ``shared_quantized``: the target's ``shared_quantized_table``."""
    return not (tied and embed == head and (embed == "fp16" or shared_quantized))


@torch.no_grad()
def effective_table(model: torch.nn.Module, spec: ArchSpec) -> torch.Tensor:
    """[V, H] fp32: what the model feeds block 0 for every token id (the embedding module's
    output, times a multiplier the model applies after it, e.g. Falcon-H1's)."""
    embed = get_module(model, spec.embed)
    vocab = embed.weight.shape[0]
    device = embed.weight.device
    rows = [embed(torch.arange(start, min(start + EMBED_CHUNK, vocab), device=device)[None])[0]
            for start in range(0, vocab, EMBED_CHUNK)]
    return torch.cat(rows).float() * multiplier(model, spec.embed_multiplier)


def quantize_table(table: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """The table [V, H] in a host table format: one scale per row (w8) or per block of the row (w4)."""
    return quantize_weight(table, bits=fmt.bits, block_size=block_size_for(fmt, table.shape[1]))


def head_inputs(runner: BlockRunner) -> torch.Tensor:
    """[N, S, H] lm_head's input (the final norm's output) on the runner's windows, fp model."""
    with torch.no_grad():
        return get_module(runner.model, runner.spec.final_norm)(runner.final_hidden).float()


def head_importance(runner: BlockRunner) -> torch.Tensor:
    """[H] mean square of lm_head's input channels on the runner's windows."""
    return head_inputs(runner).pow(2).flatten(0, -2).mean(dim=0)


def gptq_head(runner: BlockRunner, fmt: WeightFormat, fit_final: torch.Tensor, *, act_order: bool = True) -> QuantizedWeight:
    """lm_head by GPTQ, its Hessian from the final norm's output on GPTQ's windows (``fit_final``:
    their last block's output, fp model)."""
    head = get_module(runner.model, runner.spec.lm_head)
    with torch.no_grad():
        h = hessian(get_module(runner.model, runner.spec.final_norm)(fit_final).float())
    return gptq_quantize(head.weight, h, bits=fmt.bits, block_size=block_size_for(fmt, head.in_features), act_order=act_order)


@dataclass(frozen=True)
class VocabTransform:
    """Formats of the embedding table (host formats) and of lm_head (the target's)."""

    embed: WeightFormat
    head: WeightFormat
    head_importance: torch.Tensor | None = None
    head_codes: QuantizedWeight | None = None  # GPTQ's codes and scales for lm_head; None: round to nearest
    shared_quantized: bool = False  # the target's ``shared_quantized_table``

    @classmethod
    def of(cls, target: Target, *, embed: str, head: str, head_importance: torch.Tensor | None = None,
           head_codes: QuantizedWeight | None = None) -> VocabTransform:
        if head not in target.head_formats:
            raise get_format_error(target, head)
        return cls(embed_format(embed), get_format(head, target), head_importance, head_codes, target.shared_quantized_table)

    @classmethod
    def from_recipe(cls, recipe: Recipe, target: Target) -> VocabTransform:
        """The recipe's formats, with the table where the recipe stored it (a recipe written before
        its target kept quantized tied tables in the graph keeps its host table)."""
        vocab = cls.of(target, embed=recipe.embedding.format, head=recipe.lm_head.format)
        return replace(vocab, shared_quantized=vocab.shared_quantized and recipe.embedding.storage == "graph")

    def side_table(self, model: torch.nn.Module, spec: ArchSpec) -> bool:
        return side_table(tied=is_tied(model, spec), embed=self.embed.name, head=self.head.name,
                          shared_quantized=self.shared_quantized)

    def reads_head_codes(self, model: torch.nn.Module, spec: ArchSpec) -> bool:
        """True when the table is lm_head's quantized weight (tied, one quantized format, in the graph)."""
        return self.embed.bits is not None and not self.side_table(model, spec)

    def apply(self, model: torch.nn.Module, spec: ArchSpec) -> dict[str, QuantizedWeight]:
        """Quantize table and head in place (calibration); returns their quantized weights by path."""
        out = {**self.apply_embed(model, spec), **self.apply_head(model, spec)}
        if self.reads_head_codes(model, spec):
            _tie_table(model, spec)
        return out

    def apply_embed(self, model: torch.nn.Module, spec: ArchSpec) -> dict[str, QuantizedWeight]:
        """Replace the embedding by the table as deployed (quantized, or fp16 rows outside the graph);
        a table that is lm_head's codes is left to ``apply``."""
        if self.reads_head_codes(model, spec):
            return {}
        table = effective_table(model, spec)
        out = {spec.embed: quantize_table(table, self.embed)} if self.embed.bits else {}
        if self.embed.bits:
            _set_table(model, spec, out[spec.embed].dequantize())
        elif self.side_table(model, spec):
            _set_table(model, spec, table.half().float())
        return out

    def apply_head(self, model: torch.nn.Module, spec: ArchSpec) -> dict[str, QuantizedWeight]:
        """Quantize lm_head (its own weight; a tied table keeps the original) and its input as the target does."""
        out = {}
        if self.head.bits:
            head = get_module(model, spec.lm_head)
            if self.head_codes is not None:
                out[spec.lm_head] = measured(self.head_codes, head.weight)
            else:
                out[spec.lm_head] = quantize_weight(head.weight, bits=self.head.bits, importance=self.head_importance,
                                                    block_size=block_size_for(self.head, head.in_features))
            _set_head(model, spec, out[spec.lm_head].dequantize())
        self._set_head_act(model, spec)
        return out

    def replay(self, model: torch.nn.Module, spec: ArchSpec, tensors: dict[str, torch.Tensor]) -> None:
        """Quantize table and head in place from a recipe's scales (export and verification)."""
        head, shared = get_module(model, spec.lm_head), self.reads_head_codes(model, spec)
        if self.embed.bits and not shared:
            table = effective_table(model, spec)
            block = block_size_for(self.embed, table.shape[1])
            _set_table(model, spec, requantize(table, tensors, spec.embed, bits=self.embed.bits, block_size=block))
        elif self.side_table(model, spec):
            _set_table(model, spec, effective_table(model, spec).half().float())
        if self.head.bits:
            block = block_size_for(self.head, head.in_features)
            _set_head(model, spec, requantize(head.weight, tensors, spec.lm_head, bits=self.head.bits, block_size=block))
        if shared:
            _tie_table(model, spec)
        self._set_head_act(model, spec)

    def _set_head_act(self, model, spec) -> None:
        if self.head.act == "dynamic":
            head = get_module(model, spec.lm_head)
            set_act_quant(head, {"": ("dynamic", block_size_for(self.head, head.in_features))})


def get_format_error(target: Target, name: str):
    return InputError(f"lm_head cannot take {name!r} on target {target.name!r}; it takes {', '.join(target.head_formats)}")


def _set_table(model: torch.nn.Module, spec: ArchSpec, table: torch.Tensor) -> None:
    """Replace the embedding module by a plain lookup of ``table`` [V, H] (what inputs_embeds feeds),
    in the model's dtype."""
    parent, _, name = spec.embed.rpartition(".")
    rows = table / multiplier(model, spec.embed_multiplier)  # the model multiplies the module's output again
    lookup = torch.nn.Embedding.from_pretrained(rows.to(get_module(model, spec.embed).weight.dtype), freeze=True)
    setattr(get_module(model, parent) if parent else model, name, lookup)


def _set_head(model: torch.nn.Module, spec: ArchSpec, weight: torch.Tensor) -> None:
    """Give lm_head its own weight (a tied embedding keeps the original tensor)."""
    head = get_module(model, spec.lm_head)
    head.weight = torch.nn.Parameter(weight.to(head.weight.dtype), requires_grad=False)


def _tie_table(model: torch.nn.Module, spec: ArchSpec) -> None:
    """Let the embedding module look rows up in lm_head's (quantized) weight, as the graph's
    gather over lm_head's codes does; its own scaling, if any, still applies."""
    get_module(model, spec.embed).weight = get_module(model, spec.lm_head).weight


@contextmanager
def vocab_restored(model: torch.nn.Module, spec: ArchSpec):
    """On leaving the context the embedding module, lm_head's weight and its hooks are as before."""
    parent, _, name = spec.embed.rpartition(".")
    holder = get_module(model, parent) if parent else model
    embed, head = getattr(holder, name), get_module(model, spec.lm_head)
    weight, embed_weight = head.weight, embed.weight
    try:
        yield
    finally:
        setattr(holder, name, embed)
        embed.weight = embed_weight
        clear_act_quant(head)
        head.weight = weight


def score_vocab(runner: BlockRunner, vocab: VocabTransform, *, unit: str) -> Score:
    """CE and KL of the model with only the embedding table (``unit="embed"``) or only lm_head
    (``unit="lm_head"``) transformed by ``vocab``; the model is restored after."""
    model, spec = runner.model, runner.spec
    with vocab_restored(model, spec), torch.no_grad():
        if unit == "embed":
            table = effective_table(model, spec)
            if vocab.embed.bits:
                table = quantize_table(table, vocab.embed).dequantize()
            elif vocab.side_table(model, spec):
                table = table.half().float()
            return runner.score(runner.run_from(0, table[runner.ids].to(runner.first_hidden.dtype)))
        vocab.apply_head(model, spec)
        return runner.score(runner.final_hidden)

