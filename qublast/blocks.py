"""Running a causal LM one block at a time on a fixed batch of token windows.

``BlockRunner`` runs the model once, keeping block 0's input hidden state and the keyword
arguments every block received (masks, rotary embeddings: whatever the architecture passes).
It can then run blocks ``i..L`` from any hidden state and score the logits against the fp
model's: the sensitivity sweep's inner loop, with memory for one hidden state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arch import ArchSpec

REF_CACHE_BYTES = 1 << 30  # BlockRunner keeps the fp log-probabilities up to this size


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Sub-module at a dotted path."""
    return model.get_submodule(path)


def blocks_of(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    """The decoder layers."""
    return get_module(model, spec.blocks)


def multiplier(model: torch.nn.Module, attribute: str | None) -> float:
    """A config scalar the model applies outside its modules (Falcon-H1's muP multipliers), else 1."""
    return float(getattr(model.config, attribute)) if attribute else 1.0


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device."""
    return model.get_input_embeddings().weight.device


def foldable(module: torch.nn.Module) -> bool:
    """True when a scaling map producer can take a fold (it has a weight; an Identity has none)."""
    return getattr(module, "weight", None) is not None


@dataclass(frozen=True)
class Score:
    """Mean cross-entropy of next-token prediction and mean KL(fp || this) per token."""

    ce: float
    kl: float


class BlockRunner:
    """Block-by-block execution on token windows ``ids`` [N, S] (see module docstring)."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, ids: torch.Tensor, *, chunk: int = 2,
                 outputs: tuple[int, ...] = (), scored: bool = True):
        """``outputs``: blocks whose fp output on the windows to keep (``self.outputs``, from the
        same forward pass); ``scored=False`` skips the fp log-probabilities and score (``fp_score``
        is None), for callers that only run blocks."""
        self.model, self.spec, self.ids, self.chunk = model, spec, ids.to(model_device(model)), chunk
        self.layers = blocks_of(model, spec)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        last = len(self.layers) - 1
        self.first_hidden, self.layer_kwargs, kept = self._capture({*outputs, last})
        self.final_hidden = kept[last]  # [N, S, H], the fp model's
        self.outputs = {i: kept[i] for i in outputs}
        self.ref_logprobs, self.fp_score = None, None
        if not scored:
            return
        head = get_module(model, spec.lm_head)
        vocab = head.out_features
        # the fp head's tensors (not copies): scoring a quantized lm_head gives the module other
        # tensors and input hooks, and KL's reference must still be the fp model's logits
        self._fp_head = (head.weight, head.bias)
        # the fp log-probabilities KL compares with: kept when small, else recomputed per score
        # (8 windows of 512 over a 152k vocabulary would hold 5 GB)
        self.ref_logprobs = ([torch.log_softmax(logits, dim=-1) for logits in self.logit_chunks(self.final_hidden)]
                             if ids.numel() * vocab * 4 <= REF_CACHE_BYTES else None)
        self.fp_score = self.score(self.final_hidden)

    @torch.no_grad()
    def _capture(self, outputs: set[int]) -> tuple[torch.Tensor, list[dict], dict[int, torch.Tensor]]:
        """One forward pass of the model through its last block: block 0's input, every block's
        keyword arguments, and the output of the blocks in ``outputs`` (the calls ``run_block``
        makes, so the same values as running them block by block)."""
        captured: list[dict] = [None] * len(self.layers)  # type: ignore[list-item]
        first: list[torch.Tensor] = []
        kept: dict[int, torch.Tensor] = {}
        last = len(self.layers) - 1

        def pre(index):
            def pre_hook(_module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if index == 0:
                    first.append(hidden.detach())
                captured[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

            return pre_hook

        def post(index):
            def hook(_module, _args, output):
                kept[index] = (output[0] if isinstance(output, tuple) else output).detach()
                if index == last:  # the final norm and lm_head are not needed
                    raise _StopForward

            return hook

        handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        handles += [self.layers[i].register_forward_hook(post(i)) for i in sorted(outputs)]
        try:
            self.model(input_ids=self.ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return first[0], captured, kept

    @torch.no_grad()
    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Output hidden state of block ``index`` for ``hidden`` [n, S, H], n <= N (the first windows)."""
        return self.block_forward(index, hidden)

    def block_forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``run_block`` where autograd may record (reconstruction)."""
        kwargs = self.layer_kwargs[index]
        if hidden.shape[0] != self.ids.shape[0]:
            kwargs = {k: _first_rows(v, hidden.shape[0], self.ids.shape[0]) for k, v in kwargs.items()}
        out = self.layers[index](hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_block_chunked(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``run_block`` for any number of windows [M, S, H], in chunks of at most N (the captured kwargs' batch)."""
        size = self.ids.shape[0]
        return torch.cat([self.run_block(index, hidden[start : start + size]) for start in range(0, hidden.shape[0], size)])

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Block 0's input for other windows ``ids`` [M, S] of the same length: the embedding module's output."""
        if ids.shape[1] != self.ids.shape[1]:
            raise ValueError(f"windows of {ids.shape[1]} tokens, the runner's are {self.ids.shape[1]}")
        scale = multiplier(self.model, self.spec.embed_multiplier)
        return get_module(self.model, self.spec.embed)(ids.to(self.ids.device)).detach() * scale

    @torch.no_grad()
    def run_from(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden state after blocks ``index..L-1``: [N, S, H]."""
        for i in range(index, len(self.layers)):
            hidden = self.run_block(i, hidden)
        return hidden

    @torch.no_grad()
    def logit_chunks(self, hidden: torch.Tensor, *, fp_head: bool = False):
        """Logits [chunk, S, V] for successive window chunks (bounded memory); ``fp_head``: through
        the fp model's lm_head whatever the module holds now (KL's reference)."""
        norm = get_module(self.model, self.spec.final_norm)
        head = get_module(self.model, self.spec.lm_head)
        if fp_head:
            weight, bias = self._fp_head
            head = lambda x: F.linear(x, weight, bias)  # noqa: E731 - no module hooks: the fp head computes in float
        for start in range(0, hidden.shape[0], self.chunk):
            logits = head(norm(hidden[start : start + self.chunk])).float() * multiplier(self.model, self.spec.logits_multiplier)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            yield logits

    @torch.no_grad()
    def score(self, hidden: torch.Tensor) -> Score:
        """CE and KL to the fp model for a final hidden state."""
        ce_sum = kl_sum = 0.0
        count = 0
        for k, logits in enumerate(self.logit_chunks(hidden)):
            start = k * self.chunk
            targets = self.ids[start : start + logits.shape[0], 1:]  # [c, S-1]
            logprobs = torch.log_softmax(logits, dim=-1)
            ce_sum += F.nll_loss(logprobs[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
            ref = self.ref_logprobs[k] if self.ref_logprobs is not None else torch.log_softmax(
                next(self.logit_chunks(self.final_hidden[start : start + self.chunk], fp_head=True)), dim=-1)
            kl_sum += (ref.exp() * (ref - logprobs)).sum().item()
            count += targets.numel()
        n_positions = self.ids.numel()
        return Score(ce=ce_sum / count, kl=kl_sum / n_positions)


def _first_rows(value, n: int, batch: int):
    """``value`` cut to its first ``n`` batch rows where it has a batch dimension of ``batch``."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[:n]
    if isinstance(value, tuple):
        return tuple(_first_rows(v, n, batch) for v in value)
    return value


class _StopForward(Exception):
    """Raised by the capture hook once the last block's output is known."""
