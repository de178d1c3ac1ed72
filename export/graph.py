"""Recipe + folded checkpoint -> the target's graph (and host-side embedding table) in a bundle folder.

Steps: fold the recipe's scaling map into the fp model; export it in the target's float type
(a copy in fp16 for Jetson) with ``input_ids``, or ``inputs_embeds`` when the table lives on
the host; the QDQ passes (codes from the fp32 folded weights and the recipe's scales); the
CPU target's norm rewrite; for TensorRT targets the legality check; save with external data;
write ``embedding.safetensors``. Nothing here decides anything the recipe did not.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from qublast.apply import fold_recipe
from qublast.deployed import recipe_codes
from qublast.errors import GraphError
from qublast.evaluate import fp16_overflow
from qublast.files import naming
from qublast.formats import block_size_for, embed_format
from qublast.quant import quantize_with_scale
from qublast.recipe import block_linears, quantized_linears
from qublast.schema import Recipe
from qublast.vocab import effective_table, is_tied
from runtime.embedding import FILE as TABLE_FILE
from runtime.embedding import write_table
from runtime.targets import Target

from . import onnx_export, qdq, sizes
from .legality import check_trt_legal

_NP_FLOAT = {"float16": np.float16, "float32": np.float32}
_TORCH_FLOAT = {"float16": torch.float16, "float32": torch.float32}


def export_bundle_graph(model, spec, recipe: Recipe, tensors: dict, work: Path, target: Target, *, log=print) -> dict:
    """Write ``model.onnx`` (+ data) and, if the recipe says so, ``embedding.safetensors`` into
    ``work``; returns ``{"linear_bytes": {block linear path: bytes in the graph}}``."""
    if target.graph_dtype == "float16":
        reason = fp16_overflow(recipe.calibration.activation_peaks or {})
        if reason:
            raise GraphError(f"{reason}; target {target.name} exports fp16 graphs only")
    fold_recipe(model, spec, recipe, tensors)
    outside = recipe.embedding.storage == "side_table"
    if outside:
        _write_table(model, spec, recipe, tensors, work / TABLE_FILE)
    raw = work / "raw"
    raw.mkdir()
    state = "KV cache" if spec.kind == "attention" else "recurrent state, one token a step"
    log(f"exporting ONNX (opset {onnx_export.OPSET}, {target.graph_dtype}, {state}, "
        f"{'inputs_embeds' if outside else 'input_ids'})")
    want = _TORCH_FLOAT[target.graph_dtype]
    graph_model = copy.deepcopy(model).to(want) if next(model.parameters()).dtype != want else model
    with naming(raw / "model.onnx"):  # the exporter's writer names no file on a failed write
        proto = onnx_export.export_onnx(graph_model, raw / "model.onnx", embeds=outside, kind=spec.kind)
    del graph_model
    node_modules = onnx_export.linear_modules(proto)
    final = _qdq(model, spec, recipe, tensors, raw / "model.onnx", node_modules, target, tied_in_graph=not outside)
    if target.engine == "tensorrt":
        check_trt_legal(final, graph_dtype=target.graph_dtype)
    with naming(work / "model.onnx"):
        onnx.save(final, str(work / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data")
    onnx.checker.check_model(str(work / "model.onnx"))
    shutil.rmtree(raw)
    saved = onnx.load(str(work / "model.onnx"), load_external_data=False)
    paths = {f"{spec.blocks}.{b.index}.{lin.name}" for b in recipe.blocks for lin in b.linears}
    return {"linear_bytes": sizes.linear_bytes_in_graph(saved, node_modules, paths)}


def _qdq(model, spec, recipe, tensors, raw_path: Path, node_modules: dict, target: Target, *, tied_in_graph: bool) -> onnx.ModelProto:
    """The QDQ passes over the raw export; returns the final proto (weights in memory)."""
    float_dtype = _NP_FLOAT[target.graph_dtype]
    graph = gs.import_onnx(onnx.load(str(raw_path)))
    linears = quantized_linears(recipe)
    head_nodes = [name for name, module in node_modules.items() if module == spec.lm_head]
    if tied_in_graph and is_tied(model, spec):
        graph = qdq.share_tied_table(graph, lm_head_node=head_nodes[0]) if head_nodes else graph
    codes = {path: recipe_codes(model.get_submodule(path).weight.detach().float(), tensors, path, bits=entry.bits,
                                block_size=entry.block_size) for path, entry in linears.items()}
    if tied_in_graph and recipe.embedding.bits:  # the table is lm_head's codes (Target.shared_quantized_table)
        if not head_nodes:
            raise GraphError(f"graph has no MatMul for {spec.lm_head}, whose codes the recipe's table is")
        head = linears.pop(spec.lm_head)
        q, scale = codes.pop(spec.lm_head)
        level = int(target.ort_session.get("session.qdq_matmulnbits_accuracy_level", 0))
        graph = qdq.gather_from_head_codes(graph, lm_head_node=head_nodes[0], module=spec.lm_head, q=q.numpy(), scale=scale.numpy(),
                                           bits=head.bits, block_size=head.block_size, accuracy_level=level,
                                           float_dtype=float_dtype)
    layouts = {p: {"bits": e.bits, "block_size": e.block_size, "per_channel": e.per_channel} for p, e in linears.items()}
    graph = qdq.quantize_weights(graph, layouts, {p: scale for p, (_, scale) in codes.items()}, node_modules,
                                 codes={p: q for p, (q, _) in codes.items()}, float_dtype=float_dtype)
    acts = {path: lin.act_scale for path, lin in block_linears(recipe).items() if lin.act_scale}
    if acts:
        graph = qdq.quantize_activations(graph, acts, node_modules, float_dtype=float_dtype)
    if target.norm_fusion:
        graph = qdq.fusable_rms_norms(graph)
    final = gs.export_onnx(graph)
    final.opset_import[0].version = onnx_export.OPSET
    if any(n.domain == "com.microsoft" for n in final.graph.node) and not any(o.domain == "com.microsoft" for o in final.opset_import):
        final.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return final


def _write_table(model, spec, recipe: Recipe, tensors: dict, path: Path) -> None:
    """``embedding.safetensors``: the embedding module's rows, quantized with the recipe's scales."""
    fmt = embed_format(recipe.embedding.format)
    table = effective_table(model, spec)  # [V, H]
    if fmt.bits is None:
        write_table(path, weight_format=fmt.name, rows=table.numpy())
        return
    scale = tensors.get(f"{spec.embed}.scale")
    if scale is None:
        raise GraphError(f"scales file has no scale for the embedding table {spec.embed}")
    block = block_size_for(fmt, table.shape[1])
    codes = quantize_with_scale(table, scale, bits=fmt.bits, block_size=block).numpy()  # RTN: the table has no GPTQ
    write_table(path, weight_format=fmt.name, rows=codes, scale=scale.numpy(), bits=fmt.bits, block_size=block)
