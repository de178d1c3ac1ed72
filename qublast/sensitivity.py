"""Sensitivity sweep: how much CE rises when only one block is quantized (DESIGN.md).

For block i and each candidate format: search the block's scaling map on its cached fp input
(``mapsearch``), run block i transformed and blocks i+1..L in fp; record dCE and KL to the fp
logits; then advance the cached hidden state through fp block i. The map's transform and the
map off are both measured on the same windows and the one with the lower dCE is kept (alpha = 0
where the map would make the block worse), so the sensitivity is that of what will be
deployed. Each result (with its map) is appended to a journal (JSON lines) as soon as it is
measured; a rerun with the same fingerprint skips what the journal holds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from runtime.targets import Target

from .apply import BlockTransform, QuantMemo, block_transformed
from .blocks import BlockRunner, Score
from .compensate import block_hessians, gptq_transform
from .files import atomic_write_bytes, naming, safetensors_loads
from .fisher import output_gradients
from .formats import embed_format, get_format
from .gptq import InverseFactors
from .mapsearch import block_error, search_transform, search_windows
from .quant import QuantizedWeight, QuantStats
from .vocab import VocabTransform, effective_table, gptq_head, head_importance, head_inputs, quantize_table, score_vocab, vocab_restored

JOURNAL_VERSION = 6  # 6: lm_head rows over a vocabulary too large to keep the fp log-probabilities had KL 0
VOCAB_UNITS = ("embed", "lm_head")
ESTIMATES = ("fisher", "full")  # how a block's end-to-end loss is found (sweep's ``estimate``)


@dataclass(frozen=True)
class Sensitivity:
    """dCE (nats/token) and KL (nats/token) of quantizing one block (or "embed", "lm_head") alone."""

    block: int | str
    format: str
    dce: float
    kl: float
    alpha: dict = field(default_factory=dict)  # producer -> alpha of the scaling map
    block_err: float = 0.0  # relative MSE of the block's output vs fp
    block_err_unscaled: float | None = None  # the same with the map off
    dce_unscaled: float | None = None  # dCE with the map off (the per-block ablation)
    kl_unscaled: float | None = None
    scaled: bool = False  # True: the map's transform was kept; False: the map off (lower or equal dCE)
    smooth: dict | None = None  # producer -> per-channel scales (lists, for the journal)
    act_scales: dict | None = None
    importance: dict | None = None  # linear -> mean x^2 per input channel (lists, for the journal)
    quantizer: str = "rtn"  # "rtn" or "gptq" (the one with the lower block output error, see _measure)
    codes_file: str | None = None  # gptq: safetensors file with each linear's codes and scales
    seconds: float = field(default=0.0, compare=False)  # wall time of this measurement (search, GPTQ, scoring)
    gptq_seconds: float = field(default=0.0, compare=False)  # of which GPTQ (Hessians and solves)
    estimated: bool = False  # dCE and KL predicted from output gradients (qublast.fisher), not run to the logits

    def transform(self, target: Target) -> BlockTransform:
        """The block transform this row measured, with the format as ``target`` stores it."""
        smooth = {k: torch.tensor(v, dtype=torch.float32) for k, v in (self.smooth or {}).items()}
        importance = {k: torch.tensor(v, dtype=torch.float32) for k, v in (self.importance or {}).items()}
        fmt = get_format(self.format, target)
        codes = _load_codes(Path(self.codes_file), fmt.bits) if self.codes_file else {}
        return BlockTransform(fmt, dict(self.alpha), smooth, dict(self.act_scales or {}), importance, self.quantizer, codes)

    def head_codes(self, target: Target) -> QuantizedWeight | None:
        """lm_head's GPTQ codes and scales (an lm_head row measured with GPTQ), else None."""
        if not self.codes_file:
            return None
        return _load_codes(Path(self.codes_file), get_format(self.format, target).bits)["lm_head"]


def sweep(runner: BlockRunner, target: Target, candidates: tuple[str, ...], *, journal: Path, fingerprint: str,
          scaling: bool = True, range_method: str = "mse", vocab: dict[str, tuple[str, ...]] | None = None,
          quantizers: tuple[str, ...], act_order: bool = True, fit: torch.Tensor | None = None,
          estimate: str, progress=None,
          ) -> tuple[list[dict[str, Sensitivity]], dict[str, dict[str, Sensitivity]]]:
    """Measure every (block, candidate) and every (vocab unit, format) of ``vocab``
    (``{"embed": formats, "lm_head": formats}``); returns one ``{format: Sensitivity}`` per block
    and per vocab unit, fp16 rows included. ``fit`` [M, S, H]: block 0's input on GPTQ's windows
    (needed when ``quantizers`` has "gptq"), advanced through the fp blocks with the sweep.
    ``estimate``: "full" scores a block's dCE and KL by running every later block to the logits;
    "fisher" predicts them from the output gradients of one backward pass (``qublast.fisher``),
    so the sweep's cost grows linearly with the depth."""
    if "gptq" in quantizers and fit is None:
        raise ValueError("GPTQ needs its calibration windows (fit)")
    done = _read_journal(journal, fingerprint, progress)
    layers = runner.layers
    vocab = {unit: tuple(f for f in formats if f != "fp16") for unit, formats in (vocab or {}).items()}
    todo = [(i, f) for i in range(len(layers)) for f in candidates if f != "fp16" and (i, f) not in done]
    todo += [(u, f) for u, formats in vocab.items() for f in formats if (u, f) not in done]
    if estimate not in ESTIMATES:
        raise ValueError(f"unknown estimate {estimate!r}; known: {', '.join(ESTIMATES)}")
    grads = None
    if estimate == "fisher" and any(isinstance(key[0], int) or key[0] == "embed" for key in todo):
        started = time.perf_counter()
        grads = output_gradients(runner)
        if progress:
            progress(f"output gradients of the fp model for the estimate: {time.perf_counter() - started:.1f} s")
    bar = tqdm(total=len(todo), desc="sensitivity", unit="run", file=sys.stderr, disable=not todo)
    with open(journal, "a", encoding="utf-8") as log:
        if journal.stat().st_size == 0:
            _write(log, {"version": JOURNAL_VERSION, "fingerprint": fingerprint})

        def record(key, measure):
            if key not in done:
                start = time.perf_counter()
                entry = measure()
                done[key] = replace(entry, seconds=time.perf_counter() - start)
                _write(log, asdict(done[key]))
                bar.update(1)

        hidden, fit_index = runner.first_hidden, 0  # fit has gone through blocks < fit_index
        for index in range(len(layers)):
            hessians = _LazyHessians(runner, index, fit)  # one collection serves every format and map of the block
            pending = any(name != "fp16" and (index, name) not in done for name in candidates)
            out_fp = runner.run_block(index, hidden) if grads is not None and pending else None
            scorer = _Estimated(runner, index, hidden, out_fp, grads) if out_fp is not None else None
            for name in candidates:
                if name != "fp16":
                    record((index, name), lambda: _measure(
                        runner, index, hidden, get_format(name, target), scaling=scaling, range_method=range_method,
                        quantizers=quantizers, act_order=act_order, fit=fit, codes_dir=journal.with_suffix(".codes"),
                        hessians=hessians, scorer=scorer))
            if _needs_later(done, index + 1, len(layers), candidates):  # else nothing reads the later hidden states
                hidden = out_fp if out_fp is not None else runner.run_block(index, hidden)
                if fit is not None and "gptq" in quantizers:
                    fit, fit_index = hessians.output if hessians.output is not None else runner.run_block_chunked(index, fit), index + 1
        importance = head_importance(runner) if vocab.get("lm_head") else None
        if "gptq" in quantizers and any(("lm_head", f) not in done for f in vocab.get("lm_head", ())):
            for index in range(fit_index, len(layers)):  # GPTQ's windows through the rest of the fp model
                fit = runner.run_block_chunked(index, fit)
        for unit, formats in vocab.items():
            for name in formats:
                if unit == "embed" and grads is not None:
                    record((unit, name), lambda: _estimate_table(runner, name, grads))
                    continue
                record((unit, name), lambda: _measure_vocab(runner, target, unit, name, importance, quantizers=quantizers,
                                                            act_order=act_order, fit_final=fit,
                                                            codes_dir=journal.with_suffix(".codes")))
    bar.close()
    return _table(done, len(layers), candidates), _vocab_table(done, vocab)


class _Estimated:
    """Scores of block ``index`` transformed, predicted from the fp output gradients (``qublast.fisher``)."""

    def __init__(self, runner: BlockRunner, index: int, hidden, out_fp, grads):
        self.runner, self.index, self.hidden, self.out_fp, self.grads = runner, index, hidden, out_fp, grads

    def __call__(self, t: BlockTransform) -> Score:
        with block_transformed(self.runner.layers[self.index], self.runner.spec, t):
            out = self.runner.run_block(self.index, self.hidden)
        dce, kl = self.grads.estimate(self.index, out - self.out_fp)
        return Score(ce=self.runner.fp_score.ce + dce, kl=kl)


def _needs_later(done: dict, start: int, num_blocks: int, candidates) -> bool:
    """True when some block from ``start`` on still has a candidate to measure."""
    return any((i, f) not in done for i in range(start, num_blocks) for f in candidates if f != "fp16")


def _fp16_row(key) -> Sensitivity:
    return Sensitivity(key, "fp16", 0.0, 0.0, block_err_unscaled=0.0, dce_unscaled=0.0, kl_unscaled=0.0)


def _table(done: dict, num_blocks: int, candidates) -> list[dict[str, Sensitivity]]:
    table = []
    for index in range(num_blocks):
        row = {"fp16": _fp16_row(index)}
        row.update({f: done[(index, f)] for f in candidates if f != "fp16"})
        table.append(row)
    return table


def _vocab_table(done: dict, vocab: dict[str, tuple[str, ...]]) -> dict[str, dict[str, Sensitivity]]:
    return {unit: {"fp16": _fp16_row(unit), **{f: done[(unit, f)] for f in formats}} for unit, formats in vocab.items()}


def _measure_vocab(runner: BlockRunner, target: Target, unit: str, name: str, importance, *, quantizers=("rtn",),
                   act_order: bool = True, fit_final=None, codes_dir: Path | None = None) -> Sensitivity:
    """dCE and KL with only the embedding table or only lm_head in format ``name``. lm_head takes
    the quantizer of ``quantizers`` whose logits err less on the search windows (GPTQ fits on the others)."""
    quantizer, codes_file = "rtn", None
    if unit == "embed":
        transform = VocabTransform(embed_format(name), get_format("fp16", target))
    else:
        transform = VocabTransform(embed_format("fp16"), get_format(name, target), importance)
        if "gptq" in quantizers:
            codes = gptq_head(runner, transform.head, fit_final, act_order=act_order)
            gptq = VocabTransform(transform.embed, transform.head, importance, codes)
            if "rtn" not in quantizers or _head_error(runner, gptq) < _head_error(runner, transform):
                transform, quantizer = gptq, "gptq"
                codes_file = _save_codes({"lm_head": gptq.head_codes}, codes_dir / f"lm_head-{name}.safetensors")
    score = score_vocab(runner, transform, unit=unit)
    return Sensitivity(unit, name, score.ce - runner.fp_score.ce, score.kl, dce_unscaled=score.ce - runner.fp_score.ce,
                       kl_unscaled=score.kl, quantizer=quantizer, codes_file=codes_file)


@torch.no_grad()
def _estimate_table(runner: BlockRunner, name: str, grads) -> Sensitivity:
    """The embedding table's row with dCE and KL predicted from the gradients at block 0's input
    (``qublast.fisher``): the table's quantization error on the windows' tokens is that input's change."""
    table = effective_table(runner.model, runner.spec)
    used, where = torch.unique(runner.ids, return_inverse=True)  # rows are quantized independently
    rows = table[used]
    delta = (quantize_table(rows, embed_format(name)).dequantize() - rows)[where]
    dce, kl = grads.estimate_input(delta)
    return Sensitivity("embed", name, dce, kl, dce_unscaled=dce, kl_unscaled=kl, estimated=True)


@torch.no_grad()
def _head_error(runner: BlockRunner, vocab: VocabTransform) -> float:
    """Relative MSE of the logits on the search windows with lm_head as ``vocab`` says."""
    head = runner.model.get_submodule(runner.spec.lm_head)
    x = search_windows(head_inputs(runner)).to(head.weight.dtype)
    ref = head(x).float()
    with vocab_restored(runner.model, runner.spec):
        vocab.apply_head(runner.model, runner.spec)
        out = runner.model.get_submodule(runner.spec.lm_head)(x).float()
    return float((out - ref).pow(2).mean() / ref.pow(2).mean().clamp(min=1e-12))


class _LazyHessians:
    """Block ``index``'s unfolded Hessians on the fit windows, collected on first use; ``output``:
    the block's fp output on them once collected (the fit windows' input to the next block)."""

    def __init__(self, runner: BlockRunner, index: int, fit):
        self.runner, self.index, self.fit, self.value, self.output = runner, index, fit, None, None
        self.factors = InverseFactors()  # GPTQ's factorisations of the unfolded Hessians, for every format

    def get(self, fmt) -> dict:
        if self.value is None:
            self.value, self.output = block_hessians(self.runner, self.index, self.fit, BlockTransform(fmt), with_output=True)
        return self.value


def _measure(runner: BlockRunner, index: int, hidden, fmt, *, scaling: bool, range_method: str,
             quantizers: tuple[str, ...] = ("rtn",), act_order: bool = True, fit=None, codes_dir: Path | None = None,
             hessians: _LazyHessians | None = None, scorer=None) -> Sensitivity:
    """Search the map, pick each side's quantizer, score the map and the map off, keep the lower dCE.

    Each side (the map's transform, the map off) takes the quantizer of ``quantizers`` with the
    lower block output error on the search windows (GPTQ fits on its own windows, ``fit``)."""
    (mapped, mapped_err), (off, off_err) = search_transform(runner, index, hidden, fmt, scaling=scaling, range_method=range_method)
    gptq_start = time.perf_counter()
    if fmt.bits and "gptq" in quantizers:
        hessians = hessians or _LazyHessians(runner, index, fit)
        base = hessians.get(fmt)
        shared = dict(memo=QuantMemo(), ref=runner.run_block(index, search_windows(hidden)), factors=hessians.factors)
        off, off_err = _quantizer(runner, index, hidden, fit, off, quantizers, act_order=act_order, hessians=base, **shared)
        mapped, mapped_err = (off, off_err) if mapped is off or not scaling else _quantizer(
            runner, index, hidden, fit, mapped, quantizers, act_order=act_order, hessians=base, **shared)
    gptq_seconds = time.perf_counter() - gptq_start
    score = scorer or (lambda t: _score(runner, index, hidden, t))
    off_score = score(off)
    mapped_score = off_score if mapped is off else score(mapped)
    # full scores decide by dCE; estimated ones by KL, which the estimate predicts to second order
    # (its dCE lacks CE's curvature through the later blocks: qublast.fisher)
    key = (lambda s: s.kl) if scorer is not None else (lambda s: s.ce)
    scaled = mapped is not off and key(mapped_score) < key(off_score)
    t, err, score = (mapped, mapped_err, mapped_score) if scaled else (off, off_err, off_score)
    fp_ce = runner.fp_score.ce
    codes_file = _save_codes(t.codes, codes_dir / f"block{index}-{fmt.name}.safetensors") if t.codes else None
    return Sensitivity(
        index, fmt.name, score.ce - fp_ce, score.kl, alpha=t.alpha, block_err=err, block_err_unscaled=off_err,
        dce_unscaled=off_score.ce - fp_ce, kl_unscaled=off_score.kl, scaled=scaled,
        smooth={k: v.tolist() for k, v in t.smooth.items()}, act_scales=dict(t.act_scales),
        importance={k: v.tolist() for k, v in t.importance.items()}, quantizer=t.quantizer, codes_file=codes_file,
        gptq_seconds=gptq_seconds, estimated=scorer is not None,
    )


def _quantizer(runner, index, hidden, fit, t: BlockTransform, quantizers, *, act_order: bool,
               hessians=None, memo: QuantMemo | None = None, ref=None,
               factors: InverseFactors | None = None) -> tuple[BlockTransform, float]:
    """``t`` by round-to-nearest or by GPTQ (fitted on ``fit``), whichever gives the lower block
    output error on the search windows of ``hidden`` (``ref``: the fp output on them; ``memo``:
    GPTQ results of linears the other side of the map shares)."""
    gptq = gptq_transform(runner, index, fit, t, act_order=act_order, hessians=hessians, memo=memo, factors=factors)
    gptq_err = block_error(runner, index, hidden, gptq, ref=ref)
    if "rtn" not in quantizers:
        return gptq, gptq_err
    rtn_err = block_error(runner, index, hidden, t, ref=ref)
    return (gptq, gptq_err) if gptq_err < rtn_err else (t, rtn_err)


def _save_codes(codes: dict[str, QuantizedWeight], path: Path) -> str:
    """Write each linear's codes (int8) and scales (fp32) to ``path`` atomically; returns the path."""
    tensors = {}
    for name, qw in codes.items():
        tensors[f"{name}.q"] = qw.q.contiguous()
        tensors[f"{name}.scale"] = qw.scale.contiguous().float()
    bits = {f"bits.{name}": str(qw.bits) for name, qw in codes.items()}  # a mixed format's linears differ
    atomic_write_bytes(path, save(tensors, metadata=bits))
    return str(path)


def _load_codes(path: Path, bits: int) -> dict[str, QuantizedWeight]:
    """The codes ``_save_codes`` wrote, as quantized weights (block size from the shapes; each
    linear's bits from the file, ``bits`` for files written before they were recorded)."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        recorded = f.metadata() or {}
        for key in f.keys():
            if key.endswith(".q"):
                name = key[:-2]
                q, scale = f.get_tensor(key), f.get_tensor(f"{name}.scale")
                unmeasured = QuantStats(rel_err=0.0, max_abs_err=0.0, mse=0.0, clip_mean=1.0)  # apply.transform_block measures
                out[name] = QuantizedWeight(q=q, scale=scale, bits=int(recorded.get(f"bits.{name}", bits)),
                                            block_size=q.shape[1] // scale.shape[1], stats=unmeasured)
    return out


def _score(runner: BlockRunner, index: int, hidden, t: BlockTransform) -> Score:
    """CE and KL of the model with only block ``index`` transformed by ``t``."""
    with block_transformed(runner.layers[index], runner.spec, t):
        out = runner.run_block(index, hidden)
    return runner.score(runner.run_from(index + 1, out))


def _read_journal(path: Path, fingerprint: str, log=None) -> dict[tuple[int, str], Sensitivity]:
    """Entries of a journal written for ``fingerprint``; another run's journal, or one damaged
    anywhere (bytes, JSON, field types, a codes file that does not load), is set aside and
    everything is measured again."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # a line cut by a kill: drop it before appending
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    try:
        lines = data.decode("utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        if not isinstance(header, dict) or header.get("fingerprint") != fingerprint \
                or header.get("version") != JOURNAL_VERSION:
            raise ValueError("another run's journal")
        done = {}
        for line in lines[1:]:
            entry = _entry(json.loads(line))
            if entry.codes_file is None or safetensors_loads(entry.codes_file):  # else measure it again
                done[(entry.block, entry.format)] = entry
    except (ValueError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if log:
            log(f"journal {path} is damaged or another run's: set aside as {path.with_suffix('.stale').name} "
                f"(replacing an earlier one), measuring again")
        os.replace(path, path.with_suffix(".stale"))
        path.touch()
        return {}
    return done


_NUMBER = (int, float)
_FIELD_TYPES = {"block": (int, str), "format": str, "dce": _NUMBER, "kl": _NUMBER, "alpha": dict,
                "block_err": _NUMBER, "block_err_unscaled": (*_NUMBER, type(None)),
                "dce_unscaled": (*_NUMBER, type(None)), "kl_unscaled": (*_NUMBER, type(None)), "scaled": bool,
                "smooth": (dict, type(None)), "act_scales": (dict, type(None)), "importance": (dict, type(None)),
                "quantizer": str, "codes_file": (str, type(None)), "seconds": _NUMBER, "gptq_seconds": _NUMBER,
                "estimated": bool}


def _entry(obj) -> Sensitivity:
    """One journal line as a Sensitivity; TypeError when a field is missing, unknown or of the wrong type."""
    if not isinstance(obj, dict):
        raise TypeError("journal entry is not an object")
    for name, value in obj.items():
        types = _FIELD_TYPES.get(name)
        if types is None or not isinstance(value, types) or (isinstance(value, bool) and types is _NUMBER):
            raise TypeError(f"journal field {name!r}")
    if isinstance(obj["block"], str) and obj["block"] not in VOCAB_UNITS:
        raise TypeError("journal block")
    return Sensitivity(**obj)


def _write(log, record: dict) -> None:
    with naming(log.name):  # a full disk: name the journal (a line cut short is dropped on resume)
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())
