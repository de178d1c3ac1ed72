"""Perplexity of a PyTorch model on token windows: PPL = exp(mean NLL over predicted tokens)."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime.perplexity import paired_shift

from .attention import observing
from .blocks import model_device

CE_CHUNK_BYTES = 16 << 20  # logits bytes per cross-entropy call (a few rows): under glibc's 32 MiB mmap threshold


@dataclass(frozen=True)
class PplResult:
    """Perplexity with the totals it came from."""

    ppl: float
    nll_sum: float
    tokens: int  # predicted tokens: windows * (seqlen - 1)


def perplexity(model: torch.nn.Module, windows: np.ndarray, *, batch_size: int = 2, desc: str = "ppl torch") -> PplResult:
    """Each window [seqlen] is scored on its own: tokens 1..S-1 predicted from their prefix."""
    per_window = window_ce(model, windows, batch_size=batch_size, desc=desc)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll_sum = float(per_window.sum() * (windows.shape[1] - 1))
    return PplResult(math.exp(nll_sum / tokens), nll_sum, tokens)


@torch.no_grad()
def token_ce(model: torch.nn.Module, windows: np.ndarray, *, batch_size: int = 2, desc: str = "held-out CE") -> np.ndarray:
    """Next-token cross-entropy in nats of every predicted token: float32 [N, seqlen - 1]."""
    out, device = [], model_device(model)
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", file=sys.stderr):
        ids = torch.from_numpy(windows[start : start + batch_size]).long().to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # [B, S, V]
        out.append(_next_token_ce(logits, ids).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, max(windows.shape[1] - 1, 0)), dtype=np.float32)


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [B, S - 1] of ``logits`` [B, S, V] at predicting ``ids`` [B, S] one step on,
    a few rows at a time: the same per-row values as one call over all rows, without the two
    full-vocabulary copies (flattened logits, log-softmax) one call allocates, each mapped and
    faulted in anew (3 x 201 MB a batch of two SmolLM2 windows). The class dim stays last and
    contiguous: log-softmax over a strided class dim sums 49k exps in a less accurate order and
    biased SmolLM2's PPL by -0.013%."""
    seq = ids.shape[1]
    rows = max(1, CE_CHUNK_BYTES // (logits.shape[-1] * logits.element_size()))
    nll = torch.empty(len(ids), seq - 1, device=logits.device)
    for b in range(len(ids)):
        for i in range(0, seq - 1, rows):
            j = min(i + rows, seq - 1)
            nll[b, i:j] = F.cross_entropy(logits[b, i:j], ids[b, i + 1 : j + 1], reduction="none")
    return nll


def window_ce(model: torch.nn.Module, windows: np.ndarray, *, batch_size: int = 2, desc: str = "held-out CE") -> np.ndarray:
    """Mean next-token cross-entropy in nats of each window: float64 [N]."""
    return token_ce(model, windows, batch_size=batch_size, desc=desc).astype(np.float64).mean(axis=1)


@dataclass(frozen=True)
class Shift:
    """Paired change in cross-entropy over the same windows: mean and its standard error."""

    mean: float
    stderr: float

    def upper(self, z: float) -> float:
        """One-sided upper confidence bound ``mean + z * stderr``."""
        return self.mean + z * self.stderr


def ce_shift(after: np.ndarray, before: np.ndarray) -> Shift:
    """dCE of paired per-window cross-entropies; the stderr is over windows (tokens inside one correlate)."""
    return Shift(*paired_shift(after, before))


FP16_MAX = 65504.0
FP16_HEADROOM = 2.0  # an fp16 graph is refused when a calibration peak exceeds FP16_MAX / FP16_HEADROOM
INPUT = " (input)"  # PeakRecorder's suffix for a module's input
SCORES = " (q.k^T)"  # PeakRecorder's suffix for an attention module's scores


class PeakRecorder:
    """Largest |output| of every sub-module while the context is open (forward hooks).

    ``peaks`` maps module path -> max |x| over everything the model computed: what an fp16 graph
    must hold without overflowing: module outputs (linears, norms, activations, whole blocks, i.e.
    the residual stream) and, as ``"PATH (input)"``, module inputs (the residual inside a block
    where a norm reads it, the gated product act(gate) * up where ``down_proj`` reads it) and, as
    ``"PATH (q.k^T)"``, every attention module's scores as the export's attention stores them
    (``qublast.attention``: the model attends with it while the context is open). RMSNorm's sum of
    squares and the softmax are fp32 in the graph (``export.legality.FP32_OPS``): not recorded.
    """

    def __init__(self, model: torch.nn.Module):
        self.model, self.peaks, self._handles = model, {}, []
        self._attention = None

    def __enter__(self) -> PeakRecorder:
        names = {}
        for name, module in self.model.named_modules():
            if name:
                names[id(module)] = name
                self._handles.append(module.register_forward_hook(self._hook(name)))
                self._handles.append(module.register_forward_pre_hook(self._input_hook(f"{name}{INPUT}")))
        if getattr(self.model.config, "_attn_implementation", None) is not None and _attends(self.model):
            def scores(module, tensor):
                self._record(f"{names[id(module)]}{SCORES}", tensor)

            self._attention = observing(self.model, scores)
            self._attention.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._attention is not None:
            self._attention.__exit__(None, None, None)
            self._attention = None

    def _record(self, name: str, tensor: torch.Tensor) -> None:
        low, high = torch.aminmax(tensor.detach())  # max |x| without a copy of |x|
        self.peaks[name] = max(self.peaks.get(name, 0.0), -float(low), float(high))

    def _hook(self, name: str):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                self._record(name, out)

        return hook

    def _input_hook(self, name: str):
        def pre_hook(_module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and args[0].numel():
                self._record(name, args[0])

        return pre_hook

    def summary(self, *, top: int = 5) -> dict:
        """``{"max", "where", "top": [[path, peak], ...]}`` for the recipe."""
        ranked = sorted(self.peaks.items(), key=lambda kv: -kv[1])
        return {"max": ranked[0][1] if ranked else 0.0, "where": ranked[0][0] if ranked else None,
                "top": [[k, v] for k, v in ranked[:top]]}


def _attends(model: torch.nn.Module) -> bool:
    """True when the model has attention modules (transformers' take ``config`` and a ``scaling``)."""
    return any(hasattr(m, "scaling") and hasattr(m, "config") for m in model.modules())


def fp16_overflow(peaks: dict) -> str | None:
    """A one-line reason when recorded peaks leave less than FP16_HEADROOM x below fp16's largest value."""
    if peaks and peaks["max"] > FP16_MAX / FP16_HEADROOM:
        return (f"{peaks['where']} reaches {peaks['max']:.4g} on calibration text, within {FP16_HEADROOM:g}x of fp16's "
                f"largest value {FP16_MAX:g}: an fp16 graph would overflow")
    return None
