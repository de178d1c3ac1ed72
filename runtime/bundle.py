"""Opening a bundle on the device: manifest check, model session, tokenizer (no torch).

``manifest.json`` (written last by export) lists every file of the bundle: under ``files`` with
its sha256, under ``records`` (version 2) the run's own records, which differ from run to run
(``run.json``: wall times and memory; ``report.md``, which quotes them) and are not loaded here.
``open_bundle`` refuses a bundle with a file missing, changed, or not in the manifest (engine
plans built on the device aside), or of an unknown version, before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from .embedding import FILE, EmbeddingError, EmbeddingTable
from .session import OrtModel
from .trt_session import TrtModel

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "qublast-bundle"
BUNDLE_VERSION = 2
READABLE_BUNDLE_VERSIONS = (1, 2)
SUPPORTED_RECIPE_VERSIONS = (3,)
RECORDS = ("report.md", "run.json")  # what a run measured of itself: listed, not hashed
ENGINE_SUFFIXES = (".plan", ".plan.tmp")  # built on the device after export (build_engine.sh, runtime.build_engine)


class BundleError(Exception):
    """The bundle is missing, incomplete, tampered with, or of an unsupported version."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def device_built(name: str) -> bool:
    """True for a file the device adds to a bundle after export (an engine plan, or one being written)."""
    base = name.rsplit("/", 1)[-1]
    return "/" not in name and (base.endswith(ENGINE_SUFFIXES) or (base.startswith(".model.plan.") and base.endswith(".tmp")))


def bundle_files(bundle: Path) -> list[str]:
    """Relative names of every file under ``bundle`` except the manifest and device-built files."""
    names = (p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if not p.is_dir())
    return sorted(n for n in names if n != MANIFEST and not device_built(n))


def manifest_for(bundle: Path, *, recipe_version: int) -> dict:
    """Manifest of every file under ``bundle``: sha256 of each, the run's records listed by name."""
    names = bundle_files(bundle)
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "recipe_version": recipe_version,
        "files": {n: file_sha256(bundle / n) for n in names if n not in RECORDS},
        "records": [n for n in names if n in RECORDS],
    }


def manifest_names(manifest: dict) -> set[str]:
    """Every file a manifest lists, hashed or recorded."""
    return set(manifest.get("files", {})) | set(manifest.get("records", []))


def _inside(name) -> bool:
    """A manifest name is a relative path inside the bundle."""
    parts = Path(name).parts if isinstance(name, str) else ()
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def verify(bundle: str | Path) -> dict:
    """Check the manifest against the files; returns the parsed recipe."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle}")
    try:
        manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{bundle} has no {MANIFEST}: not a QuBLAST bundle, or written half") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle / MANIFEST} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") not in READABLE_BUNDLE_VERSIONS:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise BundleError(f"{bundle}: unsupported bundle format {found[0]!r} v{found[1]!r}")
    files, records = manifest.get("files"), manifest.get("records", [])
    if not isinstance(files, dict) or not isinstance(records, list):
        raise BundleError(f"{bundle / MANIFEST} is corrupt: no file table")
    bad = [n for n, h in files.items() if not (_inside(n) and isinstance(h, str))]
    bad += [n for n in records if not isinstance(n, str) or n not in RECORDS]  # a record is never a model file
    if bad:
        raise BundleError(f"{bundle / MANIFEST} is corrupt: entry {bad[0]!r}")
    if manifest.get("recipe_version") not in SUPPORTED_RECIPE_VERSIONS:
        raise BundleError(f"{bundle}: recipe version {manifest.get('recipe_version')!r} is not supported by this runtime")
    for name, expected in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{bundle}: file {name} is missing")
        if file_sha256(path) != expected:
            raise BundleError(f"{bundle}: file {name} does not match the manifest (changed after export)")
    for name in manifest.get("records", []):
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle}: file {name} is missing")
    unlisted = [n for n in bundle_files(bundle) if n not in manifest_names(manifest)]
    if unlisted:
        raise BundleError(f"{bundle}: file {unlisted[0]} is not in the manifest"
                          f"{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}: added or changed after export")
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

    def context(self) -> int | None:
        """Most tokens one sequence may hold (prompt and generated, or a scored window): the model's
        positions, and on a TensorRT target the context its engine profiles were written for."""
        limits = [self.recipe.get("model", {}).get("max_positions")]
        profiles = self.path / "engine_profiles.json"
        if profiles.is_file():
            limits.append(json.loads(profiles.read_text(encoding="utf-8")).get("context"))
        limits = [int(n) for n in limits if n]
        return min(limits) if limits else None

    def check_length(self, tokens: int, what: str) -> None:
        """Refuse a sequence of ``tokens`` longer than ``context()`` (``ValueError`` naming ``what``)."""
        limit = self.context()
        if limit is not None and tokens > limit:
            raise ValueError(f"{what} is {tokens} tokens, more than this bundle's context of {limit}")


def open_bundle(path: str | Path, *, backend: str = "ort", threads: int | None = None) -> Bundle:
    """Verify and load a bundle with the ``ort`` (ONNX Runtime) or ``trt`` (TensorRT engine) backend.

    ONNX Runtime runs with the session options the bundle's perplexity was measured with; a
    bundle with ``embedding.safetensors`` gets its rows looked up here and fed as ``inputs_embeds``."""
    path = Path(path)
    recipe = verify(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer" / "tokenizer.json"))
    try:
        table = EmbeddingTable.load(path / FILE) if (path / FILE).is_file() else None
    except EmbeddingError as exc:
        raise BundleError(str(exc)) from exc
    if backend == "ort":
        model = OrtModel(str(path / "model.onnx"), threads=threads, session_config=ort_session(recipe), embedding=table)
    elif backend == "trt":
        plan = path / "model.plan"
        if not (path / "build_engine.sh").is_file():
            raise BundleError(f"{path} was made for target {recipe.get('target', {}).get('name')!r}, which runs on "
                              f"ONNX Runtime: use --backend ort (export with --target jetson for a TensorRT engine)")
        if not plan.is_file():
            raise BundleError(f"{path} has no model.plan: build it on this device with {path / 'build_engine.sh'}")
        model = TrtModel(str(plan), embedding=table)
    else:
        raise BundleError(f"unknown backend {backend!r}; known: ort, trt")
    return Bundle(path, model, tokenizer, recipe)


def ort_session(recipe: dict) -> dict[str, str]:
    """The ONNX Runtime session config entries a bundle's perplexity was measured with."""
    return dict(recipe.get("evaluation", {}).get("ort_session", {}))
