"""runtime/: sampling, streaming generation through the KV cache, manifest checks, CLIs on a tiny bundle."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from runtime import generate as rgen
from runtime import perplexity as rppl
from runtime.bundle import BundleError, open_bundle, verify
from runtime.generate import Sampling, generate_ids, next_token
from tests.test_pipeline_tiny import bundle  # noqa: F401  (module-scoped tiny bundle fixture)


def test_greedy_and_degenerate_sampling_pick_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.9])
    rng = np.random.default_rng(0)
    assert next_token(logits, Sampling(), rng) == 1
    assert next_token(logits, Sampling(temperature=1.0, top_k=1), rng) == 1
    assert next_token(logits, Sampling(temperature=1.0, top_p=1e-6), rng) == 1


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    draw = lambda s: [next_token(logits, s, np.random.default_rng(s.seed + k)) for k in range(400)]  # noqa: E731
    assert draw(Sampling(temperature=1.0, seed=3)) == draw(Sampling(temperature=1.0, seed=3))
    assert set(draw(Sampling(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draw(Sampling(temperature=1.0, top_p=0.65))) == {0, 1}  # 0.4 + 0.3 covers 0.65
    counts = np.bincount(draw(Sampling(temperature=1.0)), minlength=4) / 400
    assert np.allclose(counts, [0.4, 0.3, 0.2, 0.1], atol=0.08)
    with pytest.raises(ValueError):
        Sampling(top_p=0)


class _CountingModel:
    """Fake model: next token = (last token + 1) % 10; records the shapes it was fed."""

    def __init__(self):
        self.calls = []

    def forward(self, ids, past=None):
        self.calls.append((ids.shape, None if past is None else past[0]))
        logits = np.zeros((1, ids.shape[1], 10), np.float32)
        logits[0, -1, (ids[0, -1] + 1) % 10] = 1.0
        return logits, [(0 if past is None else past[0]) + ids.shape[1]]


def test_generate_prefills_once_then_decodes_one_token_per_step():
    model = _CountingModel()
    assert list(generate_ids(model, [3, 4], max_new_tokens=4)) == [5, 6, 7, 8]
    assert model.calls == [((1, 2), None), ((1, 1), 2), ((1, 1), 3), ((1, 1), 4)]
    assert list(generate_ids(_CountingModel(), [3], max_new_tokens=9, stop_ids=(6,))) == [4, 5, 6]


def test_manifest_refuses_tampered_or_incomplete_bundles(bundle, tmp_path):  # noqa: F811
    assert verify(bundle)["format"] == "qublast-recipe"
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "recipe.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="recipe.json does not match"):
        verify(copy)
    shutil.copy(bundle / "recipe.json", copy / "recipe.json")
    with open(copy / "report.md", "a") as f:  # a record: listed, not hashed (it quotes wall times)
        f.write("edited")
    assert verify(copy)["format"] == "qublast-recipe"
    (copy / "notes.txt").write_text("added after export")
    with pytest.raises(BundleError, match="file notes.txt is not in the manifest"):
        verify(copy)
    (copy / "notes.txt").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["tokenizer/tokenizer.json"]  # an entry lost, then the file changed: refused
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json is not in the manifest"):
        verify(copy)
    shutil.copy(bundle / "manifest.json", copy / "manifest.json")
    shutil.copy(bundle / "tokenizer" / "tokenizer.json", copy / "tokenizer" / "tokenizer.json")
    (copy / "scales.safetensors").unlink()
    with pytest.raises(BundleError, match="scales.safetensors is missing"):
        verify(copy)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recipe_version"] = 99
    shutil.copy(bundle / "scales.safetensors", copy / "scales.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="recipe version 99"):
        verify(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(copy)


def test_runtime_greedy_tokens_match_pytorch_fake_quant(bundle, tiny_model_dir, capsys):  # noqa: F811
    from qublast.apply import fold_recipe, quantize_recipe
    from qublast.models import load_model, resolve_source
    from qublast.recipe import read_recipe, read_tensors, validate

    model, tokenizer, spec = load_model(resolve_source(str(tiny_model_dir)))
    recipe, tensors = validate(read_recipe(bundle / "recipe.json")), read_tensors(bundle / "scales.safetensors")
    fold_recipe(model, spec, recipe, tensors)
    quantize_recipe(model, spec, recipe, tensors)
    b = open_bundle(bundle)
    for prompt in ("The lobster", "In 1905 the", "= Valkyria ="):
        ids = b.tokenizer.encode(prompt, add_special_tokens=False).ids
        ours = list(generate_ids(b.model, ids, max_new_tokens=8))
        seq = list(ids)
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert ours == seq[len(ids):], prompt
    assert rgen.main(["--bundle", str(bundle), "--prompt", "The lobster", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_runtime_perplexity_reproduces_the_recipe(bundle, capsys):  # noqa: F811
    from importlib import resources

    text = resources.files("qublast.data").joinpath("wikitext2_test_excerpt.raw")
    assert rppl.main(["--bundle", str(bundle), "--text", str(text)]) == 0
    out = capsys.readouterr().out
    recorded = json.loads((bundle / "recipe.json").read_text())["metrics"]["ppl_quant_ort"]
    measured = float(out.split()[1])
    assert measured == pytest.approx(recorded, rel=1e-5)


def test_paired_shift_is_the_mean_per_token_gap_and_its_standard_error():
    nll = np.array([10.0, 14.0, 12.0, 20.0])  # summed NLL of 4 windows of 2 predicted tokens
    ref = np.array([8.0, 8.0, 10.0, 12.0])
    dce, stderr = rppl.paired_shift(nll / 2, ref / 2)
    gaps = np.array([1.0, 3.0, 1.0, 4.0])
    assert dce == pytest.approx(gaps.mean())
    assert stderr == pytest.approx(gaps.std(ddof=1) / 2.0)
    assert rppl.paired_shift([1.5], [0.5])[1] == float("inf")
    with pytest.raises(ValueError, match="same non-zero count"):
        rppl.paired_shift([], [])
    with pytest.raises(ValueError, match="same non-zero count"):
        rppl.paired_shift([1.0, 2.0], [1.0])


def test_runtime_perplexity_against_a_reference_pairs_the_windows(bundle, tmp_path, capsys):  # noqa: F811
    from importlib import resources

    text = str(resources.files("qublast.data").joinpath("wikitext2_test_excerpt.raw"))
    assert rppl.main(["--bundle", str(bundle), "--text", text, "--max-windows", "3", "--against", str(bundle)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "paired over 3 windows: dCE 0.00000" in line and "standard error 0.00000" in line, line
    assert rppl.main(["--bundle", str(bundle), "--text", text, "--against", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert "bundle not found" in captured.err and "PPL" not in captured.out  # refused before any window is scored


def test_runtime_clis_reject_bad_input(bundle, tmp_path, capsys):  # noqa: F811
    assert rppl.main(["--bundle", str(tmp_path / "nope"), "--text", __file__]) == 2
    assert "bundle not found" in capsys.readouterr().err
    assert rppl.main(["--bundle", str(bundle), "--text", str(tmp_path / "missing.txt")]) == 2
    assert rgen.main(["--bundle", str(bundle), "--prompt", "x", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.count("qublast: error:") == 2


def test_runtime_text_protocol_matches_calibration_side(tmp_path):
    from qublast.text import eval_text

    path = tmp_path / "w.raw"
    path.write_text(" \n = Title = \n \n Some text , here .\n \n")
    assert rppl.wikitext_text(path) == eval_text(path=str(path)).text
