"""Calibration: sensitivity sweep -> allocation -> measured repair -> recipe + scales.

Allocation units are the blocks plus one vocabulary unit (embedding table and lm_head,
options are their format pairs, priced together because a tied table stored once in the
graph costs less than two copies). Formats and bytes are the target's (``--target``).
The model is left exactly as it came in (fp weights); the decisions live in the recipe.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.targets import EMBED_FORMATS

from . import rescale
from .allocate import Choice, Plan, repair, solve_for_loss, solve_for_size, spend
from .apply import transforms_applied
from .arch import ArchSpec
from .blocks import BlockRunner, blocks_of
from .device import check_device, torch_dtype
from .entries import block_entries, target_entry, vocab_entries
from .errors import BudgetError, InputError
from .evaluate import PeakRecorder, ce_shift, fp16_overflow, window_ce
from .formats import fits, get_format, get_target, linear_format
from .heldout import PrefixPasses
from .quant import CLIP_GRID
from .recipe import RECIPE_FORMAT, RECIPE_VERSION
from .reconstruct import RETUNES, ROUNDINGS, WindowCache, reconstruct, tune_end_to_end
from .scaling import ALPHA_GRID, RANGE_METHODS
from .sensitivity import ESTIMATES, sweep
from .sizes import block_bytes, fp16_bytes, predicted_sizes, rest_bytes, vocab_bytes
from .text import calib_windows
from .vocab import VocabTransform, head_importance

DEFAULT_MAX_PPL_INCREASE = 0.01
# One-sided ~97.7% bound on the held-out dCE: 16 windows of 512 tokens measure a mixed
# SmolLM2 model's dCE only to about +-0.005 nats, half the 1% budget.
Z_UPPER = 2.0
# What the knapsack sums per block. "kl" (KL to the fp logits) is never negative and repeats
# across window samples; "dce" is the quantity itself but, on the sweep's few windows, so noisy
# that the knapsack picks the blocks whose noise was favourable (docs/results.md).
ALLOC_LOSSES = ("kl", "dce")
QUANTIZERS = ("rtn", "gptq")
AUTO = "auto"  # --embeddings / --lm-head: the knapsack chooses


@dataclass(frozen=True)
class CalibConfig:
    """Everything calibration decides with; validated when built. Exactly one mode is active."""

    target: str = "jetson"
    max_ppl_increase: float | None = None
    target_size: float | None = None  # the whole deployed model as a fraction of its fp16 bytes
    blocks_size: float | None = None  # the block linears alone as a fraction of their fp16 bytes
    uniform: str | None = None
    formats: tuple[str, ...] | None = None  # one format per block, given by the user
    lm_head: str = AUTO
    embeddings: str = AUTO
    candidates: tuple[str, ...] | None = None  # None: the target's default candidates
    calib_seqlen: int = 512  # calibration window length (the export's --seqlen is the evaluation's)
    sens_windows: int = 8
    holdout_windows: int = 16
    seed: int = 0
    # repair until held-out dCE + Z_UPPER * stderr <= safety * ln(1 + P); below 1 for the shift
    # between calibration text and the user's (docs/results.md, "Held-out bound and text shift";
    # 0.85 since the shift measured on the whole test split put a 0.9 bundle over its bound)
    safety: float = 0.85
    scaling: bool = True  # the activation scaling map (--no-scaling turns it off)
    range_method: str = "mse"  # static activation ranges: absmax, percentile or mse
    alloc_loss: str = "kl"  # what allocation sums per block: kl or dce (ALLOC_LOSSES)
    quantizers: tuple[str, ...] = ("rtn", "gptq")  # measured per (block, format); the lower block error is kept
    act_order: bool = True  # GPTQ visits columns by decreasing input power (static groups)
    gptq_windows: int = 32  # GPTQ's own calibration windows (its Hessians)
    reconstruct: int = 2  # cross-block reconstruction: blocks per window (0: off)
    reconstruct_steps: int = 40
    reconstruct_windows: int | None = None  # token windows reconstruction tunes on: the sweep's, then its own (None: the sweep's)
    rounding: str = "fixed"  # what reconstruction tunes: the scales (fixed codes) or also each code's rounding (learned)
    # windows of its own (drawn past every other set) on which every reconstructed plan's scales are then tuned
    # end to end against the fp model's logits (0: off); ``e2e_epochs`` passes over them, one window a step
    e2e_windows: int = 0
    e2e_epochs: int = 2
    retune: str = "changed"  # which windows a later plan tunes again: only those it changed, or all after its first changed block
    device: str = "cpu"  # where calibration computes; blocks move there one at a time (qublast.device)
    dtype: str = "float32"  # the model's dtype during calibration (float16 / bfloat16 round the fake-quantized weights)
    # measurements the two-sided repair may spend moving to smaller plans, before reconstruction and again
    # after it (0: up only); after it each one is a reconstruction (minutes on a 0.5B model), and the
    # third and fourth tries bought at most 1.2 points of size (docs/results.md)
    spend_tries: int = 2
    sweep: str = "fisher"  # a block's end-to-end loss: fisher (one backward pass, linear in depth) or full (run to the logits)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "qublast")

    def __post_init__(self):
        modes = [m for m in (self.max_ppl_increase, self.target_size, self.blocks_size, self.uniform, self.formats) if m is not None]
        if len(modes) > 1:
            raise InputError("give only one of --max-ppl-increase, --target-size, --blocks-size, --uniform, --formats")
        if not modes:
            object.__setattr__(self, "max_ppl_increase", DEFAULT_MAX_PPL_INCREASE)
        target = get_target(self.target)
        if self.candidates is None:
            object.__setattr__(self, "candidates", target.candidates)
        if self.max_ppl_increase is not None and not 0 < self.max_ppl_increase < math.inf:
            raise InputError(f"--max-ppl-increase must be a finite number > 0, got {self.max_ppl_increase}")
        for flag, value in (("--target-size", self.target_size), ("--blocks-size", self.blocks_size)):
            if value is not None and not 0 < value <= 1:
                raise InputError(f"{flag} must be a fraction in (0, 1], got {value}")
        if self.formats is not None and not self.formats:
            raise InputError("--formats needs one format per block")
        for name in (*self.candidates, *([self.uniform] if self.uniform else []), *(self.formats or ())):
            get_format(name, target)
        if "fp16" not in self.candidates:
            raise InputError("the candidate formats must include fp16")
        if self.lm_head != AUTO and self.lm_head not in target.head_formats:
            raise InputError(f"--lm-head {self.lm_head!r}: lm_head takes {', '.join(target.head_formats)} on target {target.name!r}")
        if self.embeddings != AUTO and self.embeddings not in EMBED_FORMATS:
            raise InputError(f"--embeddings {self.embeddings!r}: the table takes {', '.join(EMBED_FORMATS)}")
        if self.range_method not in RANGE_METHODS:
            raise InputError(f"unknown range method {self.range_method!r}; known: {', '.join(RANGE_METHODS)}")
        if not self.quantizers or set(self.quantizers) - set(QUANTIZERS):
            raise InputError(f"--quantizers {','.join(self.quantizers)}: choose from {', '.join(QUANTIZERS)}")
        if self.alloc_loss not in ALLOC_LOSSES:
            raise InputError(f"unknown allocation loss {self.alloc_loss!r}; known: {', '.join(ALLOC_LOSSES)}")
        if self.gptq_windows < 1:
            raise InputError(f"--gptq-windows must be >= 1, got {self.gptq_windows}")
        if self.reconstruct < 0 or self.reconstruct_steps < 1:
            raise InputError(f"--reconstruct must be >= 0 and --reconstruct-steps >= 1, got {self.reconstruct}, {self.reconstruct_steps}")
        if self.reconstruct_windows is not None and self.reconstruct_windows < 1:
            raise InputError(f"--reconstruct-windows must be >= 1, got {self.reconstruct_windows}")
        if self.e2e_windows < 0 or self.e2e_epochs < 1:
            raise InputError(f"--e2e-windows must be >= 0 and --e2e-epochs >= 1, got {self.e2e_windows}, {self.e2e_epochs}")
        if self.e2e_windows and not self.reconstruct:
            raise InputError("--e2e-windows tunes reconstructed plans: it needs --reconstruct > 0")
        if self.rounding not in ROUNDINGS:
            raise InputError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.retune not in RETUNES:
            raise InputError(f"--retune must be one of {', '.join(RETUNES)}, got {self.retune!r}")
        check_device(self.device)
        torch_dtype(self.dtype)
        if self.spend_tries < 0:
            raise InputError(f"--spend-tries must be >= 0, got {self.spend_tries}")
        if self.calib_seqlen < 2:
            raise InputError(f"--calib-seqlen must be >= 2, got {self.calib_seqlen}")
        if self.sens_windows < 1:
            raise InputError(f"--calib-windows must be >= 1, got {self.sens_windows}")
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}")
        if self.sweep not in ESTIMATES:
            raise InputError(f"--sweep must be one of {', '.join(ESTIMATES)}, got {self.sweep!r}")
        if self.holdout_windows < 2:
            raise InputError(f"--holdout-windows must be >= 2 (the repair bound needs a spread), got {self.holdout_windows}")
        if not 0 < self.safety <= 1:
            raise InputError(f"--safety must be in (0, 1], got {self.safety}")

    @property
    def mode(self) -> str:
        if self.uniform:
            return "uniform"
        if self.formats is not None:
            return "formats"
        if self.target_size is not None:
            return "target_size"
        return "blocks_size" if self.blocks_size is not None else "max_ppl_increase"

    @property
    def mode_value(self):
        values = {"uniform": self.uniform, "formats": ",".join(self.formats or ()), "target_size": self.target_size,
                  "blocks_size": self.blocks_size, "max_ppl_increase": self.max_ppl_increase}
        return values[self.mode]

    @property
    def tune_windows(self) -> int:
        """Windows reconstruction tunes on: the sweep's, then ``own_tune_windows`` drawn for it."""
        return self.reconstruct_windows or self.sens_windows

    @property
    def own_tune_windows(self) -> int:
        """Windows drawn for reconstruction alone, past the sweep's (never held-out or GPTQ's ones:
        GPTQ's codes are fitted to its windows, where tuning would see less of the test text's error)."""
        return max(0, self.tune_windows - self.sens_windows) if self.reconstruct else 0

    def fixed_formats(self, num_blocks: int) -> list[str] | None:
        """The formats the user fixed (``--uniform`` or ``--formats``), or None when allocation chooses."""
        if self.uniform:
            return [self.uniform] * num_blocks
        if self.formats is None:
            return None
        if len(self.formats) != num_blocks:
            raise InputError(f"--formats gives {len(self.formats)} formats for a model with {num_blocks} blocks")
        return list(self.formats)

    def vocab_choices(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(embedding formats, lm_head formats) allocation may pick from: all, or the pinned one.
        Modes without a budget to spend (uniform, formats, blocks_size) keep unpinned ones at fp16."""
        target = get_target(self.target)
        free = self.mode in ("max_ppl_increase", "target_size")
        embed = (self.embeddings,) if self.embeddings != AUTO else (tuple(EMBED_FORMATS) if free else ("fp16",))
        head = (self.lm_head,) if self.lm_head != AUTO else (target.head_formats if free else ("fp16",))
        return embed, head


DEFAULTS = CalibConfig()  # every calibration default, as the CLI shows it (qublast.export reads them here)

def vocab_option(embed: str, head: str) -> str:
    """Name of the vocabulary unit's option in a plan: ``"<embedding>/<lm_head>"``."""
    return f"{embed}/{head}"


def split_plan(formats) -> tuple[list[str], str, str]:
    """Plan formats (blocks..., vocab option) -> (block formats, embedding format, lm_head format)."""
    *blocks, vocab = formats
    embed, head = vocab.split("/")
    return list(blocks), embed, head


def calibrate(model, spec: ArchSpec, *, model_info: dict, calib_ids: np.ndarray, calib_label: str, cfg: CalibConfig, log=print) -> tuple[dict, dict]:
    """Decide a transform per block and the vocabulary formats; returns ``(recipe, tensors)``.
    The model keeps its fp weights."""
    target = get_target(cfg.target)
    gptq = "gptq" in cfg.quantizers
    more = cfg.own_tune_windows
    sens, holdout, *rest = calib_windows(calib_ids, cfg.calib_seqlen, (cfg.sens_windows, cfg.holdout_windows)
                                         + ((cfg.gptq_windows,) if gptq else ()) + ((more,) if more else ())
                                         + ((cfg.e2e_windows,) if cfg.e2e_windows else ()), seed=cfg.seed)
    e2e_ids = rest.pop() if cfg.e2e_windows else None
    fit = rest[:1] if gptq else []
    tune_ids = np.concatenate([sens, *rest[len(fit):]])[: cfg.tune_windows]
    layers = blocks_of(model, spec)
    fixed = cfg.fixed_formats(len(layers))
    candidates = ("fp16", *sorted(set(fixed) - {"fp16"})) if fixed else cfg.candidates
    _check_fits(layers, spec, target, candidates, fixed)
    embed_choices, head_choices = cfg.vocab_choices()
    if cfg.mode in ("target_size", "blocks_size") and not fixed:  # an unreachable budget costs no sweep
        _size_budget(model, spec, target, _byte_options(model, spec, target, candidates, embed_choices, head_choices), cfg)
    runner = _runner(model, spec, sens, target, model_info, log)
    fingerprint = _fingerprint(model_info, sens, cfg)
    journal = cfg.cache_dir / f"sensitivity-{fingerprint[:16]}.jsonl"
    log(f"sensitivity on target {target.name}: {len(layers)} blocks x {len(candidates) - 1} formats, embedding "
        f"{'/'.join(embed_choices)}, lm_head {'/'.join(head_choices)} on {sens.size} tokens, scaling map "
        f"{'on' if cfg.scaling else 'off'} (journal {journal})")
    started = time.perf_counter()
    table, vocab_table = sweep(runner, target, candidates, journal=journal, fingerprint=fingerprint, scaling=cfg.scaling,
                               range_method=cfg.range_method, vocab={"embed": embed_choices, "lm_head": head_choices},
                               quantizers=cfg.quantizers, act_order=cfg.act_order,
                               fit=runner.embed(torch.from_numpy(fit[0])) if gptq else None, estimate=cfg.sweep, progress=log)
    costs = {"sweep_s": time.perf_counter() - started, "sweep_runs": len(candidates) - 1, "blocks": len(layers)}
    importance = head_importance(runner)
    del runner
    options = _options(model, spec, target, table, vocab_table, candidates, embed_choices, head_choices, cfg.alloc_loss)
    builder = _Builder(model, spec, target, table, vocab_table, importance, tune_ids, cfg, log, e2e_ids=e2e_ids)
    allocation: dict = {}
    if fixed:
        formats = [*fixed, vocab_option(embed_choices[0], head_choices[0])]
    else:
        started = time.perf_counter()
        formats, allocation = _allocate(model, spec, options, holdout, cfg, builder, log)
        costs["allocation_s"] = time.perf_counter() - started - builder.seconds
    block_formats, embed, head = split_plan(formats)
    transforms, vocab, records = builder.build(formats, reconstructed=allocation.get("reconstructed", True))
    if records:
        allocation["reconstruction"] = records
    e2e = builder.e2e_record(formats, allocation.get("reconstructed", True))
    if e2e:
        allocation["end_to_end"] = e2e
    if builder.count:
        costs.update(reconstruction_s=builder.seconds, reconstructions=builder.count)
    if builder.e2e_seconds:
        costs["e2e_s"] = builder.e2e_seconds
    peaks = allocation.pop("peaks", None)
    with transforms_applied(model, spec, transforms, vocab) as qweights:
        if "heldout_ce_quant" not in allocation:  # not measured by the repair: a fixed or size-budget plan
            with _recording(model, target) as recorder:
                allocation["heldout_ce_quant"] = float(window_ce(model, holdout).mean())
            peaks = recorder.summary() if recorder else None
    recipe = {
        "format": RECIPE_FORMAT, "version": RECIPE_VERSION, "stage": "calibrated", "model": model_info, "target": target_entry(target),
        "calibration": {**_calibration_entry(cfg, calib_label, candidates, peaks), "costs": _costs(costs, table, vocab_table)},
        "constraint": {"mode": cfg.mode, "value": cfg.mode_value},
        "blocks": block_entries(model, spec, target, block_formats, qweights, table, scaling=cfg.scaling,
                                quantizers=[t.quantizer for t in transforms]),
        **vocab_entries(model, spec, target, embed=embed, head=head, qweights=qweights, table=vocab_table),
        "allocation": allocation,
        "metrics": predicted_sizes(model, spec, target, block_formats, embed=embed, head=head),
    }
    tensors = {f"{path}.scale": qw.scale for path, qw in qweights.items()}
    for index, t in enumerate(transforms):
        tensors.update({f"{spec.blocks}.{index}.{producer}.smooth": s for producer, s in t.smooth.items()})
        tensors.update({f"{spec.blocks}.{index}.{name}.qweight": qweights[f"{spec.blocks}.{index}.{name}"].q
                        for name in t.codes})  # GPTQ codes are not round(w / scale): stored
    if vocab.head_codes is not None:
        tensors[f"{spec.lm_head}.qweight"] = qweights[spec.lm_head].q
    return recipe, tensors


def _runner(model, spec, sens: np.ndarray, target, model_info: dict, log) -> BlockRunner:
    """The sweep's runner. For an fp16 graph the fp model's activations must fit fp16: where they do
    not, the model is rescaled exactly (``qublast.rescale``; the factors go to ``model_info``) and
    measured again; what rescaling cannot bring within fp16's headroom is refused, by name."""
    if target.graph_dtype != "float16":
        return BlockRunner(model, spec, torch.from_numpy(sens))
    with PeakRecorder(model) as peaks:
        runner = BlockRunner(model, spec, torch.from_numpy(sens))
    before = peaks.summary()
    factors = rescale.choose(peaks.peaks, spec, len(blocks_of(model, spec))) if fp16_overflow(before) else None
    if factors:
        del runner
        rescale.apply(model, spec, factors)
        with PeakRecorder(model) as peaks:
            runner = BlockRunner(model, spec, torch.from_numpy(sens))
        model_info["rescale"] = {**factors, "peak_before": before["max"], "where_before": before["where"],
                                 "peak_after": peaks.summary()["max"], "where_after": peaks.summary()["where"]}
        log(f"fp16 range: {before['where']} reaches {before['max']:.4g}; residual stream divided by {factors['residual']:g}"
            + (f", gated products by {sorted(set(factors['up_down'].values()))} in {len(factors['up_down'])} blocks" if factors["up_down"] else "")
            + f" (exact: qublast.rescale) -> largest activation {peaks.summary()['max']:.4g} ({peaks.summary()['where']})")
    reason = fp16_overflow(peaks.summary())
    if reason:
        fix = ("; exact rescaling moves only the residual stream and the gated products" if rescale.supported(spec)
               else f"; {spec.name} has no rescaling entry in the registry")
        raise InputError(f"{reason} (target {target.name}{', after rescaling' if factors else ''}){fix}; "
                         f"the model cannot be deployed as an fp16 graph")
    if not factors:
        log(f"fp16 range: largest activation {before['max']:.4g} ({before['where']})")
    return runner


def _recording(model, target):
    """The activation peak recorder where the target's graph is fp16 (what the graph must hold:
    ``_runner``, ``export.graph``); elsewhere nothing to record (``None``), and the held-out passes run
    with the model's own attention, as the fp pass they are paired with does (the recorder attends
    with the explicit grouped attention to see the scores, about 15% slower)."""
    return PeakRecorder(model) if target.graph_dtype == "float16" else contextlib.nullcontext()


def _check_fits(layers, spec, target, candidates, fixed) -> None:
    """Every linear can take every candidate (a block size of the target divides its input)."""
    for name in candidates:
        fmt = get_format(name, target)
        if fmt.mix is not None and not spec.bulk:
            raise InputError(f"{name} mixes formats over a block's bulk linears, which {spec.name} does not name; "
                             f"drop it from --candidates")
        for index, layer in enumerate(layers):
            bad = [n for n in spec.linears if not fits(linear_format(fmt, spec, n), layer.get_submodule(n).in_features)]
            if bad and (fixed or name != "fp16"):
                part = linear_format(fmt, spec, bad[0])
                raise InputError(f"block {index}: {bad[0]} (input {layer.get_submodule(bad[0]).in_features}) cannot take "
                                 f"{name} on target {target.name} (block sizes {part.block_sizes}); drop it from --candidates")


def _options(model, spec, target, table, vocab_table, candidates, embed_choices, head_choices, loss: str) -> list[list[Choice]]:
    """One option list per block, then the vocabulary unit's (embedding, lm_head) pairs."""
    options = [[Choice(f, block_bytes(layer, spec, f, target), getattr(row[f], loss)) for f in candidates]
               for layer, row in zip(blocks_of(model, spec), table)]
    embed_loss = {f: getattr(s, loss) for f, s in vocab_table["embed"].items()}
    head_loss = {f: getattr(s, loss) for f, s in vocab_table["lm_head"].items()}
    options.append([Choice(vocab_option(e, h), vocab_bytes(model, spec, target, embed=e, head=h), embed_loss[e] + head_loss[h])
                    for e in embed_choices for h in head_choices])
    return options


class _Builder:
    """The transforms of a plan (blocks, then embedding and lm_head), reconstructed when the
    config says so. The last plan built is kept (a plan's codes are as large as the model), and
    the last one the repair measured within its bound (``keep``), so the plan it keeps is deployed
    as it was measured, without tuning it again (with ``--retune changed`` a second tuning could
    differ: it depends on the plans tuned before)."""

    def __init__(self, model, spec, target, table, vocab_table, importance, tune_ids: np.ndarray, cfg: CalibConfig, log,
                 e2e_ids: np.ndarray | None = None):
        self.model, self.spec, self.target, self.table, self.vocab_table = model, spec, target, table, vocab_table
        self.importance, self.tune_ids, self.cfg, self.log, self.e2e_ids = importance, tune_ids, cfg, log, e2e_ids
        self.teacher = None  # the fp model's copy end-to-end tuning aims at (made on first use)
        self.e2e: dict[tuple, dict] = {}  # end-to-end tuning's record per plan
        self.cache: dict[tuple, tuple] = {}
        self.kept: dict[tuple, tuple] = {}
        self.windows = WindowCache(retune=cfg.retune)  # tuned windows shared by plans with the same leading formats
        self.seconds, self.count, self.e2e_seconds = 0.0, 0, 0.0

    def build(self, formats, *, reconstructed: bool = True) -> tuple[list, VocabTransform, list]:
        """(block transforms, vocabulary transform, reconstruction records) of a plan; reconstructed
        when the config says so and ``reconstructed`` does not turn it off."""
        blocks, embed, head = split_plan(formats)
        key = self._key(formats, reconstructed)
        tune = key[1]
        if key in self.kept:
            return self.kept[key]
        if key not in self.cache:
            transforms = [row[f].transform(self.target) for row, f in zip(self.table, blocks)]
            vocab = VocabTransform.of(self.target, embed=embed, head=head, head_importance=self.importance,
                                      head_codes=self.vocab_table["lm_head"][head].head_codes(self.target))
            records = []
            if tune:
                started = time.perf_counter()
                transforms, records = reconstruct(self.model, self.spec, transforms, vocab, torch.from_numpy(self.tune_ids),
                                                  window=self.cfg.reconstruct, steps=self.cfg.reconstruct_steps, rounding=self.cfg.rounding,
                                                  log=lambda _m: None, cache=self.windows)
                self.seconds += time.perf_counter() - started
                self.count += 1
                before, after = sum(r["before"] for r in records), sum(r["after"] for r in records)
                reused = sum(bool(r.get("cached")) for r in records)
                kept = sum(bool(r.get("reused")) and not r.get("cached") for r in records)
                self.log(f"reconstruction: window errors summed {before:.4g} -> {after:.4g} ({reused} of {len(records)} windows reused"
                         + (f", {kept} kept an earlier plan's tuned scales)" if self.cfg.retune == "changed" else ")"))
                if self.e2e_ids is not None:
                    started = time.perf_counter()
                    if self.teacher is None:
                        self.teacher = copy.deepcopy(self.model).eval()
                    transforms, record = tune_end_to_end(self.model, self.teacher, self.spec, transforms, vocab,
                                                         torch.from_numpy(self.e2e_ids), epochs=self.cfg.e2e_epochs,
                                                         device=self.cfg.device, log=self.log)
                    self.e2e[key] = record
                    spent = time.perf_counter() - started  # the teacher's copy included, on first use
                    self.seconds += spent
                    self.e2e_seconds += spent
            self.cache = {key: (transforms, vocab, records)}
        return self.cache[key]

    def e2e_record(self, formats, reconstructed: bool) -> dict | None:
        """End-to-end tuning's record of a plan built reconstructed (None where it was not tuned)."""
        return self.e2e.get(self._key(formats, reconstructed))

    def keep(self, formats, *, reconstructed: bool) -> None:
        """Hold the build of ``formats`` (built last) beside the next ones: the repair measured it within its bound."""
        key = self._key(formats, reconstructed)
        self.kept = {key: self.kept.get(key) or self.cache[key]}

    def _key(self, formats, reconstructed: bool) -> tuple:
        # an all-fp16 stack has no quantized block to reconstruct (its windows would cost time for nothing)
        tune = bool(self.cfg.reconstruct) and reconstructed and any(f != "fp16" for f in split_plan(formats)[0])
        return tuple(formats), tune


def _allocate(model, spec, options, holdout, cfg: CalibConfig, builder: _Builder, log) -> tuple[list[str], dict]:
    """The knapsack's plan for the constraint; under a PPL bound, measured on held-out windows (with
    reconstruction, when on) and repaired both ways."""
    fp_windows = window_ce(model, holdout)
    info: dict = {"heldout_ce_fp": float(fp_windows.mean())}
    if cfg.mode in ("target_size", "blocks_size"):
        plan, budget = _solve_size(model, spec, builder.target, options, cfg)
        info.update(budget_bytes=budget, predicted_loss=plan.loss)
        return list(plan.formats), info
    max_loss = math.log1p(cfg.max_ppl_increase)
    plan: Plan = solve_for_loss(options, cfg.safety * max_loss)
    info.update(max_dce=max_loss, repair_target_dce=cfg.safety * max_loss, z_upper=Z_UPPER, predicted_loss=plan.loss)
    shifts, peaks = {}, {}
    passes = PrefixPasses(model, spec, holdout)

    def measure(formats: list[str], reconstructed: bool = False) -> float:
        """The upper bound on the held-out dCE that repair compares with the target (a plan measured
        before is not measured again: the same windows give the same number)."""
        key = (tuple(formats), reconstructed)
        if key not in shifts:
            transforms, vocab, _ = builder.build(formats, reconstructed=reconstructed)
            blocks, embed, _head = split_plan(formats)
            fp_prefix = next((i for i, f in enumerate(blocks) if f != "fp16"), len(blocks)) if embed == "fp16" else 0
            with transforms_applied(model, spec, transforms, vocab), _recording(model, builder.target) as recorder:
                windows = passes.window_ce(fp_prefix, recorder)
            shifts[key], peaks[key] = ce_shift(windows, fp_windows), (float(windows.mean()), recorder.summary() if recorder else None)
            if shifts[key].upper(Z_UPPER) <= cfg.safety * max_loss:  # a plan the repair may keep: deployed as measured
                builder.keep(formats, reconstructed=reconstructed)
        return shifts[key].upper(Z_UPPER)

    # Repair compares plans as quantized (reconstruction lowers most plans' loss and costs minutes
    # a plan); the plan it keeps is then reconstructed and measured again. The reconstruction is
    # kept only if it lowered the measured bound (it fits the sensitivity windows, and can fit them
    # at the held-out text's expense). If it was kept and left the plan over the bound, repair goes
    # on measuring reconstructed plans; if it left room under the bound, that room is spent the
    # same way (smaller plans, each reconstructed and measured: the sweep's losses are of the
    # codes before reconstruction, so only these measurements see what it buys).
    target = cfg.safety * max_loss
    formats, history = repair(plan, options, max_loss=target, measure=measure, log=log, spend_tries=cfg.spend_tries)
    reconstructed = False
    if cfg.reconstruct:
        kept = history[-1] if history[-1]["formats"] == formats else next(s for s in history if s["formats"] == formats)
        tuned = measure(formats, reconstructed=True)
        reconstructed = tuned < kept["measured"]
        log(f"repair: the kept plan reconstructed measures {tuned:.5f} (before {kept['measured']:.5f}; bound {target:.5f}): "
            + ("reconstruction kept" if reconstructed else "reconstruction dropped, it did not lower the held-out loss"))
        history.append({**kept, "measured": tuned, "action": "reconstructed" if reconstructed else "reconstruction dropped"})
        if reconstructed and tuned > target:
            formats, more = repair(Plan(tuple(formats), kept["bytes"], kept["predicted"]), options, max_loss=target,
                                   measure=lambda f: measure(f, reconstructed=True), log=log)
            history += [{**step, "action": f"reconstructed {step['action']}"} for step in more[1:]]
        elif reconstructed and cfg.spend_tries:
            # reconstruction lowered the kept plan's loss by an offset, not a factor: the spend aims with
            # the measured/predicted ratio the plan had before it (the sweep's own calibration)
            slope = kept["measured"] / kept["predicted"] if kept["measured"] > 0 and kept["predicted"] > 0 else 1.0
            more = [history[-1]]
            formats = spend(formats, options, more, max_loss=target, measure=lambda f: measure(f, reconstructed=True),
                            tries=cfg.spend_tries, log=log, slope=slope)
            history += [{**step, "action": f"reconstructed {step['action']}"} for step in more[1:]]
    for step in history:
        shift = shifts[(tuple(step["formats"]), step["action"].startswith("reconstruct"))]
        step.update(dce=shift.mean, stderr=shift.stderr)
    info["repair"] = history
    info["reconstructed"] = reconstructed
    info["heldout_ce_quant"], info["peaks"] = peaks[(tuple(formats), reconstructed)]
    return formats, info


def _solve_size(model, spec, target, options, cfg: CalibConfig) -> tuple[Plan, int]:
    """Least predicted loss within the size budget; a budget below the smallest model is a ``BudgetError``.

    ``--target-size`` counts the whole deployed model (knapsack units plus the norms and other
    small tensors); ``--blocks-size`` the block linears alone (the vocabulary unit is pinned)."""
    units, budget, offset = _size_budget(model, spec, target, options, cfg)
    return solve_for_size(units, budget - offset), budget


def _size_budget(model, spec, target, options, cfg: CalibConfig) -> tuple[list, int, int]:
    """(units, budget bytes, bytes outside the units) of a size mode; ``BudgetError`` when even the
    smallest model exceeds the budget (needs only the options' bytes: checked before the sweep too)."""
    if cfg.mode == "blocks_size":
        units = options[:-1] + [options[-1][:1]]
        reference = sum(fp16_bytes(layer.get_submodule(name)) for layer in blocks_of(model, spec) for name in spec.linears)
        offset, fraction, what = -units[-1][0].bytes, cfg.blocks_size, "block linears"
    else:
        units, reference = options, fp16_bytes(model)
        offset, fraction, what = rest_bytes(model, spec, target), cfg.target_size, "whole model"
    budget = int(fraction * reference)
    smallest = sum(min(c.bytes for c in unit) for unit in units) + offset
    if smallest > budget:
        raise BudgetError(f"size budget {fraction} x fp16 ({budget} bytes, {what}) is below the smallest {what} on target "
                          f"{target.name}: {smallest} bytes = {smallest / reference:.4f} x fp16")
    return units, budget, offset


def _byte_options(model, spec, target, candidates, embed_choices, head_choices) -> list[list[Choice]]:
    """``_options`` without losses: what each unit's formats cost in bytes (known before any measurement)."""
    options = [[Choice(f, block_bytes(layer, spec, f, target), 0.0) for f in candidates] for layer in blocks_of(model, spec)]
    options.append([Choice(vocab_option(e, h), vocab_bytes(model, spec, target, embed=e, head=h), 0.0)
                    for e in embed_choices for h in head_choices])
    return options


def _costs(costs: dict, table, vocab_table) -> dict:
    """What calibration cost: wall times (this run's, and the journal's measurements, which a resumed
    run did not repeat), GPTQ's share, and the process's peak resident memory."""
    entries = [s for row in table for f, s in row.items() if f != "fp16"] + [
        s for row in vocab_table.values() for f, s in row.items() if f != "fp16"]
    return {**costs, "measurements": len(entries), "measured_s": sum(s.seconds for s in entries),
            "gptq_s": sum(s.gptq_seconds for s in entries),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _calibration_entry(cfg: CalibConfig, calib_label: str, candidates, peaks: dict) -> dict:
    return {
        "text": calib_label, "seqlen": cfg.calib_seqlen, "sens_windows": cfg.sens_windows,
        "holdout_windows": cfg.holdout_windows, "seed": cfg.seed, "candidates": list(candidates),
        "clip_grid": list(CLIP_GRID), "safety": cfg.safety, "scaling": cfg.scaling,
        "alpha_grid": list(ALPHA_GRID), "range_method": cfg.range_method, "alloc_loss": cfg.alloc_loss,
        "embeddings": cfg.embeddings, "lm_head": cfg.lm_head, "activation_peaks": peaks,
        "quantizers": list(cfg.quantizers), "act_order": cfg.act_order, "gptq_windows": cfg.gptq_windows,
        "reconstruct": cfg.reconstruct, "reconstruct_steps": cfg.reconstruct_steps, "rounding": cfg.rounding, "retune": cfg.retune,
        "reconstruct_windows": cfg.tune_windows, "e2e_windows": cfg.e2e_windows, "e2e_epochs": cfg.e2e_epochs,
        "device": cfg.device, "dtype": cfg.dtype,
        "sweep": cfg.sweep,
    }


# The journal keys each measurement by (block, format name): a format added later adds records and
# invalidates none, so the fingerprint keeps the names the journal was versioned with.
JOURNAL_FORMATS = ("fp16", "w8a8", "w8", "w4")


def _fingerprint(model_info: dict, sens: np.ndarray, cfg: CalibConfig) -> str:
    digest = hashlib.sha256()
    digest.update(model_info["weight_sha256"].encode())
    if model_info.get("rescale"):  # the sweep measured the rescaled model
        factors = model_info["rescale"]
        digest.update(repr((factors["residual"], sorted(factors["up_down"].items()))).encode())
    digest.update(np.ascontiguousarray(sens).tobytes())
    digest.update(repr((CLIP_GRID, ALPHA_GRID, cfg.scaling, cfg.range_method, cfg.target, JOURNAL_FORMATS, sorted(cfg.quantizers),
                        cfg.act_order, cfg.gptq_windows if "gptq" in cfg.quantizers else None)).encode())
    if cfg.sweep != "full":  # journals of full sweeps keep their fingerprint
        digest.update(repr(("sweep", cfg.sweep)).encode())
    return digest.hexdigest()


if __name__ == "__main__":  # python -m qublast.calibrate: the CLI of qublast.export, stopping at the recipe
    from qublast.export import main  # qublast.export imports this module: a top-level import would be a cycle (as __main__ it is none)

    sys.exit(main(calibrate_only=True))
