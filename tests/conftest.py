"""Shared fixtures: the real-model assets (integration) and a tiny local HF model directory."""
from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
GGUF = ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_TEST = ASSETS / "wikitext-2" / "wiki.test.raw"
WIKI_CALIB = ASSETS / "wikitext-2" / "wiki.valid.calib.txt"


@pytest.fixture(scope="session")
def assets() -> Path:
    """../shared/assets, or a skip that says why (integration tests only)."""
    if not (GGUF.is_file() and WIKI_TEST.is_file() and WIKI_CALIB.is_file()):
        pytest.skip(f"integration assets not found at {ASSETS} (SmolLM2 GGUF + WikiText-2)")
    return ASSETS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local HF directory with a trained BPE tokenizer."""
    from qublast.text import calib_text
    from tests.tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer(calib_text().text).save_pretrained(path)
    return path
