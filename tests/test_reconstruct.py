"""Cross-block reconstruction on a tiny model: it lowers the window error, keeps codes and the
deployed format, and its recipe replays exactly through ONNX Runtime."""
from __future__ import annotations

import torch

from qublast.apply import BlockTransform
from qublast.arch import arch_for
from qublast.formats import get_format, get_target
from qublast.reconstruct import reconstruct
from qublast.vocab import VocabTransform
from tests.tiny import VOCAB, tiny_model


def test_reconstruction_lowers_the_window_error_and_keeps_the_codes():
    model = tiny_model("llama")
    spec = arch_for("llama")
    target = get_target("jetson")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    transforms = [BlockTransform(get_format("w4", target)) for _ in range(2)]
    vocab = VocabTransform.of(target, embed="fp16", head="fp16")
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    tuned, records = reconstruct(model, spec, transforms, vocab, ids, window=2, steps=30, log=lambda _m: None)
    assert len(records) == 1 and records[0]["after"] < records[0]["before"]
    for t in tuned:
        assert t.quantizer == "rtn+cbq" and set(t.codes) == set(spec.linears)
        for qw in t.codes.values():
            assert torch.equal(qw.scale, qw.scale.half().float()) and bool((qw.scale > 0).all())
            assert int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
    for name, p in model.named_parameters():  # the model comes back as it went in
        assert torch.equal(p, before[name]), name


def test_reconstructed_bundle_replays_exactly(tiny_model_dir, tmp_path):
    from qublast.export import main
    from qublast.recipe import read_recipe

    out = tmp_path / "r"
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2",
                 "--holdout-windows", "2", "--seqlen", "32", "--max-eval-windows", "3", "--uniform", "w4",
                 "--reconstruct", "2", "--reconstruct-steps", "10", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    recipe = read_recipe(out / "recipe.json")
    assert all(b["quantizer"].endswith("+cbq") for b in recipe["blocks"])
    assert recipe["allocation"]["reconstruction"][0]["after"] <= recipe["allocation"]["reconstruction"][0]["before"]
    costs = recipe["calibration"]["costs"]
    assert costs["reconstructions"] == 1 and costs["reconstruction_s"] > 0  # a fixed plan is reconstructed once
    assert f"cross-block reconstruction {costs['reconstruction_s']:.0f} s (1 plan reconstructed)" in (out / "report.md").read_text()
    m = recipe["metrics"]
    assert abs(m["ppl_quant_ort"] / m["ppl_quant_torch"] - 1) < 1e-4
