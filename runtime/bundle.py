"""Opening a bundle on the device: manifest check, model session, tokenizer (no torch).

``manifest.json`` (written last by export) lists every file of the bundle with its sha256 and
the recipe version. ``open_bundle`` refuses a bundle whose files are missing, changed or of an
unknown version before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "qublast-bundle"
BUNDLE_VERSION = 1
SUPPORTED_RECIPE_VERSIONS = (3,)


class BundleError(Exception):
    """The bundle is missing, incomplete, tampered with, or of an unsupported version."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(bundle: Path, *, recipe_version: int) -> dict:
    """Manifest of every file under ``bundle`` (except the manifest and engine plans built on the device)."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST and p.suffix != ".plan")
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "recipe_version": recipe_version,
        "files": {str(p.relative_to(bundle)): file_sha256(p) for p in files},
    }


def verify(bundle: str | Path) -> dict:
    """Check the manifest against the files; returns the parsed recipe."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle}")
    try:
        manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{bundle} has no {MANIFEST}: not a QuBLAST bundle, or written half") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{bundle / MANIFEST} is corrupt: {exc}") from exc
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{bundle}: unsupported bundle format {manifest.get('format')!r} v{manifest.get('version')!r}")
    if manifest.get("recipe_version") not in SUPPORTED_RECIPE_VERSIONS:
        raise BundleError(f"{bundle}: recipe version {manifest.get('recipe_version')!r} is not supported by this runtime")
    for name, expected in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{bundle}: file {name} is missing")
        if file_sha256(path) != expected:
            raise BundleError(f"{bundle}: file {name} does not match the manifest (changed after export)")
    return json.loads((bundle / "recipe.json").read_text(encoding="utf-8"))


@dataclass
class Bundle:
    """A verified bundle: the model session, its tokenizer and its recipe."""

    path: Path
    model: object  # OrtModel or TrtModel: forward(input_ids, past) -> (logits, presents)
    tokenizer: object  # tokenizers.Tokenizer
    recipe: dict

    def eos_id(self) -> int | None:
        """Id of the tokenizer's end-of-sequence token, from tokenizer_config.json."""
        config = self.path / "tokenizer" / "tokenizer_config.json"
        if not config.is_file():
            return None
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        return self.tokenizer.token_to_id(eos) if eos else None


def open_bundle(path: str | Path, *, backend: str = "ort", threads: int | None = None) -> Bundle:
    """Verify and load a bundle with the ``ort`` (ONNX Runtime) or ``trt`` (TensorRT engine) backend.

    ONNX Runtime runs with the session options the bundle's perplexity was measured with; a
    bundle with ``embedding.safetensors`` gets its rows looked up here and fed as ``inputs_embeds``."""
    from tokenizers import Tokenizer

    from .embedding import FILE, EmbeddingError, EmbeddingTable

    path = Path(path)
    recipe = verify(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer" / "tokenizer.json"))
    try:
        table = EmbeddingTable.load(path / FILE) if (path / FILE).is_file() else None
    except EmbeddingError as exc:
        raise BundleError(str(exc)) from exc
    if backend == "ort":
        from .session import OrtModel

        model = OrtModel(str(path / "model.onnx"), threads=threads, session_config=ort_session(recipe), embedding=table)
    elif backend == "trt":
        from .trt_session import TrtModel

        plan = path / "model.plan"
        if not plan.is_file():
            raise BundleError(f"{path} has no model.plan: build it on this device with {path / 'build_engine.sh'}")
        model = TrtModel(str(plan), embedding=table)
    else:
        raise BundleError(f"unknown backend {backend!r}; known: ort, trt")
    return Bundle(path, model, tokenizer, recipe)


def ort_session(recipe: dict) -> dict[str, str]:
    """The ONNX Runtime session config entries a bundle's perplexity was measured with."""
    return dict(recipe.get("evaluation", {}).get("ort_session", {}))
