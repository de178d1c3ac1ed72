"""State-space and hybrid families (Mamba, Mamba2, Falcon-H1) end to end on tiny random models:
the step graph against PyTorch through prefill and decode, greedy generation, a mixed recipe
through the CLI on both targets, and the runtime reproducing the bundle's perplexity."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export import onnx_export
from export.legality import violations
from qublast.arch import arch_for
from qublast.export import main
from qublast.recipe import read_recipe
from runtime import engine, io_spec
from runtime.build_engine import graph_layout, read_graph
from runtime.generate import generate_ids
from runtime.session import OrtModel
from tests.tiny import VOCAB, tiny_model, tiny_tokenizer

FAMILIES = ["mamba", "mamba2", "falcon_h1"]
FAST = ["--calib-seqlen", "32", "--calib-windows", "2", "--holdout-windows", "2", "--seqlen", "32",
        "--max-eval-windows", "3", "--gptq-windows", "4", "--reconstruct-steps", "5"]


@pytest.fixture(scope="module", params=FAMILIES)
def step_graph(request, tmp_path_factory):
    """(model, OrtModel) for an unquantized fp32 step graph of each family."""
    model = tiny_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    onnx_export.export_onnx(model, path, kind=arch_for(request.param).kind)
    return model, OrtModel(str(path))


def test_step_graph_follows_the_io_table(step_graph):
    model, ort_model = step_graph
    spec = arch_for(model.config.model_type)
    layout = ort_model.layout
    assert layout.family == spec.kind and layout.step_only and layout.num_layers == model.config.num_hidden_layers
    names = [i.name for i in ort_model.session.get_inputs()]
    assert names == io_spec.input_names(layout.num_layers, family=spec.kind)
    assert [o.name for o in ort_model.session.get_outputs()] == io_spec.output_names(layout.num_layers, family=spec.kind)
    for name in layout.past_names():
        if name.startswith("past_ssm"):
            assert ort_model.dtypes[name] == np.float32  # transformers keeps the SSM state fp32


def test_prefill_and_decode_through_the_state_match_pytorch(step_graph):
    """A 6-token prefill (one step per token from the zero state), then 8 decode steps feeding the
    state back: every position's logits equal the model's own full forward."""
    model, ort_model = step_graph
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(1, 14))
    logits, state = ort_model.forward(ids[:, :6])
    steps = [logits]
    for t in range(6, 14):
        logits, state = ort_model.forward(ids[:, t : t + 1], state)
        steps.append(logits)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_pytorch(step_graph):
    model, ort_model = step_graph
    prompt = [5, 17, 99, 3]
    ours = list(generate_ids(ort_model, prompt, max_new_tokens=10))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert ours == seq[len(prompt):]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Three-block tiny models of each family saved as local HF directories with a tokenizer."""
    from qublast.text import calib_text

    tokenizer = tiny_tokenizer(calib_text().text)
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"{family}-dir")
        tiny_model(family, layers=3).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = path
    return out


@pytest.mark.parametrize("target,formats", [("cpu", "w4,w8,fp16"), ("jetson", "w4,w8a8,fp16")])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_recipe_through_the_cli(model_dirs, tmp_path, family, target, formats):
    """Some blocks INT4, some INT8, one fp16, the scaling map on, embedding and lm_head quantized:
    a verified bundle whose ONNX Runtime PPL is within 0.5% of PyTorch's, legal for TensorRT on Jetson."""
    out = tmp_path / "b"
    head = "w8" if target == "cpu" else "w4"
    assert main(["--model", str(model_dirs[family]), "--target", target, *FAST, "--formats", formats, "--embeddings", "w8",
                 "--lm-head", head, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(out / "recipe.json")
    assert [b["format"] for b in recipe["blocks"]] == formats.split(",")
    assert recipe["calibration"]["scaling"] and recipe["lm_head"]["format"] == head
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    layout = graph_layout(read_graph(out / "model.onnx").shapes)
    assert layout.family == arch_for(family).kind
    if target == "jetson":
        assert violations(proto) == []
        script = (out / "build_engine.sh").read_text()
        shapes = engine.profiles(layout, context=64, hidden=64)
        assert f"{io_spec.past_name(2, 'ssm')}:{shapes[io_spec.past_name(2, 'ssm')][0]}" in script


def test_runtime_reproduces_a_state_model_bundles_perplexity(model_dirs, tmp_path):
    """runtime.perplexity (ONNX Runtime, the bundle's session options and host table) on the
    bundle's evaluation windows gives the recipe's ORT PPL."""
    from qublast.text import eval_text
    from runtime.bundle import open_bundle
    from runtime.perplexity import perplexity, windows

    out = tmp_path / "m"
    assert main(["--model", str(model_dirs["mamba"]), "--target", "cpu", *FAST, "--max-ppl-increase", "0.05",
                 "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    bundle = open_bundle(out)
    recipe = bundle.recipe
    ids = bundle.tokenizer.encode(eval_text().text, add_special_tokens=False).ids
    result = perplexity(bundle.model, windows(ids, recipe["metrics"]["seqlen"], max_windows=recipe["evaluation"]["windows"]),
                        progress=False)
    assert result["ppl"] == pytest.approx(recipe["metrics"]["ppl_quant_ort"], rel=1e-6)
