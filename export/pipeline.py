"""Recipe + checkpoint -> QDQ ONNX -> verification -> bundle (DESIGN.md "Artifacts").

``run`` is what ``python -m qublast.export`` calls. The bundle is assembled in a temporary
folder beside ``--out`` and renamed into place only when everything in it is written and
verified, so a killed run never leaves a half bundle.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qublast import text as qtext
from qublast.calibrate import CalibConfig, calibrate
from qublast.device import placed, torch_dtype
from qublast.errors import GraphError, InputError
from qublast.files import atomic_write_text
from qublast.formats import get_target
from qublast.models import load_model, resolve_source, weight_hash
from qublast.recipe import check_model, check_target, read_recipe, read_tensors, write_recipe, write_tensors
from runtime.bundle import MANIFEST, manifest_for
from runtime.embedding import FILE as TABLE_FILE
from runtime.embedding import EmbeddingTable
from runtime.session import OrtModel
from runtime.targets import TARGETS

from . import engine, graph, sizes


@dataclass(frozen=True)
class ExportConfig:
    """One export run; the CLI only parses flags into this."""

    out: Path
    target: str = "jetson"
    model: str | None = None
    recipe: Path | None = None
    calib: CalibConfig = field(default_factory=CalibConfig)
    calib_text: str | None = None
    calib_dataset: str | None = None
    eval_text: str | None = None
    eval_dataset: str | None = None
    seqlen: int = 512
    max_eval_windows: int | None = None
    context: int = 2048
    threads: int | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.target not in TARGETS:
            raise InputError(f"unknown target {self.target!r}; known: {', '.join(TARGETS)}")
        if self.calib.target != self.target:
            raise InputError(f"calibration target {self.calib.target!r} differs from export target {self.target!r}")
        if self.seqlen < 2:
            raise InputError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.max_eval_windows is not None and self.max_eval_windows < 1:
            raise InputError("--max-eval-windows must be >= 1")


def log(message: str) -> None:
    print(f"[qublast] {message}", file=sys.stderr, flush=True)


def run(cfg: ExportConfig) -> Path:
    """Make the bundle at ``cfg.out``; returns its path."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", dir=cfg.out.parent))
    try:
        _build(cfg, work)
        work.chmod(0o755)
        _replace_dir(work, cfg.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"bundle written: {cfg.out}")
    return cfg.out


def _build(cfg: ExportConfig, work: Path) -> None:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = resolve_source(cfg.model, trust_remote_code=cfg.trust_remote_code)
    log(f"loading {source.model_id}")
    model, tokenizer, spec = load_model(source, dtype=torch_dtype(cfg.calib.dtype))
    info = {"id": source.model_id, "model_type": model.config.model_type, "weight_sha256": weight_hash(model),
            "num_blocks": model.config.num_hidden_layers, "gguf": source.gguf_file}
    timings["load_s"] = time.perf_counter() - t0

    eval_src = qtext.eval_text(path=cfg.eval_text, dataset=cfg.eval_dataset)
    windows = qtext.eval_windows(qtext.tokenize(tokenizer, eval_src.text), cfg.seqlen, max_windows=cfg.max_eval_windows)
    log(f"evaluation: {eval_src.label}, {len(windows)} windows of {cfg.seqlen}")
    with placed(model, spec, cfg.calib.device):
        ppl_fp = _cached_fp_ppl(model, windows, info, cfg.calib.cache_dir)
        t0 = time.perf_counter()
        recipe, scales = _recipe_and_scales(cfg, model, spec, tokenizer, info)
        timings["calibration_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    target = get_target(cfg.target)
    exported = graph.export_bundle_graph(model, spec, recipe, scales, work, target, log=log)
    timings["export_s"] = time.perf_counter() - t0

    recipe["metrics"].update(_sizes(work, recipe, exported))
    recipe["metrics"].update(_verify(cfg, model, spec, recipe, scales, windows, work, target, ppl_fp=ppl_fp, timings=timings))
    recipe["metrics"]["timings"] = timings
    recipe["evaluation"] = {"text": eval_src.label, "seqlen": cfg.seqlen, "windows": int(len(windows)),
                            "graph_optimization_level": "ORT_ENABLE_ALL", "ort_session": dict(target.ort_session)}
    _write_bundle(cfg, work, recipe, scales, tokenizer, model)


def _recipe_and_scales(cfg: ExportConfig, model, spec, tokenizer, info) -> tuple[dict, dict]:
    if cfg.recipe:
        recipe = read_recipe(cfg.recipe)
        check_model(recipe, info["weight_sha256"])
        check_target(recipe, get_target(cfg.target))
        log(f"reusing recipe {cfg.recipe}")
        return recipe, read_tensors(Path(cfg.recipe).with_name("scales.safetensors"))
    calib_src = qtext.calib_text(path=cfg.calib_text, dataset=cfg.calib_dataset)
    calib_ids = qtext.tokenize(tokenizer, calib_src.text)
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
    from qublast.apply import quantize_recipe
    from qublast.evaluate import perplexity

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


def _ort_ppl(ort_model, windows) -> dict:
    from runtime.perplexity import perplexity as ort_perplexity

    return ort_perplexity(ort_model, windows)


def _logit_agreement(model, ort_model, ids: np.ndarray, *, decode_steps: int = 4) -> dict:
    """Max |logit difference| PyTorch vs ORT: prefill of ``ids`` then greedy decode steps through the cache."""
    import torch

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
    from qublast.evaluate import perplexity

    key = hashlib.sha256(info["weight_sha256"].encode() + np.ascontiguousarray(windows).tobytes()).hexdigest()[:16]
    path = cache_dir / f"ppl-fp-{key}.json"
    if path.is_file():
        ppl = json.loads(path.read_text())["ppl"]
        log(f"fp PPL {ppl:.4f} (cached {path})")
        return ppl
    ppl = perplexity(model, windows, desc="ppl torch (fp)").ppl
    atomic_write_text(path, json.dumps({"ppl": ppl}))
    return ppl


def _write_bundle(cfg, work: Path, recipe: dict, scales: dict, tokenizer, model) -> None:
    from qublast.report import write_report

    from .build_engine import embeds_width, graph_layout, read_graph

    write_recipe(recipe, work / "recipe.json")
    write_tensors(scales, work / "scales.safetensors")
    tokenizer.save_pretrained(str(work / "tokenizer"))
    proto = read_graph(work / "model.onnx")
    shapes = engine.profiles(graph_layout(proto), context=cfg.context, hidden=embeds_width(proto))
    if get_target(cfg.target).engine == "tensorrt":
        script = work / "build_engine.sh"
        script.write_text(engine.build_script(shapes))
        (work / "engine_profiles.json").write_text(json.dumps({"target": cfg.target, "context": cfg.context, "shapes": shapes}, indent=1))
    write_report(recipe, work)
    (work / MANIFEST).write_text(json.dumps(manifest_for(work, recipe_version=recipe["version"]), indent=1))
    _make_readable(work)


def _make_readable(folder: Path) -> None:
    """Files 0644 (scripts 0755), folders 0755: a bundle copied to a device runs as any user."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path.suffix == ".sh" else 0o644)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished bundle into place; an older bundle at ``dst`` is removed only after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{int(time.time())}")
        dst.rename(old)
    src.rename(dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)
