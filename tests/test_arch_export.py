"""Every registered architecture: block runner, mixed quantization, QDQ export, ORT vs PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from export import onnx_export, qdq
from export.legality import violations
from qublast.apply import BlockTransform, apply_transforms, block_transformed, fold_block
from qublast.arch import REGISTRY, arch_for
from qublast.blocks import BlockRunner, blocks_of, foldable, get_module
from qublast.errors import UnsupportedModelError
from qublast.formats import get_format, get_target
from qublast.mapsearch import search_transform
from qublast.vocab import VocabTransform
from runtime import io_spec
from runtime.embedding import EmbeddingTable
from runtime.session import OrtModel
from tests.tiny import VOCAB, tiny_model

ARCHS = sorted(REGISTRY)
JETSON, CPU = get_target("jetson"), get_target("cpu")


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        arch_for("gpt2")


@pytest.mark.parametrize("model_type", ARCHS)
def test_registry_entry_matches_model(model_type):
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    for layer in blocks_of(model, spec):
        for name in spec.linears:
            assert isinstance(get_module(layer, name), torch.nn.Linear)
        for group in spec.groups:
            if group.producer and foldable(get_module(layer, group.producer)):
                assert get_module(layer, group.producer).weight.shape[0] == get_module(layer, group.linears[0]).in_features


@pytest.mark.parametrize("model_type", ARCHS)
def test_block_runner_reproduces_model(model_type):
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    runner = BlockRunner(model, spec, ids)
    ref = model(input_ids=ids).logits
    ours = torch.cat(list(runner.logit_chunks(runner.run_from(0, runner.first_hidden))))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert runner.fp_score.kl == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("model_type", ARCHS)
def test_block_runner_keeps_the_outputs_it_would_compute(model_type):
    """The final hidden state and the kept block outputs come from the capture's one forward pass
    and equal, bit for bit, what running the captured blocks one by one computes; without
    scoring the runner holds no fp log-probabilities."""
    model = tiny_model(model_type, layers=3)
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    runner = BlockRunner(model, spec, ids, outputs=(0, 1), scored=False)
    assert runner.fp_score is None and runner.ref_logprobs is None
    hidden = runner.first_hidden
    for index in range(3):
        hidden = runner.run_block(index, hidden)
        if index in runner.outputs:
            assert torch.equal(runner.outputs[index], hidden)
    assert sorted(runner.outputs) == [0, 1]
    assert torch.equal(runner.final_hidden, hidden)


def _searched_transforms(model, spec, target, formats):
    """The scaling map searched per block on random tokens, as the sweep does."""
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    runner = BlockRunner(model, spec, ids)
    hidden, out = runner.first_hidden, []
    for index, fmt in enumerate(formats):
        out.append(search_transform(runner, index, hidden, get_format(fmt, target), scaling=True, range_method="mse")[0][0])
        hidden = runner.run_block(index, hidden)
    return out


@pytest.mark.parametrize("fmt", ["w4", "w8a8"])
def test_search_reports_the_unscaled_error_it_beat(fmt):
    """The error at alpha = 0 (the report's 'map off' column) is what --no-scaling measures, and the
    chosen alpha never does worse than it."""
    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    runner = BlockRunner(model, spec, ids)
    fmt = get_format(fmt, JETSON)
    (t, err), (off, unscaled) = search_transform(runner, 0, runner.first_hidden, fmt, scaling=True, range_method="mse")
    (t0, err0), (off0, unscaled0) = search_transform(runner, 0, runner.first_hidden, fmt, scaling=False, range_method="mse")
    assert t0 is off0 and not any(t0.alpha.values()) and not t0.smooth and not t0.importance
    assert not any(off.alpha.values()) and not off.smooth and not off.importance
    assert err0 == pytest.approx(unscaled0) == pytest.approx(unscaled)
    assert 0 < err <= unscaled


def test_search_tries_no_alpha_whose_fold_reaches_no_code(monkeypatch):
    """Jetson's w4m keeps attention and down_proj in fp16, so only post_attention_layernorm's fold
    reaches a code (gate/up's input channels; up_proj's own rows, which the up -> down fold scales,
    are quantized row by row and do not notice): the other alphas are not tried and stay 0. w4,
    and the CPU's w4m (the rest in INT8), try every producer."""
    from qublast import mapsearch
    from qublast.scaling import ALPHA_GRID

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    producers = [g.producer for g in spec.groups if g.producer]
    w4m = get_format("w4m", JETSON)
    assert mapsearch.searched(spec, w4m, producers) == ["post_attention_layernorm"]
    assert mapsearch.searched(spec, get_format("w4", JETSON), producers) == producers
    assert mapsearch.searched(spec, get_format("w4m", CPU), producers) == producers
    tried = []
    real = mapsearch.block_transformed
    monkeypatch.setattr(mapsearch, "block_transformed", lambda block, spec, t, **kw: (tried.append(dict(t.alpha)), real(block, spec, t, **kw))[1])
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    runner = BlockRunner(model, spec, ids)
    (t, err), (off, unscaled) = search_transform(runner, 0, runner.first_hidden, w4m, scaling=True, range_method="mse")
    assert len(tried) == 2 + (len(ALPHA_GRID) - 1)  # the map off, clipping alone, one producer's alphas
    assert all(a["input_layernorm"] == a["mlp.up_proj"] == 0 for a in tried)
    assert t.alpha["input_layernorm"] == t.alpha["mlp.up_proj"] == 0
    assert 0 < err <= unscaled


@pytest.mark.parametrize("map_shift", [1.0, -1.0])
def test_sweep_keeps_the_map_only_where_it_lowers_dce(tmp_path, monkeypatch, map_shift):
    """The issue's rule: where the map makes a block worse, the block keeps alpha = 0. On a random
    tiny model either could win, so the map's measured CE is shifted by +-1 nat: the sweep must
    keep the map off (and record the map off's real dCE) when the map is worse, the map when better."""
    import qublast.sensitivity as sens
    from qublast.blocks import Score

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    runner = BlockRunner(model, spec, ids)
    real_score = sens._score

    def shifted(runner, index, hidden, t):
        score = real_score(runner, index, hidden, t)
        is_map = bool(t.smooth or t.importance)
        return Score(score.ce + map_shift, score.kl) if is_map else score

    monkeypatch.setattr(sens, "_score", shifted)
    table, _ = sens.sweep(runner, JETSON, ("fp16", "w4"), journal=tmp_path / "j.jsonl", fingerprint="f", quantizers=("rtn",), estimate="full")
    for row in table:
        kept = row["w4"]
        if map_shift > 0:
            assert not kept.scaled and kept.dce == kept.dce_unscaled and kept.kl == kept.kl_unscaled
            assert not any(kept.alpha.values()) and not kept.smooth and not kept.importance
            assert kept.block_err == kept.block_err_unscaled
        else:  # kept wherever the search found a map distinct from the map off
            assert kept.scaled == bool(kept.smooth or kept.importance) == (kept.dce < kept.dce_unscaled - 0.5)
            assert kept.block_err <= kept.block_err_unscaled
    assert map_shift > 0 or any(row["w4"].scaled for row in table)


@pytest.mark.parametrize("target,formats", [(JETSON, ("w8a8", "w4")), (CPU, ("w8", "w4"))], ids=["jetson", "cpu"])
def test_sweep_keeps_the_lower_of_map_and_map_off(tmp_path, target, formats):
    """With the real search, each kept entry's dCE is the lower of the two and its transform is
    the map off exactly when the map did not lower dCE."""
    from qublast.sensitivity import sweep

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    runner = BlockRunner(model, spec, ids)
    table, _ = sweep(runner, target, ("fp16", *formats), journal=tmp_path / "j.jsonl", fingerprint="f", quantizers=("rtn",), estimate="full")
    hidden = runner.first_hidden
    for index, row in enumerate(table):
        for kept in (row[f] for f in formats):
            assert kept.dce <= kept.dce_unscaled
            if kept.scaled:
                assert kept.dce < kept.dce_unscaled and (kept.smooth or kept.importance)
            else:
                assert kept.dce == kept.dce_unscaled and not kept.smooth and not kept.importance
            with block_transformed(runner.layers[index], spec, kept.transform(target)):  # the journaled transform gives the kept dCE
                score = runner.score(runner.run_from(index + 1, runner.run_block(index, hidden)))
            assert score.ce - runner.fp_score.ce == pytest.approx(kept.dce, abs=1e-6)
        hidden = runner.run_block(index, hidden)


def test_importance_is_the_folded_input_power():
    """The clip search's importance equals mean x^2 of each linear's input measured after the folds."""
    from qublast.apply import restored
    from qublast.mapsearch import group_smoothing, importance, input_samples

    model = tiny_model("llama")
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    runner = BlockRunner(model, spec, ids)
    block, hidden = runner.layers[0], runner.first_hidden
    inputs = input_samples(runner, 0, hidden, spec.linears)
    smooth = group_smoothing(spec, block, inputs, 0.6, act_aware=True)
    assert len(smooth) == 3  # q/k/v, gate/up and down (through up_proj)
    with restored(block):
        fold_block(block, spec, smooth)
        folded = input_samples(runner, 0, hidden, spec.linears)
    for name, power in importance(spec, inputs, smooth).items():
        torch.testing.assert_close(power, folded[name].pow(2).mean(dim=0), rtol=1e-4, atol=1e-6)


def _export_quantized(model, spec, tmp_path, target, formats, head):
    """Fold the map into the fp model, export (fp32, host-side table), quantize in torch, inject the same QDQ."""
    transforms = _searched_transforms(model, spec, target, formats)
    for layer, t in zip(blocks_of(model, spec), transforms):
        fold_block(layer, spec, t.smooth)
    proto = onnx_export.export_onnx(model, tmp_path / "raw.onnx", embeds=True, kind=spec.kind)
    node_modules = onnx_export.linear_modules(proto)
    folded = [BlockTransform(t.fmt, t.alpha, {}, t.act_scales, t.importance) for t in transforms]
    weights = {path: get_module(model, path).weight.detach().clone() for path in set(node_modules.values())}
    qweights = apply_transforms(model, spec, folded, VocabTransform.of(target, embed="fp16", head=head))
    per_channel = {"w8a8"}  # the only per-channel format (Jetson); CPU w8 is blocked even when one block spans the row
    fmts = {f"{spec.blocks}.{i}.{n}": t.fmt.name for i, t in enumerate(transforms) for n in spec.linears}
    linears = {path: {"bits": qw.bits, "block_size": qw.block_size, "per_channel": fmts.get(path) in per_channel}
               for path, qw in qweights.items()}
    acts = {f"{spec.blocks}.{i}.{name}": s for i, t in enumerate(transforms) for name, s in t.act_scales.items()}
    graph = gs.import_onnx(onnx.load(str(tmp_path / "raw.onnx")))
    graph = qdq.quantize_weights(graph, linears, {p: qw.scale for p, qw in qweights.items()}, node_modules, weights=weights)
    graph = qdq.quantize_activations(graph, acts, node_modules)
    final = gs.export_onnx(graph)
    onnx.save(final, str(tmp_path / "q.onnx"), save_as_external_data=True, location="q.onnx.data")
    return final, node_modules, qweights, acts


@pytest.mark.parametrize("model_type", ARCHS)
def test_fold_is_exact_before_quantization(model_type):
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = model(input_ids=ids).logits
    g = torch.Generator().manual_seed(5)
    from qublast.blocks import foldable

    for layer in blocks_of(model, spec):
        smooth = {grp.producer: torch.rand(get_module(layer, grp.producer).weight.shape[0], generator=g) * 4 + 0.25
                  for grp in spec.groups if grp.producer and foldable(get_module(layer, grp.producer))}
        assert smooth  # every architecture has foldable groups
        fold_block(layer, spec, smooth)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("target,formats,head,tol", [(JETSON, ["w8a8", "w4"], "w4", 2e-4), (CPU, ["w8", "w4"], "w8", 2e-4)],
                         ids=["jetson", "cpu"])
@pytest.mark.parametrize("model_type", ARCHS)
def test_quantized_export_matches_pytorch(model_type, target, formats, head, tol, tmp_path):
    """Every architecture, both targets' formats (static INT8 activations and INT4 on Jetson; ONNX
    Runtime's dynamic INT8 activations on CPU, emulated in PyTorch), lm_head quantized and the
    table fed as inputs_embeds: ONNX Runtime with the target's session options equals PyTorch."""
    model = tiny_model(model_type)
    spec = arch_for(model.config.model_type)
    if target is CPU and spec.kind != "attention":
        # an activation value within rounding of a code boundary can land on the other code in ONNX
        # Runtime than in PyTorch; the recurrent state carries such a flip to every later token
        tol = 1e-2
    final, node_modules, qweights, acts = _export_quantized(model, spec, tmp_path, target, formats, head)
    # every linear of the model was found in the graph, none silently skipped
    assert set(qweights) <= set(node_modules.values()) and spec.lm_head in qweights
    if target is JETSON:
        assert violations(final, graph_dtype="float32") == []
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    dq = [n for n in final.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(qweights) + len(acts)
    q_nodes = [n for n in final.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == len(acts) == (len(spec.linears) if "w8a8" in formats else 0)  # one pair per consuming MatMul
    from qublast.vocab import effective_table

    table = effective_table(model, spec).numpy()  # the fp16-rounded rows the host table holds (multiplier included)
    embedding = EmbeddingTable(table.astype(np.float16), None, 16, table.shape[1], table.shape[1])
    ort_model = OrtModel(str(tmp_path / "q.onnx"), session_config=target.ort_session, embedding=embedding)
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(1, 12))
    logits, past = ort_model.forward(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=tol, rtol=1e-4)
    seq = ids
    for step in range(3):  # decode through the KV cache
        token = np.array([[7 + step]])
        logits, past = ort_model.forward(token, past)
        seq = np.concatenate([seq, token], axis=1)
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(seq)).logits[:, -1:].numpy()
        np.testing.assert_allclose(logits, ref, atol=tol, rtol=1e-4)
    if spec.kind == "attention":
        assert past[0].shape[2] == seq.shape[1]  # the KV cache grew by every token
    else:  # the recurrent state keeps its shape (and a hybrid's KV cache grew by every token)
        layout = ort_model.layout
        for name, state in zip(layout.past_names(), past):
            assert state.shape[1:] == layout.recurrent[name] if name in layout.recurrent else state.shape[2] == seq.shape[1]


@pytest.mark.parametrize("model_type", [a for a in ARCHS if REGISTRY[a].kind != "ssm"])
def test_grouped_attention_equals_sdpa(model_type):
    """The export's attention (query heads grouped under their KV head, no K/V copies) computes
    what transformers' SDPA does, with and without a cache."""
    from qublast.attention import registered

    model = tiny_model(model_type)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
        step = model(input_ids=ids[:, :1] + 1, cache=ref.cache).logits
        with registered(model):
            ours = model(input_ids=ids, use_cache=True)
            ours_step = model(input_ids=ids[:, :1] + 1, cache=ours.cache).logits
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_step, step, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after the export


@pytest.mark.parametrize("dtype,embeds", [(torch.float32, False), (torch.float16, True)], ids=["cpu-ids", "jetson-embeds"])
def test_io_table(tmp_path, dtype, embeds):
    """The graph's inputs and outputs are io_spec's: names, dynamic axes, dtypes (fp32 logits always)."""
    model = tiny_model("llama").to(dtype)
    proto = onnx_export.export_onnx(model, tmp_path / "m.onnx", embeds=embeds)
    layers = model.config.num_hidden_layers
    assert [i.name for i in proto.graph.input] == io_spec.input_names(layers, embeds=embeds)
    assert [o.name for o in proto.graph.output] == io_spec.output_names(layers)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    first = io_spec.INPUTS_EMBEDS if embeds else io_spec.INPUT_IDS
    assert dims[first] == (["batch", "seq", 64] if embeds else ["batch", "seq"])
    assert dims[io_spec.past_name(0, "key")][1::2] == [2, 16]  # kv_heads, head_dim are static
    types = {i.name: i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]}
    graph_float = onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.FLOAT
    assert types[first] == (graph_float if embeds else onnx.TensorProto.INT64)
    assert types[io_spec.past_name(0, "value")] == types[io_spec.present_name(1, "key")] == graph_float
    assert types[io_spec.LOGITS] == onnx.TensorProto.FLOAT
