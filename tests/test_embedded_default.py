"""The README's main command takes the embedded defaults: its calibration text must hold the
windows the default flags ask for, with the default model's tokenizer (issue 25: it did not)."""
from __future__ import annotations

import pytest

from qublast.calibrate import CalibConfig
from qublast.text import calib_text, calib_windows, check_disjoint, eval_text, tokenize


def test_embedded_texts_serve_the_default_flags():
    from transformers import AutoTokenizer

    from qublast.models import default_source

    try:
        source = default_source()
    except Exception as exc:  # noqa: BLE001 - the package is installed by both README commands
        pytest.fail(f"the embedded default model is not installed: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    cfg = CalibConfig(target="jetson")
    ids = tokenize(tokenizer, calib_text().text)
    sens, holdout, fit = calib_windows(ids, cfg.calib_seqlen, (cfg.sens_windows, cfg.holdout_windows, cfg.gptq_windows),
                                       seed=cfg.seed)
    assert len(sens) + len(holdout) + len(fit) == cfg.sens_windows + cfg.holdout_windows + cfg.gptq_windows
    check_disjoint(calib_text(), eval_text())  # calibration never reads the evaluation text
