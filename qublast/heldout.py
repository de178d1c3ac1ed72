"""Held-out passes that start at the first block a plan changes.

Repair measures plan after plan on the same held-out windows, and a pass runs the whole model.
Under a tight bound most plans keep their first blocks and the embedding table fp16: up to its
first quantized block ``k`` such a plan computes what the fp model computes, whatever it does
after. ``PrefixPasses`` keeps, from passes it runs, the hidden state every batch hands to each
block ``1..k`` of the fp prefix (within a memory budget); a later pass whose fp prefix reaches a
kept block ``i`` starts there: blocks ``0..i-1`` return their input at no cost and block ``i``
receives the kept state. The model's own forward computes everything else (embedding, masks,
rotary tables, later blocks, norm, lm_head), so the cross-entropies are those of a full pass, bit
for bit. A prefix whose weights, buffers or hooks differ from the pass that kept it (checked by
digest) is not skipped. An activation-peak recorder open around a pass gets each skipped block's
peaks from a recorded pass where that block was in the fp prefix (the same computation), so its
record is a full pass's.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools

import numpy as np
import torch

from .arch import ArchSpec
from .blocks import blocks_of, get_module
from .evaluate import INPUT, SCORES, PeakRecorder, window_ce
from .models import feed_tensor

BUDGET_BYTES = 1 << 30  # kept hidden states, all blocks and batches together


class PrefixPasses:
    """``window_ce`` of the model as it is now on ``windows`` [N, S], given how many of its first
    blocks are the fp model's (see module docstring)."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, windows: np.ndarray, *, batch_size: int = 2,
                 budget: int = BUDGET_BYTES):
        self.model, self.spec, self.windows, self.batch_size, self.budget = model, spec, windows, batch_size, budget
        self.layers = blocks_of(model, spec)
        self.batches = len(range(0, len(windows), batch_size))
        # block i -> (digest of the embedding and blocks 0..i-1 when kept, its input per batch [B, S, H])
        self.states: dict[int, tuple[bytes, list[torch.Tensor]]] = {}
        self.recording: bool | None = None  # whether the kept states come from passes under a peak recorder
        # block i -> (the key of block i + 1's state, the recorder's peaks of block i's modules) from
        # a recorded pass where block i was in the fp prefix
        self.block_peaks: dict[int, tuple[bytes, dict[str, float]]] = {}
        self.returns: int | None = None  # a block returns a tensor (0) or a tuple of this length; None: not seen yet
        self.skipped_blocks = 0  # block forwards not run, over all passes

    def window_ce(self, fp_prefix: int, recorder: PeakRecorder | None = None) -> np.ndarray:
        """Mean cross-entropy of each window [N] (``evaluate.window_ce``); ``fp_prefix``: how many
        first blocks are the fp model's, with the fp embedding (0 when the table is quantized);
        ``recorder``: the peak recorder open around this pass, if any."""
        fp_prefix = max(0, min(fp_prefix, len(self.layers) - 1))
        if self.recording is not None and self.recording != (recorder is not None):
            self.states.clear()  # the recorder attends with another kernel: other numbers
        keys = self._keys(fp_prefix)
        stale = [i for i, (key, _) in self.states.items() if i <= fp_prefix and key != keys[i]]
        for i in stale:  # their prefix is not the model's now
            del self.states[i]
        start = max((i for i in self.states if i <= fp_prefix and self._peaks_known(i, keys, recorder)), default=0)
        start = start if self.returns is not None else 0
        keep = self._to_keep(start, fp_prefix)
        with self._skipping(start), self._keeping(keep, keys), self._returns_seen(start):
            out = window_ce(self.model, self.windows, batch_size=self.batch_size)
        if recorder is not None:
            self._fix_peaks(recorder, start, fp_prefix, keys)
        self.recording = recorder is not None
        self.skipped_blocks += start * self.batches
        return out

    def _keys(self, fp_prefix: int) -> list[bytes]:
        """``keys[i]``: digest of the embedding module and blocks ``0..i-1`` (parameters, buffers,
        norm epsilons, hook counts: what decides block i's input besides the tokens), i <= fp_prefix."""
        h = hashlib.blake2b(digest_size=16)
        keys = []
        for module in [get_module(self.model, self.spec.embed), *list(self.layers)[:fp_prefix]]:
            _update(h, module)
            keys.append(h.copy().digest())
        return keys

    def _to_keep(self, start: int, fp_prefix: int) -> list[int]:
        """Blocks of the fp prefix after ``start`` whose input this pass keeps: the highest first, as
        many as the budget holds beside the states kept already."""
        n, s = self.windows.shape
        width = get_module(self.model, self.spec.embed).weight.shape[-1]
        room = self.budget // (n * s * width * 4) - len(self.states)  # fp32 [N, S, H] each
        wanted = [i for i in range(fp_prefix, start, -1) if i not in self.states]
        return sorted(wanted[: max(room, 0)])

    @contextlib.contextmanager
    def _returns_seen(self, start: int):
        """Note what block 0 returns (a passthrough must return the same structure)."""
        if start or self.returns is not None:
            yield
            return

        def hook(_module, _args, output):
            self.returns = len(output) if isinstance(output, tuple) else 0

        handle = self.layers[0].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _keeping(self, blocks: list[int], keys: list[bytes]):
        """Keep each batch's input to ``blocks`` (clones) while the pass runs, under ``keys``."""
        kept: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}

        def hook(index):
            def pre_hook(_module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                kept[index].append(hidden.detach().clone())

            return pre_hook

        handles = [self.layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.states.update({i: (keys[i], v) for i, v in kept.items() if len(v) == self.batches})

    @contextlib.contextmanager
    def _skipping(self, start: int):
        """Blocks ``0..start-1`` return their input; block ``start`` receives the kept state of each
        batch in turn (its hook runs before any other, so a recorder sees the kept state)."""
        if not start:
            yield
            return
        states, batch, returns = self.states[start][1], [0], self.returns

        def passthrough(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *[None] * (returns - 1)) if returns else hidden

        def pre_hook(_module, args, kwargs):
            hidden = states[batch[0]]
            batch[0] += 1
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        skipped = list(self.layers)[:start]
        for layer in skipped:
            layer.forward = passthrough  # an instance attribute: __call__ still runs the module's hooks
        handle = self.layers[start].register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()
            for layer in skipped:
                del layer.forward

    def _peaks_known(self, start: int, keys: list[bytes], recorder: PeakRecorder | None) -> bool:
        """Whether a pass may skip blocks ``0..start-1``: without a recorder always; with one, when
        each of them has peaks from a recorded pass with the same prefix."""
        return recorder is None or all(i in self.block_peaks and self.block_peaks[i][0] == keys[i + 1] for i in range(start))

    def _fix_peaks(self, recorder: PeakRecorder, start: int, fp_prefix: int, keys: list[bytes]) -> None:
        """The skipped blocks' modules get the peaks of the pass that ran them (a passthrough's own
        output is its input: not what the block computes); the fp prefix's peaks are kept for later
        passes."""
        by_block: dict[int, dict[str, float]] = {}
        for name, value in recorder.peaks.items():
            index = self._block_of(name)
            if index is not None and index < fp_prefix:
                by_block.setdefault(index, {})[name] = value
        for i in range(start):
            for name in by_block.pop(i, {}):
                del recorder.peaks[name]
            recorder.peaks.update(self.block_peaks[i][1])
        self.block_peaks.update({i: (keys[i + 1], peaks) for i, peaks in by_block.items()})

    def _block_of(self, name: str) -> int | None:
        """The block a recorded module path (with its recorder suffix) lies in, else None."""
        head = f"{self.spec.blocks}."
        path = name.removesuffix(INPUT).removesuffix(SCORES)
        if not path.startswith(head):
            return None
        index = path[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None


def _update(h, module: torch.nn.Module) -> None:
    """Feed ``module``'s parameters, buffers, norm epsilons and hook counts to the digest ``h``."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        feed_tensor(h, name, tensor)
    for sub in module.modules():
        eps = getattr(sub, "variance_epsilon", getattr(sub, "eps", None))
        h.update(f"{type(sub).__name__}:{eps}:{len(sub._forward_hooks)}:{len(sub._forward_pre_hooks)}".encode())
