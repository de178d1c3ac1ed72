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
import onnx
import onnx_graphsurgeon as gs

from qublast import text as qtext
from qublast.calibrate import CalibConfig, calibrate
from qublast.errors import InputError
from qublast.files import atomic_write_text
from qublast.models import load_model, resolve_source, weight_hash
from qublast.recipe import check_model, quantized_linears, read_recipe, read_tensors, write_recipe, write_tensors
from runtime.bundle import MANIFEST, has_act_quant, manifest_for
from runtime.session import ACCURACY_LEVEL, OrtModel

from . import engine, onnx_export, qdq
from .legality import check_trt_legal

TARGETS = ("jetson", "cpu")


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
    model, tokenizer, spec = load_model(source)
    info = {"id": source.model_id, "model_type": model.config.model_type, "weight_sha256": weight_hash(model),
            "num_blocks": model.config.num_hidden_layers, "gguf": source.gguf_file}
    timings["load_s"] = time.perf_counter() - t0

    eval_src = qtext.eval_text(path=cfg.eval_text, dataset=cfg.eval_dataset)
    windows = qtext.eval_windows(qtext.tokenize(tokenizer, eval_src.text), cfg.seqlen, max_windows=cfg.max_eval_windows)
    log(f"evaluation: {eval_src.label}, {len(windows)} windows of {cfg.seqlen}")
    ppl_fp = _cached_fp_ppl(model, windows, info, cfg.calib.cache_dir)

    t0 = time.perf_counter()
    recipe, scales = _recipe_and_scales(cfg, model, spec, tokenizer, info)
    timings["calibration_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _export_graph(model, spec, recipe, scales, work)
    timings["export_s"] = time.perf_counter() - t0

    recipe["metrics"].update(_verify(cfg, model, spec, recipe, scales, windows, work, ppl_fp=ppl_fp, timings=timings))
    recipe["metrics"]["timings"] = timings
    session = {"graph_optimization_level": "ORT_ENABLE_ALL", "session.qdq_matmulnbits_accuracy_level": ACCURACY_LEVEL}
    if has_act_quant(recipe):
        session["session.disable_quant_qdq"] = "1"
    recipe["evaluation"] = {"text": eval_src.label, "seqlen": cfg.seqlen, "windows": int(len(windows)), "ort_session": session}
    _write_bundle(cfg, work, recipe, scales, tokenizer, model)


def _recipe_and_scales(cfg: ExportConfig, model, spec, tokenizer, info) -> tuple[dict, dict]:
    if cfg.recipe:
        recipe = read_recipe(cfg.recipe)
        check_model(recipe, info["weight_sha256"])
        log(f"reusing recipe {cfg.recipe}")
        return recipe, read_tensors(Path(cfg.recipe).with_name("scales.safetensors"))
    calib_src = qtext.calib_text(path=cfg.calib_text, dataset=cfg.calib_dataset)
    calib_ids = qtext.tokenize(tokenizer, calib_src.text)
    log(f"calibration: {calib_src.label} ({len(calib_ids)} tokens), mode {cfg.calib.mode}={cfg.calib.mode_value}")
    return calibrate(model, spec, model_info=info, calib_ids=calib_ids, calib_label=calib_src.label, cfg=cfg.calib, log=log)


def _export_graph(model, spec, recipe: dict, tensors: dict, work: Path) -> None:
    """Fold the map into the fp model, export ONNX, then the QDQ passes, legality check and save."""
    from qublast.apply import fold_recipe

    fold_recipe(model, spec, recipe, tensors)
    log("exporting ONNX (opset 21, KV cache)")
    raw = work / "raw"
    raw.mkdir()
    proto = onnx_export.export_onnx(model, raw / "model.onnx")
    node_modules = onnx_export.linear_modules(proto)
    graph = gs.import_onnx(onnx.load(str(raw / "model.onnx")))
    linears = quantized_linears(recipe)
    if spec.lm_head not in linears:
        head_nodes = [name for name, module in node_modules.items() if module == spec.lm_head]
        graph = qdq.share_tied_table(graph, lm_head_node=head_nodes[0]) if head_nodes else graph
    graph = qdq.quantize_weights(graph, linears, {p: tensors[f"{p}.scale"] for p in linears}, node_modules)
    acts = {lin["path"]: lin["act_scale"] for b in recipe["blocks"] for lin in b["linears"] if lin.get("act_scale")}
    if acts:
        graph = qdq.quantize_activations(graph, acts, node_modules)
    final = gs.export_onnx(graph)
    final.opset_import[0].version = onnx_export.OPSET
    check_trt_legal(final)
    onnx.save(final, str(work / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data")
    onnx.checker.check_model(str(work / "model.onnx"))
    shutil.rmtree(raw)


def _verify(cfg, model, spec, recipe, scales, windows, work: Path, *, ppl_fp: float, timings: dict) -> dict:
    """PyTorch (fake-quant) vs ONNX Runtime: logits on prefill + decode, and PPL on the windows."""
    from qublast.apply import quantize_recipe
    from qublast.evaluate import perplexity

    quantize_recipe(model, spec, recipe, scales)  # the map is already folded in (_export_graph)
    t0 = time.perf_counter()
    ppl_torch = perplexity(model, windows, desc="ppl torch (quantized)").ppl
    timings["eval_torch_s"] = time.perf_counter() - t0
    ort_model = OrtModel(str(work / "model.onnx"), threads=cfg.threads, int8_fusion=not has_act_quant(recipe))
    agreement = _logit_agreement(model, ort_model, windows[0][:64])
    ort = _ort_ppl(ort_model, windows)
    timings["eval_ort_s"] = ort["seconds"]
    log(f"PPL fp {ppl_fp:.4f} | quantized torch {ppl_torch:.4f} | ORT {ort['ppl']:.4f}")
    return {"ppl_fp": ppl_fp, "ppl_quant_torch": ppl_torch, "ppl_quant_ort": ort["ppl"],
            "ppl_increase_ort": ort["ppl"] / ppl_fp - 1, "ort_vs_torch": ort["ppl"] / ppl_torch - 1,
            "eval_tokens": ort["tokens"], "seqlen": cfg.seqlen, "logit_agreement": agreement,
            "onnx_file_bytes": sum(p.stat().st_size for p in work.glob("model.onnx*"))}


def _ort_ppl(ort_model, windows) -> dict:
    from runtime.perplexity import perplexity as ort_perplexity

    return ort_perplexity(ort_model, windows)


def _logit_agreement(model, ort_model, ids: np.ndarray, *, decode_steps: int = 4) -> dict:
    """Max |logit difference| PyTorch vs ORT: prefill of ``ids`` then greedy decode steps through the cache."""
    import torch

    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits.numpy()
    logits, past = ort_model.forward(ids[None])
    prefill = float(np.abs(logits - ref).max())
    seq, decode = ids, 0.0
    for _ in range(decode_steps):
        token = np.array([[int(logits[0, -1].argmax())]])
        logits, past = ort_model.forward(token, past)
        seq = np.concatenate([seq, token[0]])
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(seq[None]), use_cache=False).logits[:, -1:].numpy()
        decode = max(decode, float(np.abs(logits - ref).max()))
    return {"prefill_max_abs": prefill, "decode_max_abs": decode, "decode_steps": decode_steps}


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

    from .onnx_export import kv_shape

    write_recipe(recipe, work / "recipe.json")
    write_tensors(scales, work / "scales.safetensors")
    tokenizer.save_pretrained(str(work / "tokenizer"))
    kv_heads, head_dim = kv_shape(model.config)
    shapes = engine.profiles(num_layers=model.config.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim, context=cfg.context)
    script = work / "build_engine.sh"
    script.write_text(engine.build_script(shapes))
    script.chmod(0o755)
    (work / "engine_profiles.json").write_text(json.dumps({"target": cfg.target, "context": cfg.context, "shapes": shapes}, indent=1))
    write_report(recipe, work)
    (work / MANIFEST).write_text(json.dumps(manifest_for(work, recipe_version=recipe["version"]), indent=1))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished bundle into place; an older bundle at ``dst`` is removed only after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{int(time.time())}")
        dst.rename(old)
    src.rename(dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)
