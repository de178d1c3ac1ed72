"""Calibration on an accelerator, one block at a time.

``placed(model, spec, device)``: everything that is not a decoder block (embedding, rotary
tables, final norm, lm_head) moves to ``device`` for the duration; the blocks stay in host
memory and each moves to the device only while it runs (forward pre-hook: to the device;
forward hook: back). Peak device memory is then about one block, the vocabulary modules and
the cached activations, not the whole model. Every transform (folds, quantization, GPTQ's
codes) is written into the host copy between calls, so the code path is the one the CPU runs.
On the CPU (``device="cpu"``) nothing moves and no hook is added.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .arch import ArchSpec
from .blocks import blocks_of
from .errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """``--dtype`` name -> torch dtype; unknown names are an ``InputError``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def check_device(name: str) -> torch.device:
    """``--device`` -> a usable torch device, or an ``InputError`` saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: PyTorch sees no CUDA GPU here (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {name!r}: only cpu and cuda are supported")
    return device


PIN = "_qublast_pinned"


def pinned(module: torch.nn.Module) -> bool:
    """True while ``module`` stays on the device between calls (``kept_on``)."""
    return getattr(module, PIN, False)


@contextmanager
def kept_on(modules, device: str | torch.device):
    """Within the context the given blocks stay on ``device`` between calls (reconstruction trains them)."""
    for module in modules:
        setattr(module, PIN, True)
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            delattr(module, PIN)
            if torch.device(device).type != "cpu":
                module.to("cpu")


@contextmanager
def placed(model: torch.nn.Module, spec: ArchSpec, device: str | torch.device):
    """Within the context the model runs on ``device`` block by block (module docstring)."""
    device = torch.device(device)
    if device.type == "cpu":
        yield model
        return
    layers = blocks_of(model, spec)
    block_ids = {id(p) for layer in layers for p in layer.parameters()} | {id(b) for layer in layers for b in layer.buffers()}
    others = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in block_ids]
    home = {id(t): t.device for t in others}
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(lambda module, _args: module.to(device)))
        handles.append(layer.register_forward_hook(lambda module, _args, _out: None if pinned(module) else module.to("cpu")))
    for t in others:
        t.data = t.data.to(device)
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for t in others:
            t.data = t.data.to(home[id(t)])
        for layer in layers:
            layer.to("cpu")
