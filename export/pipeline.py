"""Recipe + checkpoint -> QDQ ONNX -> verification -> bundle (DESIGN.md "Artifacts").

``run`` is what ``python -m qublast.export`` calls. Everything that can be checked without the
weights is checked first (``preflight``: flags, paths, texts, lengths against the model's
positions, the GGUF's integrity), so a bad flag costs seconds, not the hour of calibration.
The bundle is assembled in a staging folder beside ``--out`` and swapped into place only when
everything in it is written and verified (``export.outdir``: what ``--out`` may replace).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qublast import text as qtext
from qublast.apply import quantize_recipe
from qublast.arch import arch_for
from qublast.calibrate import DEFAULTS, CalibConfig, calibrate
from qublast.device import placed, torch_dtype
from qublast.errors import GraphError, InputError, QublastError
from qublast.evaluate import perplexity
from qublast.files import atomic_write_text, remove_stale_temps, safetensors_loads
from qublast.formats import get_target
from qublast.models import (
    ModelSource,
    check_gguf,
    check_safetensors,
    hf_home,
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_source,
    weight_hash,
)
from qublast.recipe import (
    check_model,
    check_target,
    read_recipe,
    read_tensors,
    validate,
    write_recipe,
    write_tensors,
)
from qublast.report import write_report
from qublast.schema import parse
from runtime import engine
from runtime.build_engine import BuildError, embeds_width, graph_layout, read_graph
from runtime.bundle import MANIFEST, manifest_for
from runtime.embedding import FILE as TABLE_FILE
from runtime.embedding import EmbeddingTable
from runtime.generate import check_threads
from runtime.perplexity import perplexity as ort_perplexity
from runtime.session import OrtModel
from runtime.targets import TARGETS

from . import graph, outdir, sizes

DEFAULT_CONTEXT = 2048
RUN_RECORD = "run.json"  # wall times and memory of the run that made the bundle (differ run to run)


@dataclass(frozen=True)
class ExportConfig:
    """One export run; the CLI only parses flags into this."""

    out: Path
    target: str = DEFAULTS.target
    model: str | None = None
    recipe: Path | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    calib_text: str | None = None
    calib_dataset: str | None = None
    eval_text: str | None = None
    eval_dataset: str | None = None
    seqlen: int = qtext.EVAL_SEQLEN
    max_eval_windows: int | None = None
    context: int | None = None  # the TensorRT profiles' longest sequence (None: DEFAULT_CONTEXT or the positions)
    threads: int | None = None
    trust_remote_code: bool = False
    overwrite: bool = False  # --out may replace a file or a folder that is not a bundle
    allow_test_calibration: bool = False  # calibration text may share paragraphs with the evaluation text
    calibrate_only: bool = False  # python -m qublast.calibrate: write the recipe folder, export nothing

    def __post_init__(self):
        if self.target not in TARGETS:
            raise InputError(f"unknown target {self.target!r}; known: {', '.join(TARGETS)}")
        if self.calib.target != self.target:
            raise InputError(f"calibration target {self.calib.target!r} differs from export target {self.target!r}")
        if self.seqlen < 2:
            raise InputError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.max_eval_windows is not None and self.max_eval_windows < 1:
            raise InputError(f"--max-eval-windows must be >= 1, got {self.max_eval_windows}")
        if self.context is not None and self.context < 2:
            raise InputError(f"--context must be >= 2, got {self.context}")
        try:
            check_threads(self.threads)
        except ValueError as exc:
            raise InputError(str(exc)) from exc


@dataclass(frozen=True)
class Inputs:
    """What ``preflight`` checked and read: the run starts from these."""

    out: Path
    source: ModelSource
    max_positions: int | None
    eval_src: qtext.TextSource | None  # None: calibration only
    calib_src: qtext.TextSource | None  # None: the recipe decides
    recipe: dict | None
    context: int  # the TensorRT profiles' longest sequence
    tokenizer: object | None = None  # loaded to count the texts' tokens (None: no text to read)
    eval_windows: np.ndarray | None = None  # [N, seqlen] of the evaluation text
    calib_ids: np.ndarray | None = None  # the calibration text's tokens


def log(message: str) -> None:
    print(f"[qublast] {message}", file=sys.stderr, flush=True)


def run(cfg: ExportConfig) -> Path:
    """Make the bundle at ``cfg.out``; returns its path."""
    inputs = preflight(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for line in outdir.recover(inputs.out):
        log(line)
    made = outdir.new_parents(inputs.out)
    try:
        staged = outdir.stage(inputs.out)
        try:
            _build(cfg, inputs, staged)
            staged.chmod(0o755)
            outdir.swap_into_place(staged, inputs.out)
        except BaseException:
            outdir.remove(staged)
            raise
    except BaseException:
        outdir.remove_new_parents(made)
        raise
    log(f"{'recipe' if cfg.calibrate_only else 'bundle'} written: {inputs.out}")
    return inputs.out


def preflight(cfg: ExportConfig) -> Inputs:
    """Every check that needs no weights, before any work; a failure is one ``QublastError``."""
    source = resolve_source(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if source.is_gguf:
        check_gguf(Path(source.path) / source.gguf_file)
    config = load_config(source)
    arch_for(getattr(config, "model_type", "") or "")
    positions = max_positions(config)
    target = get_target(cfg.target)
    lengths = ([] if cfg.calibrate_only else [("--seqlen", cfg.seqlen)]) + ([] if cfg.recipe else [("--calib-seqlen", cfg.calib.calib_seqlen)])
    lengths += [("--context", cfg.context)] if cfg.context is not None else []
    for flag, value in lengths:
        if positions is not None and value > positions:
            raise InputError(f"{flag} {value} is beyond the model's {positions} positions")
    if cfg.recipe is not None and not Path(cfg.recipe).is_file():
        raise InputError(f"--recipe {cfg.recipe} is {'a folder' if Path(cfg.recipe).is_dir() else 'not found'}; "
                         f"give the recipe.json of a bundle")
    model_dir = Path(source.path) if not source.is_gguf and Path(source.path).is_dir() else None
    if model_dir is not None:
        check_safetensors(model_dir)
    local = {"model": (Path(source.path) / source.gguf_file) if source.is_gguf else model_dir,
             "Hugging Face cache": None if source.is_gguf or model_dir is not None else hf_home(),
             "recipe": cfg.recipe, "recipe's scales": Path(cfg.recipe).with_name("scales.safetensors") if cfg.recipe else None,
             "calibration text": cfg.calib_text, "evaluation text": cfg.eval_text,
             "embedded texts": qtext.embedded_folder(), "cache": cfg.calib.cache_dir}
    out = outdir.check_out(cfg.out, overwrite=cfg.overwrite, inputs=local)
    cache = outdir.absolute(cfg.calib.cache_dir)
    for what in ("model", "Hugging Face cache", "embedded texts"):
        if local[what] is not None and outdir.within(cache, outdir.absolute(Path(local[what]))):
            raise InputError(f"--cache-dir {cfg.calib.cache_dir} is inside the {what} ({local[what]}); "
                             f"keep the cache elsewhere")
    blocks = getattr(config, "num_hidden_layers", None)
    recipe = None
    if cfg.recipe:
        try:
            recipe = read_recipe(cfg.recipe)
            check_target(parse(recipe), target)
        except QublastError as exc:
            raise InputError(f"--recipe {cfg.recipe}: {exc}") from exc
        made_for = recipe["model"]
        if (blocks, getattr(config, "model_type", None)) != (made_for.get("num_blocks"), made_for.get("model_type")):
            raise InputError(f"--recipe {cfg.recipe} is for a {made_for.get('model_type')} model of "
                             f"{made_for.get('num_blocks')} blocks; this one is {config.model_type} with {blocks}")
        scales = Path(cfg.recipe).with_name("scales.safetensors")
        if not scales.is_file():
            raise InputError(f"--recipe {cfg.recipe}: scales.safetensors is not beside it")
        if not safetensors_loads(scales):
            raise InputError(f"--recipe {cfg.recipe}: {scales} is damaged (it does not load)")
    elif blocks is not None:
        cfg.calib.fixed_formats(blocks)  # --formats: one per block
    eval_src = None if cfg.calibrate_only else qtext.eval_text(path=cfg.eval_text, dataset=cfg.eval_dataset)
    if eval_src is not None:
        qtext.check_length(eval_src, "evaluation text", 1, cfg.seqlen, "one window of --seqlen")
    calib_src = None if cfg.recipe else qtext.calib_text(path=cfg.calib_text, dataset=cfg.calib_dataset)
    if calib_src is not None:
        counts = [("--calib-windows", cfg.calib.sens_windows), ("--holdout-windows", cfg.calib.holdout_windows)]
        counts += [("--gptq-windows", cfg.calib.gptq_windows)] if "gptq" in cfg.calib.quantizers else []
        if cfg.calib.own_tune_windows:
            counts.append((f"--reconstruct-windows {cfg.calib.tune_windows} less --calib-windows", cfg.calib.own_tune_windows))
        if cfg.calib.e2e_windows:
            counts.append(("--e2e-windows", cfg.calib.e2e_windows))
        qtext.check_length(calib_src, "calibration text", sum(n for _, n in counts), cfg.calib.calib_seqlen,
                           " + ".join(f"{flag} {n}" for flag, n in counts) + " of --calib-seqlen")
        if eval_src is not None and not cfg.allow_test_calibration:
            qtext.check_disjoint(calib_src, eval_src)
    _check_cache(cfg.calib.cache_dir)
    context = cfg.context or min(DEFAULT_CONTEXT, positions or DEFAULT_CONTEXT)
    # Token counts: a text with enough bytes can still hold too few tokens; found here, before the weights load.
    tokenizer = windows = calib_ids = None
    if eval_src is not None or calib_src is not None:
        tokenizer = load_tokenizer(source)
    if eval_src is not None:
        windows = qtext.eval_windows(qtext.tokenize(tokenizer, eval_src.text), cfg.seqlen, max_windows=cfg.max_eval_windows)
    if calib_src is not None:
        calib_ids = qtext.tokenize(tokenizer, calib_src.text)
        qtext.calib_windows(calib_ids, cfg.calib.calib_seqlen, tuple(n for _, n in counts), seed=cfg.calib.seed)
    return Inputs(out, source, positions, eval_src, calib_src, recipe, context, tokenizer, windows, calib_ids)


def _check_cache(cache: Path) -> None:
    """The cache folder exists (made if not) and takes files; killed writers' temp files are removed."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--cache-dir {cache}: {exc.strerror or exc}") from exc
    if not cache.is_dir() or not os.access(cache, os.W_OK | os.X_OK):
        raise InputError(f"--cache-dir {cache} is not a folder this process can write in")
    remove_stale_temps(cache)


def _build(cfg: ExportConfig, inputs: Inputs, work: Path) -> None:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = inputs.source
    log(f"loading {source.model_id}")
    model, tokenizer, spec = load_model(source, dtype=torch_dtype(cfg.calib.dtype), tokenizer=inputs.tokenizer)
    info = {"id": source.model_id, "model_type": model.config.model_type, "weight_sha256": weight_hash(model),
            "num_blocks": model.config.num_hidden_layers, "gguf": source.gguf_file, "max_positions": inputs.max_positions}
    timings["load_s"] = time.perf_counter() - t0

    if cfg.calibrate_only:
        _calibrate_only(cfg, inputs, work, model, spec, info, timings)
        return
    eval_src = inputs.eval_src
    windows = inputs.eval_windows
    log(f"evaluation: {eval_src.label}, {len(windows)} windows of {cfg.seqlen}")
    with placed(model, spec, cfg.calib.device):
        ppl_fp = _cached_fp_ppl(model, windows, info, cfg.calib.cache_dir)
        t0 = time.perf_counter()
        recipe, scales = _recipe_and_scales(cfg, inputs, model, spec, info)
        timings["calibration_s"] = time.perf_counter() - t0
    record = {"calibration_costs": recipe["calibration"].pop("costs", {}) if not cfg.recipe else {},
              "recipe": str(cfg.recipe) if cfg.recipe else None}
    recipe["metrics"].pop("timings", None)  # a reused recipe's run record belongs to its own run

    t0 = time.perf_counter()
    target = get_target(cfg.target)
    log("export: folding the recipe into the model, writing the graph")
    decided = validate(recipe)  # typed (qublast.schema): what export applies
    exported = graph.export_bundle_graph(model, spec, decided, scales, work, target, log=log)
    timings["export_s"] = time.perf_counter() - t0

    recipe["metrics"].update(_sizes(work, recipe, exported))
    recipe["metrics"].update(_verify(cfg, model, spec, decided, scales, windows, work, target, ppl_fp=ppl_fp, timings=timings))
    recipe["metrics"].update(_bound_check(recipe, eval_src.label))
    recipe["stage"] = "exported"
    record["timings"] = timings
    recipe["evaluation"] = {"text": eval_src.label, "seqlen": cfg.seqlen, "windows": len(windows),
                            "graph_optimization_level": "ORT_ENABLE_ALL", "ort_session": dict(target.ort_session)}
    _write_bundle(cfg, inputs, work, recipe, scales, tokenizer, record)


def _calibrate_only(cfg: ExportConfig, inputs: Inputs, work: Path, model, spec, info: dict, timings: dict) -> None:
    """``python -m qublast.calibrate``: the recipe folder (recipe.json, scales.safetensors, run.json,
    manifest.json), which ``python -m qublast.export --recipe`` applies; nothing is exported."""
    t0 = time.perf_counter()
    with placed(model, spec, cfg.calib.device):
        recipe, scales = _recipe_and_scales(cfg, inputs, model, spec, info)
    timings["calibration_s"] = time.perf_counter() - t0
    record = {"calibration_costs": recipe["calibration"].pop("costs", {}), "recipe": None, "timings": timings}
    log(f"writing the recipe's files into {work.name}")
    write_recipe(recipe, work / "recipe.json")
    write_tensors(scales, work / "scales.safetensors")
    atomic_write_text(work / RUN_RECORD, json.dumps(record, indent=1) + "\n")
    (work / MANIFEST).write_text(json.dumps(manifest_for(work, recipe_version=recipe["version"]), indent=1) + "\n")
    _make_readable(work)


def _recipe_and_scales(cfg: ExportConfig, inputs: Inputs, model, spec, info) -> tuple[dict, dict]:
    if inputs.recipe is not None:
        recipe = inputs.recipe
        check_model(parse(recipe), info["weight_sha256"])
        recipe["model"].setdefault("max_positions", info["max_positions"])
        log(f"reusing recipe {cfg.recipe}")
        return recipe, read_tensors(Path(cfg.recipe).with_name("scales.safetensors"))
    calib_src = inputs.calib_src
    calib_ids = inputs.calib_ids
    log(f"calibration: {calib_src.label} ({len(calib_ids)} tokens), target {cfg.target}, mode {cfg.calib.mode}={cfg.calib.mode_value}")
    return calibrate(model, spec, model_info=info, calib_ids=calib_ids, calib_label=calib_src.label, cfg=cfg.calib, log=log)


def _sizes(work: Path, recipe: dict, exported: dict) -> dict:
    """Deployed bytes read from the files, and the block linears' bytes read from the graph."""
    files = sizes.deployed_files(work)
    blocks = sum(exported["linear_bytes"].values())
    if blocks != recipe["metrics"]["size_bytes_blocks_predicted"]:
        raise GraphError(f"the graph stores {blocks} bytes of block linears, calibration predicted "
                         f"{recipe['metrics']['size_bytes_blocks_predicted']}: byte accounting is wrong")
    return {"size_files": files, "size_bytes": sum(files.values()), "size_bytes_blocks": blocks}


def _verify(cfg, model, spec, recipe, scales, windows, work: Path, target, *, ppl_fp: float, timings: dict) -> dict:
    """PyTorch (fake-quant) vs ONNX Runtime: logits on prefill + decode, and PPL on the windows."""
    quantize_recipe(model, spec, recipe, scales)  # the map is already folded in (export_bundle_graph)
    t0 = time.perf_counter()
    with placed(model, spec, cfg.calib.device):
        ppl_torch = perplexity(model, windows, desc="ppl torch (quantized)").ppl
    timings["eval_torch_s"] = time.perf_counter() - t0
    table = EmbeddingTable.load(work / TABLE_FILE) if (work / TABLE_FILE).is_file() else None
    ort_model = OrtModel(str(work / "model.onnx"), threads=cfg.threads, session_config=target.ort_session, embedding=table)
    agreement = _logit_agreement(model, ort_model, windows[0][:64])
    ort = _ort_ppl(ort_model, windows)
    timings["eval_ort_s"] = ort["seconds"]
    log(f"PPL fp {ppl_fp:.4f} | quantized torch {ppl_torch:.4f} | ORT {ort['ppl']:.4f}")
    return {"ppl_fp": ppl_fp, "ppl_quant_torch": ppl_torch, "ppl_quant_ort": ort["ppl"],
            "ppl_increase_ort": ort["ppl"] / ppl_fp - 1, "ort_vs_torch": ort["ppl"] / ppl_torch - 1,
            "eval_tokens": ort["tokens"], "seqlen": cfg.seqlen, "logit_agreement": agreement}


def _bound_check(recipe: dict, text: str) -> dict:
    """Under ``--max-ppl-increase``, whether the deployed graph's PPL on the evaluation text kept the
    bound. Repair held it on held-out windows of the calibration text; a text unlike that one can
    shift further than ``--safety`` allows, so an overshoot is said on its own line and recorded."""
    constraint = recipe["constraint"]
    if constraint["mode"] != "max_ppl_increase":
        return {}
    bound, increase = float(constraint["value"]), recipe["metrics"]["ppl_increase_ort"]
    within = increase <= bound
    if not within:
        safety = recipe["calibration"].get("safety")
        log(f"warning: the deployed graph's PPL on {text} is {100 * increase:+.2f}%, over --max-ppl-increase "
            f"{bound:g}: repair held the bound on held-out calibration text, and this text shifts further"
            + (f" than --safety {safety:g} allows" if safety is not None else "")
            + "; a smaller --safety or calibration text like this one leaves more room")
    return {"within_bound": within}


def _ort_ppl(ort_model, windows) -> dict:
    return ort_perplexity(ort_model, windows)


def _logit_agreement(model, ort_model, ids: np.ndarray, *, decode_steps: int = 4) -> dict:
    """Max |logit difference| PyTorch vs ORT: prefill of ``ids`` then greedy decode steps through the cache."""
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits.float().numpy()
    logits, past = ort_model.forward(ids[None])
    prefill = float(np.abs(logits - ref).max())
    seq, decode = ids, 0.0
    for _ in range(decode_steps):
        token = np.array([[int(logits[0, -1].argmax())]])
        logits, past = ort_model.forward(token, past)
        seq = np.concatenate([seq, token[0]])
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(seq[None]), use_cache=False).logits[:, -1:].float().numpy()
        decode = max(decode, float(np.abs(logits - ref).max()))
    return {"prefill_max_abs": prefill, "decode_max_abs": decode, "decode_steps": decode_steps,
            "logit_range": float(np.abs(ref).max())}


def _cached_fp_ppl(model, windows: np.ndarray, info: dict, cache_dir: Path) -> float:
    key = hashlib.sha256(info["weight_sha256"].encode() + np.ascontiguousarray(windows).tobytes()).hexdigest()[:16]
    path = cache_dir / f"ppl-fp-{key}.json"
    if path.is_file():
        try:
            ppl = float(json.loads(path.read_text(encoding="utf-8"))["ppl"])
            if math.isfinite(ppl) and ppl > 0:
                log(f"fp PPL {ppl:.4f} (cached {path})")
                return ppl
        except (ValueError, KeyError, TypeError):  # a damaged cache entry: measure again
            pass
        log(f"cache entry {path} is unreadable: measuring the fp PPL again")
    ppl = perplexity(model, windows, desc="ppl torch (fp)").ppl
    atomic_write_text(path, json.dumps({"ppl": ppl}))
    return ppl


def _write_bundle(cfg, inputs: Inputs, work: Path, recipe: dict, scales: dict, tokenizer, record: dict) -> None:
    log(f"writing the bundle's files into {work.name}")
    write_recipe(recipe, work / "recipe.json")
    write_tensors(scales, work / "scales.safetensors")
    tokenizer.save_pretrained(str(work / "tokenizer"))
    try:
        onnx_inputs = read_graph(work / "model.onnx").shapes
        shapes = engine.profiles(graph_layout(onnx_inputs), context=inputs.context, hidden=embeds_width(onnx_inputs))
    except BuildError as exc:
        raise GraphError(f"the exported graph: {exc}") from exc
    if get_target(cfg.target).engine == "tensorrt":
        script = work / "build_engine.sh"
        script.write_text(engine.build_script(shapes))
        (work / "engine_profiles.json").write_text(json.dumps({"target": cfg.target, "context": inputs.context, "shapes": shapes}, indent=1))
    atomic_write_text(work / RUN_RECORD, json.dumps(record, indent=1) + "\n")
    write_report(validate(recipe), work, run=record)
    (work / MANIFEST).write_text(json.dumps(manifest_for(work, recipe_version=recipe["version"]), indent=1) + "\n")
    _make_readable(work)


def _make_readable(folder: Path) -> None:
    """Files 0644 (scripts 0755), folders 0755: a bundle copied to a device runs as any user."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path.suffix == ".sh" else 0o644)
