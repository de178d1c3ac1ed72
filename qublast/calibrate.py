"""Calibration: sensitivity sweep -> allocation -> measured repair -> recipe + scales.

The model is left exactly as it came in (fp weights); the decisions live in the recipe.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .allocate import Choice, Plan, repair, solve_for_loss, solve_for_size
from .apply import transforms_applied
from .arch import ArchSpec
from .blocks import BlockRunner, blocks_of, get_module
from .errors import InputError
from .evaluate import ce_shift, window_ce
from .formats import CANDIDATES, FORMATS
from .quant import CLIP_GRID
from .scaling import ALPHA_GRID, RANGE_METHODS
from .recipe import RECIPE_FORMAT, RECIPE_VERSION
from .sensitivity import sweep
from .sizes import block_bytes, is_tied, linear_entry, model_sizes

DEFAULT_MAX_PPL_INCREASE = 0.01
# One-sided ~97.7% bound on the held-out dCE: 16 windows of 512 tokens measure a mixed
# SmolLM2 model's dCE only to about +-0.005 nats, half the 1% budget.
Z_UPPER = 2.0
# What the knapsack sums per block. "kl" (KL to the fp logits) is never negative and repeats
# across window samples; "dce" is the quantity itself but, on the sweep's few windows, so noisy
# that the knapsack picks the blocks whose noise was favourable (docs/results.md).
ALLOC_LOSSES = ("kl", "dce")


@dataclass(frozen=True)
class CalibConfig:
    """Everything calibration decides with; validated when built. Exactly one mode is active."""

    max_ppl_increase: float | None = None
    target_size: float | None = None  # fraction of the block linears' fp16 bytes
    uniform: str | None = None
    formats: tuple[str, ...] | None = None  # one format per block, given by the user
    lm_head: str = "fp16"
    candidates: tuple[str, ...] = CANDIDATES
    seqlen: int = 512
    sens_windows: int = 8
    holdout_windows: int = 16
    seed: int = 0
    safety: float = 1.0  # repair until held-out dCE + Z_UPPER * stderr <= safety * ln(1 + P)
    scaling: bool = True  # the activation scaling map (--no-scaling turns it off)
    range_method: str = "mse"  # static activation ranges: absmax, percentile or mse
    alloc_loss: str = "kl"  # what allocation sums per block: kl or dce (ALLOC_LOSSES)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "qublast")

    def __post_init__(self):
        modes = [m for m in (self.max_ppl_increase, self.target_size, self.uniform, self.formats) if m is not None]
        if len(modes) > 1:
            raise InputError("give only one of --max-ppl-increase, --target-size, --uniform, --formats")
        if not modes:
            object.__setattr__(self, "max_ppl_increase", DEFAULT_MAX_PPL_INCREASE)
        if self.max_ppl_increase is not None and not self.max_ppl_increase > 0:
            raise InputError(f"--max-ppl-increase must be > 0, got {self.max_ppl_increase}")
        if self.target_size is not None and not 0 < self.target_size <= 1:
            raise InputError(f"--target-size must be a fraction in (0, 1], got {self.target_size}")
        if self.formats is not None and not self.formats:
            raise InputError("--formats needs one format per block")
        for name in (*self.candidates, self.lm_head, *([self.uniform] if self.uniform else []), *(self.formats or ())):
            if name not in FORMATS:
                raise InputError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
        if "fp16" not in self.candidates:
            raise InputError("the candidate formats must include fp16")
        if self.range_method not in RANGE_METHODS:
            raise InputError(f"unknown range method {self.range_method!r}; known: {', '.join(RANGE_METHODS)}")
        if self.alloc_loss not in ALLOC_LOSSES:
            raise InputError(f"unknown allocation loss {self.alloc_loss!r}; known: {', '.join(ALLOC_LOSSES)}")
        if self.holdout_windows < 2:
            raise InputError(f"--holdout-windows must be >= 2 (the repair bound needs a spread), got {self.holdout_windows}")
        if not 0 < self.safety <= 1:
            raise InputError(f"safety must be in (0, 1], got {self.safety}")

    @property
    def mode(self) -> str:
        if self.uniform:
            return "uniform"
        if self.formats is not None:
            return "formats"
        return "target_size" if self.target_size is not None else "max_ppl_increase"

    @property
    def mode_value(self):
        values = {"uniform": self.uniform, "formats": ",".join(self.formats or ()), "target_size": self.target_size,
                  "max_ppl_increase": self.max_ppl_increase}
        return values[self.mode]

    def fixed_formats(self, num_blocks: int) -> list[str] | None:
        """The formats the user fixed (``--uniform`` or ``--formats``), or None when allocation chooses."""
        if self.uniform:
            return [self.uniform] * num_blocks
        if self.formats is None:
            return None
        if len(self.formats) != num_blocks:
            raise InputError(f"--formats gives {len(self.formats)} formats for a model with {num_blocks} blocks")
        return list(self.formats)


def calibrate(model, spec: ArchSpec, *, model_info: dict, calib_ids: np.ndarray, calib_label: str, cfg: CalibConfig, log=print) -> tuple[dict, dict]:
    """Decide a transform per block; returns ``(recipe, tensors)``. The model keeps its fp weights."""
    from .text import calib_windows

    sens, holdout = calib_windows(calib_ids, cfg.seqlen, (cfg.sens_windows, cfg.holdout_windows), seed=cfg.seed)
    layers = blocks_of(model, spec)
    fixed = cfg.fixed_formats(len(layers))
    candidates = ("fp16", *sorted(set(fixed) - {"fp16"})) if fixed else cfg.candidates
    runner = BlockRunner(model, spec, torch.from_numpy(sens))
    fingerprint = _fingerprint(model_info, sens, cfg)
    journal = cfg.cache_dir / f"sensitivity-{fingerprint[:16]}.jsonl"
    log(f"sensitivity: {len(layers)} blocks x {len(candidates) - 1} formats on {sens.size} tokens, scaling map "
        f"{'on' if cfg.scaling else 'off'} (journal {journal})")
    table = sweep(runner, candidates, journal=journal, fingerprint=fingerprint, scaling=cfg.scaling, range_method=cfg.range_method)
    del runner
    allocation: dict = {}
    if fixed:
        formats = fixed
    else:
        options = [[Choice(f, block_bytes(layer, spec, f), getattr(row[f], cfg.alloc_loss)) for f in candidates]
                   for layer, row in zip(layers, table)]
        formats, allocation = _allocate(model, spec, table, options, holdout, cfg, log)
    transforms = [row[f].transform() for row, f in zip(table, formats)]
    with transforms_applied(model, spec, transforms, lm_head=cfg.lm_head) as qweights:
        allocation["heldout_ce_quant"] = float(window_ce(model, holdout).mean())
    recipe = _recipe(model, spec, formats, qweights, table, allocation, model_info=model_info, cfg=cfg, calib_label=calib_label)
    tensors = {f"{path}.scale": qw.scale for path, qw in qweights.items()}
    for index, t in enumerate(transforms):
        tensors.update({f"{spec.blocks}.{index}.{producer}.smooth": s for producer, s in t.smooth.items()})
    return recipe, tensors


def _allocate(model, spec, table, options, holdout, cfg: CalibConfig, log) -> tuple[list[str], dict]:
    fp_windows = window_ce(model, holdout)
    info: dict = {"heldout_ce_fp": float(fp_windows.mean())}
    if cfg.mode == "target_size":
        fp16_bytes = sum(next(c.bytes for c in block if c.format == "fp16") for block in options)
        budget = int(cfg.target_size * fp16_bytes)
        plan = solve_for_size(options, budget)
        info.update(budget_bytes=budget, predicted_loss=plan.loss)
        return list(plan.formats), info
    max_loss = math.log1p(cfg.max_ppl_increase)
    plan: Plan = solve_for_loss(options, cfg.safety * max_loss)
    info.update(max_dce=max_loss, repair_target_dce=cfg.safety * max_loss, z_upper=Z_UPPER, predicted_loss=plan.loss)
    shifts = {}

    def measure(formats: list[str]) -> float:
        """The upper bound on the held-out dCE that repair compares with the target."""
        transforms = [row[f].transform() for row, f in zip(table, formats)]
        with transforms_applied(model, spec, transforms, lm_head=cfg.lm_head):
            shift = ce_shift(window_ce(model, holdout), fp_windows)
        shifts[tuple(formats)] = shift
        return shift.upper(Z_UPPER)

    formats, history = repair(plan, options, max_loss=cfg.safety * max_loss, measure=measure, log=log)
    for step in history:
        shift = shifts[tuple(step["formats"])]
        step.update(dce=shift.mean, stderr=shift.stderr)
    info["repair"] = history
    return formats, info


def _recipe(model, spec, formats, qweights, table, allocation, *, model_info, cfg: CalibConfig, calib_label) -> dict:
    layers = blocks_of(model, spec)
    blocks = []
    for index, (layer, fmt) in enumerate(zip(layers, formats)):
        chosen = table[index][fmt]
        linears = []
        for name in spec.linears:
            path = f"{spec.blocks}.{index}.{name}"
            entry = linear_entry(get_module(layer, name), name=name, path=path, fmt_name=fmt)
            if path in qweights:
                entry["error"] = qweights[path].stats.as_dict()
            if chosen.act_scales and name in chosen.act_scales:
                entry["act_scale"] = chosen.act_scales[name]
                entry["act_range"] = chosen.act_scales[name] * 127
            linears.append(entry)
        blocks.append({
            "index": index,
            "format": fmt,
            "alpha": chosen.alpha,
            "map": chosen.scaled if cfg.scaling and fmt != "fp16" else None,
            "block_err": chosen.block_err,
            "block_err_unscaled": chosen.block_err_unscaled,
            "smooth": sorted(chosen.smooth or {}),
            "bytes": sum(e["bytes"] for e in linears),
            "bytes_fp16": block_bytes(layer, spec, "fp16"),
            "sensitivity": {f: {"dce": s.dce, "kl": s.kl, "alpha": s.alpha, "map": s.scaled, "dce_map_off": s.dce_unscaled}
                            for f, s in table[index].items()},
            "linears": linears,
        })
    head_entry = linear_entry(get_module(model, spec.lm_head), name=spec.lm_head, path=spec.lm_head, fmt_name=cfg.lm_head)
    if spec.lm_head in qweights:
        head_entry["error"] = qweights[spec.lm_head].stats.as_dict()
    return {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "model": model_info,
        "calibration": {
            "text": calib_label, "seqlen": cfg.seqlen, "sens_windows": cfg.sens_windows,
            "holdout_windows": cfg.holdout_windows, "seed": cfg.seed, "candidates": list(cfg.candidates),
            "clip_grid": list(CLIP_GRID), "safety": cfg.safety, "scaling": cfg.scaling,
            "alpha_grid": list(ALPHA_GRID), "range_method": cfg.range_method, "alloc_loss": cfg.alloc_loss,
        },
        "constraint": {"mode": cfg.mode, "value": cfg.mode_value},
        "lm_head": {"format": cfg.lm_head, "tied": is_tied(model, spec), "linears": [head_entry]},
        "blocks": blocks,
        "allocation": allocation,
        "metrics": model_sizes(model, spec, formats, lm_head=cfg.lm_head),
    }


def _fingerprint(model_info: dict, sens: np.ndarray, cfg: CalibConfig) -> str:
    digest = hashlib.sha256()
    digest.update(model_info["weight_sha256"].encode())
    digest.update(np.ascontiguousarray(sens).tobytes())
    digest.update(repr((CLIP_GRID, ALPHA_GRID, cfg.scaling, cfg.range_method)).encode())
    return digest.hexdigest()
