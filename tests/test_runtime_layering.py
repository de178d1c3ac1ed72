"""runtime/ must run on a Jetson without torch: importing it pulls in no torch, transformers, onnx,
qublast or export; it installs on its own (``pip install ./runtime``, the README's command) into a
bare virtual environment and runs there; the Jetson image holds every module its commands import."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_tensorrt import ENTRYPOINT, _dockerfile_instructions, tiny_graph

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNTIME_PROJECT = ROOT / "runtime" / "pyproject.toml"
DEVICE_SECTIONS = ("## Running a bundle", "## TensorRT engine on the Jetson")  # what the README runs on the device
TORCH_SIDE = {"torch", "transformers", "onnx", "onnx-graphsurgeon", "onnxscript", "accelerate", "gguf", "matplotlib"}
FROM_THE_DEVICE = {"tensorrt", "cuda"}  # the L4T base image's TensorRT bindings; cuda-python, installed by the image


def test_runtime_imports_no_torch():
    code = (
        "import sys, runtime.io_spec, runtime.session, runtime.perplexity, runtime.bundle, runtime.generate, runtime.trt_session, "
        "runtime.embedding, runtime.targets, runtime.engine, runtime.build_engine, runtime.onnx_file\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'onnx', 'tensorrt', 'qublast', 'export') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_target_table_imports_nothing():
    """runtime/targets.py is the one table calibration, export and runtime share: it imports no third-party module."""
    code = (
        "import sys; before = set(sys.modules); import runtime.targets\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new & {'numpy', 'torch', 'onnx', 'onnxruntime', 'tokenizers', 'safetensors', 'qublast', 'export'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- what the README and the image run

def readme_device_text() -> str:
    """The README's sections about running on the device."""
    text, out = README.read_text(encoding="utf-8"), []
    for title in DEVICE_SECTIONS:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        out.append(text[start : end if end >= 0 else len(text)])
    return "\n".join(out)


def runtime_install_command() -> list[str]:
    """The one ``pip install`` line of the README's device sections, split into words."""
    lines = [line.strip() for line in readme_device_text().splitlines() if line.strip().startswith("pip install")]
    assert len(lines) == 1, f"the README's device sections should give one install command, found {lines}"
    return shlex.split(lines[0])


def python_modules(text: str) -> set[str]:
    """Modules run as ``python -m X`` / ``python3 -m X`` / ``"$PYTHON" -m X`` in shell text (comments dropped)."""
    code = "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else "" for line in text.splitlines())
    return set(re.findall(r"""(?:python3?|"\$PYTHON")\s+-m\s+([A-Za-z_][\w.]*)""", code))


def image_entry_modules() -> set[str]:
    """What the image runs: ``-m`` modules of its entrypoint script and the ``python3 -c`` import checks of its RUN lines."""
    instructions = _dockerfile_instructions()
    entry = json.loads(next(args for word, args in instructions if word == "ENTRYPOINT"))[0]
    script = next(args.split()[0] for word, args in instructions if word == "COPY" and args.split()[-1] == entry)
    assert ROOT / script == ENTRYPOINT
    modules = python_modules(ENTRYPOINT.read_text(encoding="utf-8"))
    for word, args in instructions:
        words = shlex.split(args) if word == "RUN" else []
        for i, token in enumerate(words[:-1]):
            if token == "-c" and words[i - 1].startswith("python"):
                modules |= _imported(ast.parse(words[i + 1]), package="")[0]
    return modules


def _imported(tree: ast.AST, *, package: str) -> tuple[set[str], set[str]]:
    """(modules certainly imported, names that are imported modules only if such a module exists),
    anywhere in ``tree`` (function-level imports included); relative imports resolved against ``package``."""
    sure, maybe = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sure.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            sure.add(base)
            maybe.update(f"{base}.{alias.name}" for alias in node.names)  # `from runtime import engine`
    return sure, maybe


def _source(module: str) -> Path | None:
    """The repository file of a first-party module, or None."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def import_closure(roots: set[str]) -> tuple[dict[str, Path], set[str]]:
    """First-party modules (name -> file) reached from ``roots`` through every import of their source,
    and the top-level names of the third-party modules they import (the standard library left out)."""
    first_party = {p.stem for p in ROOT.iterdir() if p.is_dir() or p.suffix == ".py"}
    found, third, todo = {}, set(), [(name, True) for name in roots]
    while todo:
        name, required = todo.pop()
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or name in found:
            continue
        if top not in first_party:
            third.add(top)
            continue
        path = _source(name)
        if path is None:
            assert not required, f"{name} is imported but is no module of this repository"
            continue
        found[name] = path
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # a.b.c imports a and a.b
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        sure, maybe = _imported(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), package=package)
        todo += [(n, True) for n in [*parents, *sure]] + [(n, False) for n in maybe]
    return found, third


def runtime_dependencies() -> set[str]:
    """Import names of the runtime project's dependencies (each distribution imports as its own name)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    deps = tomllib.loads(RUNTIME_PROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    return {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower().replace("-", "_") for d in deps}


def test_jetson_image_holds_every_module_its_commands_import():
    """The image copies runtime/ and installs it as its own project: every first-party module its
    entrypoint, its import check and the README's device commands reach (recursively, lazy imports
    included) is in what it copies and in the runtime package; every third-party one is a declared
    dependency of the runtime or comes with the device (TensorRT, cuda-python)."""
    instructions = _dockerfile_instructions()
    copied = [Path(s.rstrip("/")) for word, args in instructions if word == "COPY" for s in args.split()[:-1]
              if not s.startswith("--")]
    roots = image_entry_modules() | python_modules(readme_device_text())
    assert {"runtime.generate", "runtime.perplexity", "runtime.build_engine"} <= roots
    modules, third = import_closure(roots)
    assert "runtime.onnx_file" in modules and "runtime.trt_session" in modules  # the builder's own reader, lazy TensorRT
    for name, path in sorted(modules.items()):
        relative = path.relative_to(ROOT)
        assert any(relative == c or c in relative.parents for c in copied), f"{name} ({relative}) is not copied into the image"
        assert name.split(".")[0] == "runtime", f"{name} is not part of the runtime package the image installs"
    assert third <= runtime_dependencies() | FROM_THE_DEVICE, f"undeclared third-party imports: {sorted(third - runtime_dependencies())}"
    assert third >= {"numpy", "onnxruntime", "tokenizers", "safetensors", "tensorrt"}
    pip = " ".join(args for word, args in instructions if word == "RUN" and "pip install" in args)
    assert set(runtime_install_command()[2:]) <= set(shlex.split(pip)) and "cuda-python" in pip  # installed as the README says
    env = " ".join(args for word, args in instructions if word == "ENV")
    assert "/usr/src/tensorrt/bin" in env  # trtexec, which the bundle's build_engine.sh runs


# ---------------------------------------------------------------- the runtime alone in a bare virtual environment

def _clean_env() -> dict[str, str]:
    """This environment without what would let the venv see this repository or this interpreter's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}


def _run(argv: list, *, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, env=_clean_env(), timeout=timeout)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv without system site packages, the runtime installed the README's way; its python."""
    root = tmp_path_factory.mktemp("runtime-venv")
    source = root / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "runtime", source / "runtime", ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    made = _run([sys.executable, "-m", "venv", root / "venv"], cwd=root)
    assert made.returncode == 0, made.stderr
    python = root / "venv" / "bin" / "python"
    command = runtime_install_command()
    assert command[:2] == ["pip", "install"] and "-e" not in command and "--editable" not in command
    installed = _run([python, "-m", *command], cwd=source, timeout=600)
    if installed.returncode != 0:
        probe = _run([python, "-m", "pip", "download", "--no-deps", "--dest", root / "probe", "numpy"], cwd=root, timeout=300)
        if probe.returncode != 0:
            pytest.skip(f"pip cannot reach the package registry: {probe.stderr.strip().splitlines()[-1:]}")
        pytest.fail(f"{' '.join(command)} failed in a fresh venv:\n{installed.stdout[-3000:]}\n{installed.stderr[-3000:]}")
    return python


def tiny_runtime_bundle(folder: Path) -> Path:
    """A CPU bundle the runtime opens: io_spec's tiny 2-layer graph, an 11-word tokenizer, recipe, manifest."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from runtime.bundle import MANIFEST, manifest_for

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "it"]  # VOCAB = 11 tokens
    folder.mkdir(parents=True)
    tiny_graph(folder / "model.onnx")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer").mkdir()
    tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
    recipe = {"version": 3, "target": {"name": "cpu"}, "model": {"max_positions": 16}, "metrics": {"seqlen": 8},
              "evaluation": {"windows": 2, "ort_session": {}}}
    (folder / "recipe.json").write_text(json.dumps(recipe))
    (folder / MANIFEST).write_text(json.dumps(manifest_for(folder, recipe_version=3)))
    return folder


def test_runtime_installs_alone(runtime_venv):
    listed = _run([runtime_venv, "-m", "pip", "list", "--format", "json"], cwd=runtime_venv.parent)
    assert listed.returncode == 0, listed.stderr
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"qublast-runtime", "numpy", "onnxruntime", "safetensors", "tokenizers"} <= names
    assert not names & TORCH_SIDE, f"the runtime pulled in {sorted(names & TORCH_SIDE)}"
    assert "qublast" not in names


def test_runtime_runs_in_the_bare_venv(runtime_venv, tmp_path):
    """--help of every runtime command, then generation and perplexity on a tiny bundle, equal to this
    environment's, and the builder reading the bundle up to the missing TensorRT."""
    bundle = tiny_runtime_bundle(tmp_path / "bundle")
    text = tmp_path / "text.raw"
    text.write_text(" the cat sat on the mat a dog ran to it\n\n the dog sat on a cat it ran to the mat\n" * 2)
    where = _run([runtime_venv, "-c", "import runtime, onnxruntime; print(runtime.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(runtime_venv.parents[1])  # the installed copy, not the repository's
    for module in ("runtime.generate", "runtime.perplexity", "runtime.build_engine"):
        helped = _run([runtime_venv, "-m", module, "--help"], cwd=tmp_path)
        assert helped.returncode == 0 and "--bundle" in helped.stdout, (module, helped.stderr)
    for argv in (["runtime.generate", "--bundle", bundle, "--prompt", "the cat sat", "--max-new-tokens", "6"],
                 ["runtime.perplexity", "--bundle", bundle, "--text", text]):
        ours = _run([runtime_venv, "-m", *argv], cwd=tmp_path)
        reference = _run([sys.executable, "-m", *argv], cwd=ROOT)
        assert ours.returncode == 0 and reference.returncode == 0, (ours.stderr, reference.stderr)
        if argv[0] == "runtime.generate":
            assert ours.stdout.strip() and ours.stdout == reference.stdout
        else:
            assert ours.stdout.split()[:2] == reference.stdout.split()[:2] and ours.stdout.startswith("PPL ")
    built = _run([runtime_venv, "-m", "runtime.build_engine", "--bundle", bundle, "--context", "16"], cwd=tmp_path)
    assert built.returncode == 2
    assert built.stderr.strip().splitlines() == [built.stderr.strip()] and "TensorRT's Python bindings are not installed" in built.stderr
    assert not (bundle / "model.plan").exists()
