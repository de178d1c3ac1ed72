"""The CLI end to end on tiny local models, both targets: bundle contents, sizes read from the
files, the embedding table and lm_head as allocation units, recipe reuse, bad input -> exit 2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from export.legality import violations
from qublast.export import main
from qublast.recipe import read_recipe

COMMON = ["--calib-seqlen", "32", "--calib-windows", "2", "--holdout-windows", "2",
          "--seqlen", "32", "--max-eval-windows", "3"]
FAST = ["--target", "cpu", *COMMON]
JETSON = ["--target", "jetson", *COMMON]
REPLAY = ["--target", "cpu", "--seqlen", "32", "--max-eval-windows", "3"]  # with --recipe: no calibration flags
DEPLOYED = ("model.onnx", "model.onnx.data", "embedding.safetensors")


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "b"
    cache = out.parent / "cache"
    assert main(["--model", str(tiny_model_dir), *FAST, "--max-ppl-increase", "0.05", "--out", str(out), "--cache-dir", str(cache)]) == 0
    return out


@pytest.fixture(scope="module")
def jetson_bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "j"
    assert main(["--model", str(tiny_model_dir), *JETSON, "--max-ppl-increase", "0.05", "--out", str(out),
                 "--cache-dir", str(out.parent / "cache")]) == 0
    return out


def _files_on_disk(bundle) -> int:
    return sum((bundle / n).stat().st_size for n in DEPLOYED if (bundle / n).is_file())


def test_bundle_contents(bundle):
    for name in ("recipe.json", "scales.safetensors", "model.onnx", "model.onnx.data", "report.md",
                 "sensitivity.png", "size_vs_ppl.png", "tokenizer/tokenizer.json"):
        assert (bundle / name).is_file(), name
    assert not (bundle / "build_engine.sh").exists()  # the CPU target builds no TensorRT engine
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".b.")]  # no half bundle left
    recipe = read_recipe(bundle / "recipe.json")
    m = recipe["metrics"]
    assert recipe["target"]["name"] == "cpu" and recipe["evaluation"]["ort_session"] == {"session.qdq_matmulnbits_accuracy_level": "4"}
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    assert m["within_bound"] == (m["ppl_increase_ort"] <= 0.05)  # the verification's verdict on the evaluation text
    assert m["size_bytes"] <= m["size_bytes_fp16"] and m["size_bytes_blocks"] <= m["size_bytes_blocks_fp16"]
    assert m["logit_agreement"]["decode_max_abs"] < 1e-2 * m["logit_agreement"]["logit_range"]
    assert recipe["allocation"]["repair"][-1]["measured"] <= recipe["allocation"]["repair_target_dce"] or all(
        b["format"] == "fp16" for b in recipe["blocks"])
    assert "| block | format |" in (bundle / "report.md").read_text()
    assert recipe["calibration"]["activation_peaks"] is None  # an fp32 graph: no fp16 range to hold
    for block in recipe["blocks"]:  # the per-block map ablation: chosen alpha never worse than alpha 0
        assert block["block_err"] <= block["block_err_unscaled"], block["index"]
    for path in bundle.rglob("*"):  # readable by any user once copied to a device
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_sizes_are_read_from_the_files(bundle, jetson_bundle):
    """size_bytes is the deployed files on disk; the block linears' bytes in the graph equal what
    calibration predicted from the target's byte costs; the report names the files."""
    import json as _json

    for b in (bundle, jetson_bundle):
        recipe = read_recipe(b / "recipe.json")
        m = recipe["metrics"]
        assert m["size_bytes"] == _files_on_disk(b) == sum(m["size_files"].values())
        assert set(m["size_files"]) == {n for n in DEPLOYED if (b / n).is_file()}
        assert m["size_bytes_blocks"] == m["size_bytes_blocks_predicted"] == sum(x["bytes"] for x in recipe["blocks"])
        assert (b / "embedding.safetensors").is_file() == (recipe["embedding"]["storage"] == "side_table")
        if recipe["embedding"]["storage"] == "side_table":
            assert m["size_files"]["embedding.safetensors"] >= recipe["embedding"]["bytes"]
        assert _json.loads((b / "manifest.json").read_text())["files"].keys() >= m["size_files"].keys()
        assert "Files counted" in (b / "report.md").read_text()


def test_target_size_counts_the_whole_deployed_model(tiny_model_dir, tmp_path):
    """--target-size F: the deployed files are at most F x the fp16 checkpoint, embedding and lm_head included."""
    out = tmp_path / "s"
    assert main(["--model", str(tiny_model_dir), *FAST, "--target-size", "0.6", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    m = read_recipe(out / "recipe.json")["metrics"]
    assert m["size_bytes"] == _files_on_disk(out) <= 0.6 * m["size_bytes_fp16"]
    assert m["size_bytes"] <= m["size_bytes_predicted"]  # the prediction allows for the graph file's structure


def test_jetson_bundle_is_an_fp16_tensorrt_graph(jetson_bundle):
    """fp16 weights, activations, KV cache and DQ scales; legal for TensorRT; no format TensorRT
    would fold (w8); the build script's profiles name the graph's first input."""
    recipe = read_recipe(jetson_bundle / "recipe.json")
    assert {b["format"] for b in recipe["blocks"]} <= {"fp16", "w8a8", "w4m", "w4"} and recipe["lm_head"]["format"] in ("fp16", "w4")
    proto = onnx.load(str(jetson_bundle / "model.onnx"), load_external_data=False)
    assert violations(proto) == []  # the fp16-graph rules included
    types = {i.name: i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]}
    assert types["past_key_values.0.key"] == types["present.1.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    first = "inputs_embeds" if recipe["embedding"]["storage"] == "side_table" else "input_ids"
    assert first in types and first in (jetson_bundle / "build_engine.sh").read_text()
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    assert recipe["evaluation"]["ort_session"] == {"session.disable_quant_qdq": "1"}  # the graph as written
    # what the fp16 graph must hold, measured on the held-out text (the CPU's fp32 graph records none)
    assert recipe["calibration"]["activation_peaks"]["max"] > 0
    assert "Largest activation" in (jetson_bundle / "report.md").read_text()


def test_vocabulary_units_untied_and_pinned(tmp_path):
    """An untied model with the table and lm_head pinned: the host table holds INT8 rows, lm_head is
    INT4 in the graph, and the runtime reproduces the recorded PPL through the side table."""
    from qublast.text import calib_text
    from runtime.bundle import open_bundle
    from runtime.perplexity import perplexity
    from tests.tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "mistral"
    tiny_model("mistral").save_pretrained(model_dir)
    tiny_tokenizer(calib_text().text).save_pretrained(model_dir)
    out = tmp_path / "u"
    assert main(["--model", str(model_dir), *FAST, "--uniform", "w8", "--embeddings", "w8", "--lm-head", "w4", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    recipe = read_recipe(out / "recipe.json")
    assert recipe["embedding"]["format"] == "w8" and recipe["embedding"]["storage"] == "side_table" and not recipe["embedding"]["tied"]
    assert recipe["lm_head"]["format"] == "w4" and recipe["lm_head"]["linears"][0]["bits"] == 4
    types = {i.name: i.data_type for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert types["lm_head.qweight"] == onnx.TensorProto.INT4
    bundle = open_bundle(out)
    ids = np.asarray(bundle.tokenizer.encode(calib_text().text[:4000]).ids[:96], np.int64).reshape(3, 32)
    assert perplexity(bundle.model, ids, progress=False)["ppl"] > 0
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005


def test_tied_table_kept_once_in_the_graph(tiny_model_dir, tmp_path):
    """Tied embedding and lm_head both fp16: one copy in the graph, input_ids in, no side table."""
    out = tmp_path / "t"
    assert main(["--model", str(tiny_model_dir), *FAST, "--uniform", "w4", "--embeddings", "fp16", "--lm-head", "fp16",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    recipe = read_recipe(out / "recipe.json")
    assert recipe["embedding"]["storage"] == "graph" and not (out / "embedding.safetensors").exists()
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert proto.graph.input[0].name == "input_ids"
    vocab, hidden = recipe["embedding"]["shape"]
    tables = [t for t in proto.graph.initializer if sorted(t.dims) == sorted([vocab, hidden])]
    assert len(tables) == 1  # the Gather and the lm_head MatMul share it


@pytest.mark.parametrize("fmt", ["w8", "w4"])
def test_tied_quantized_table_is_lm_heads_codes(tiny_model_dir, tmp_path, fmt):
    """CPU, tied table and lm_head in one quantized format: stored once, as lm_head's codes
    (MatMulNBits and GatherBlockQuantized read the same initializer), input_ids in, no side
    table; the graph's rows and logits are the torch emulation's; sizes count one copy."""
    from runtime.bundle import open_bundle
    from runtime.session import OrtModel

    out = tmp_path / fmt
    assert main(["--model", str(tiny_model_dir), *FAST, "--uniform", "w8", "--embeddings", fmt, "--lm-head", fmt,
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    recipe = read_recipe(out / "recipe.json")
    emb, head = recipe["embedding"], recipe["lm_head"]["linears"][0]
    assert emb["storage"] == "graph" and emb["tied"] and not (out / "embedding.safetensors").exists()
    assert (emb["bits"], emb["block_size"], emb["bytes"]) == (head["bits"], head["block_size"], 0)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert proto.graph.input[0].name == "input_ids"
    vocab, hidden = emb["shape"]
    nodes = {n.op_type: n for n in proto.graph.node}
    assert nodes["MatMulNBits"].input[1] == nodes["GatherBlockQuantized"].input[0] == "lm_head.qweight"
    assert "Gather" not in nodes  # no float table left
    codes = next(t for t in proto.graph.initializer if t.name == "lm_head.qweight")
    assert list(codes.dims) == [vocab, hidden // head["block_size"], head["block_size"] * head["bits"] // 8]
    assert not [t for t in proto.graph.initializer if sorted(t.dims) == sorted([vocab, hidden])]
    m = recipe["metrics"]
    assert m["size_bytes"] == _files_on_disk(out) and "embedding.safetensors" not in m["size_files"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    assert m["logit_agreement"]["decode_max_abs"] < 1e-2 * m["logit_agreement"]["logit_range"]
    bundle = open_bundle(out)
    assert isinstance(bundle.model, OrtModel) and bundle.model.embedding is None


def test_recipe_reuse_gives_same_graph(bundle, tiny_model_dir, tmp_path):
    out = tmp_path / "again"
    assert main(["--model", str(tiny_model_dir), *REPLAY, "--recipe", str(bundle / "recipe.json"), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    first, second = read_recipe(bundle / "recipe.json"), read_recipe(out / "recipe.json")
    assert [b["format"] for b in first["blocks"]] == [b["format"] for b in second["blocks"]]
    assert second["metrics"]["ppl_quant_ort"] == pytest.approx(first["metrics"]["ppl_quant_ort"], rel=1e-6)


def test_formats_fixes_each_blocks_format(bundle, tiny_model_dir, tmp_path, capsys):
    chosen = [b["format"] for b in read_recipe(bundle / "recipe.json")["blocks"]]
    wanted = ["w4" if f != "w4" else "w8" for f in chosen]  # every block differs from the allocation
    base = ["--model", str(tiny_model_dir), *FAST, "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--formats", ",".join(wanted), "--out", str(tmp_path / "f")]) == 0
    recipe = read_recipe(tmp_path / "f" / "recipe.json")
    assert [b["format"] for b in recipe["blocks"]] == wanted
    assert recipe["constraint"] == {"mode": "formats", "value": ",".join(wanted)}
    assert main([*base, "--formats", ",".join(wanted[:-1]), "--out", str(tmp_path / "g")]) == 2
    assert f"--formats gives {len(wanted) - 1} formats for a model with {len(wanted)} blocks" in _error_line(capsys)
    assert main([*base, "--formats", "w8,int3", "--out", str(tmp_path / "g")]) == 2
    assert "unknown format 'int3'" in _error_line(capsys)
    assert not (tmp_path / "g").exists()


def test_uniform_puts_every_block_in_one_format(bundle, tiny_model_dir, tmp_path):
    """--uniform is --formats with one format repeated; the map is still decided per block."""
    base = ["--model", str(tiny_model_dir), *JETSON, "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--uniform", "w8a8", "--out", str(tmp_path / "u")]) == 0
    recipe = read_recipe(tmp_path / "u" / "recipe.json")
    assert {b["format"] for b in recipe["blocks"]} == {"w8a8"}
    assert recipe["constraint"] == {"mode": "uniform", "value": "w8a8"}
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in (tmp_path / "u" / "report.md").read_text().splitlines()
            if line.startswith("| ") and " | w8a8 | " in line}
    for block in recipe["blocks"]:
        sens = block["sensitivity"]["w8a8"]
        assert sens["dce"] <= sens["dce_map_off"]
        if not block["map"]:  # the map off: no folds in the recipe or the bundle's scales
            assert not any(block["alpha"].values()) and not block["smooth"]
        assert rows[str(block["index"])][2] == ("on" if block["map"] else "off")
        assert all("act_range" in lin for lin in block["linears"])


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qublast: error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(bundle, tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), *FAST, "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "c")]
    replay = ["--model", str(tiny_model_dir), *REPLAY, "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "c")]
    assert main([*base, "--target", "fpga"]) == 2
    assert "unknown target" in _error_line(capsys)
    assert main(["--model", str(tmp_path / "missing.gguf"), *base[2:]]) == 2
    assert "not found" in _error_line(capsys)
    corrupt = tmp_path / "corrupt" / "recipe.json"
    corrupt.parent.mkdir()
    corrupt.write_text("{not json")
    assert main([*replay, "--recipe", str(corrupt)]) == 2
    assert "not valid JSON" in _error_line(capsys)
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    recipe = json.loads((other / "recipe.json").read_text())
    recipe["model"]["weight_sha256"] = "0" * 64
    (other / "recipe.json").write_text(json.dumps(recipe))
    assert main([*replay, "--recipe", str(other / "recipe.json")]) == 2
    assert "made for weights" in _error_line(capsys)
    assert main([*base, "--target-size", "0.01"]) == 2
    line = _error_line(capsys)
    assert "size budget 0.01 x fp16" in line and "below the smallest whole model on target cpu" in line and "x fp16" in line
    assert main([*base, "--target", "jetson", "--candidates", "fp16,w8,w4"]) == 2
    assert "TensorRT documents weight-only quantization for INT4 only" in _error_line(capsys)
    assert main([*replay, "--target", "jetson", "--recipe", str(bundle / "recipe.json")]) == 2
    assert "made for target 'cpu'" in _error_line(capsys)
    assert not [p.name for p in tmp_path.iterdir() if p.name == "x" or p.name.startswith(".x.")]  # nothing written half


def test_unsupported_model_type(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    assert main(["--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")]) == 2
    assert "unsupported model type 'gpt2'" in _error_line(capsys)


@pytest.mark.parametrize("target, rest_bits", [("cpu", 8), ("jetson", None)])
def test_mixed_format_keeps_the_bulk_linears_at_four_bits(tiny_model_dir, tmp_path, target, rest_bits):
    """``w4m``: the gated MLP's gate/up in w4, every other linear in the target's rest part (w8 on
    the CPU target, fp16 on Jetson), each stored in its own layout in the graph; the block's bytes
    lie between the plain formats'; ONNX Runtime reproduces the PyTorch PPL; TensorRT-legal."""
    from qublast.arch import arch_for

    out = tmp_path / "m"
    assert main(["--model", str(tiny_model_dir), "--target", target, *COMMON, "--uniform", "w4m", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    recipe = read_recipe(out / "recipe.json")
    spec = arch_for(recipe["model"]["model_type"])
    types = {i.name: i.data_type for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    for block in recipe["blocks"]:
        assert block["format"] == "w4m"
        for lin in block["linears"]:
            wanted = 4 if lin["name"] in spec.bulk else rest_bits
            assert lin["bits"] == wanted, lin["path"]
            stored = types.get(f"{lin['path']}.qweight")
            assert stored == {4: onnx.TensorProto.INT4, 8: onnx.TensorProto.INT8, None: None}[wanted], lin["path"]
    assert {lin["name"] for lin in recipe["blocks"][0]["linears"] if lin["bits"] == 4} == set(spec.bulk)
    sens = recipe["blocks"][0]["sensitivity"]
    assert "w4m" in sens
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 0.005
    assert m["size_bytes_blocks"] == sum(b["bytes"] for b in recipe["blocks"])
    assert "`w4m` blocks store mlp.gate_proj, mlp.up_proj in `w4`" in (out / "report.md").read_text()
    if target == "jetson":
        assert violations(onnx.load(str(out / "model.onnx"), load_external_data=False)) == []
