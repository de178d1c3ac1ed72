"""The import structure of qublast/, export/ and runtime/, read from the sources (``ast``, no import):
the module-level imports between the project's modules form no cycle, and an import inside a function
(or an ``if __name__ == "__main__":`` block) is either of a third-party module listed in
``LAZY_THIRD_PARTY`` or a (file, module) pair listed in ``LAZY_IMPORTS``, each with its reason, so a new
lazy import (of the project's own modules above all: how cycles were hidden) fails here.
runtime/'s own rules (no torch, installs alone) are tests/test_runtime_layering.py's."""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qublast", "export", "runtime")

# Third-party modules any file may import inside a function (submodules included): name -> why.
LAZY_THIRD_PARTY = {
    "tensorrt": "device-only: the Jetson image's TensorRT bindings; where absent, the runtime raises BackendUnavailable",
    "cuda": "device-only: cuda-python, needed with TensorRT alone",
    "matplotlib": "the report's figures only: importing qublast.report neither loads matplotlib (~0.3 s) nor picks its backend",
    "datasets": "optional (the datasets extra): only --calib-dataset / --eval-dataset read it",
    "gguf": "read only to check a GGUF input (transformers treats gguf as optional)",
}

# (file, module) pairs allowed inside a function (the module's submodules included): why.
LAZY_IMPORTS = {
    ("qublast/export.py", "export.pipeline"):
        "CLI entry: deferred heavy import (onnx, transformers), so --help and flag errors (exit 2) stay fast",
    ("qublast/calibrate.py", "qublast.export"):
        "python -m qublast.calibrate's __main__ block runs qublast.export's CLI, which imports calibrate: at top level a cycle",
    ("qublast/attention.py", "transformers"):
        "deferred heavy import (~4 s): python -m qublast.export --help reaches attention through calibrate -> evaluate",
    ("runtime/session.py", "onnxruntime"):
        "runtime: only the ort backend needs it; a device running TensorRT engines may lack it",
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository, e.g. "qublast/apply.py"
    line: int
    module: str  # resolved and absolute: "qublast.vocab", "torch", "transformers.masking_utils"
    lazy: bool  # inside a function or a ``__main__`` block: not run when the module is imported
    commented: bool  # the statement carries a trailing comment (the reason)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def imports_of(source: str, *, file: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import statement of a module's ``source``, its targets resolved against ``module``
    (``from X import name`` names the module ``X.name`` where that is one of ``known``)."""
    lines = source.splitlines()
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            anchor = ".".join(parts[: len(parts) - node.level + 1])
            base = f"{anchor}.{base}" if base else anchor
        return sorted({f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names})

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                commented = any("#" in text for text in lines[child.lineno - 1 : child.end_lineno])
                found.extend(Import(file, child.lineno, t, lazy, commented) for t in targets(child))
            deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_main_guard(child)
            visit(child, lazy or deferred)

    visit(ast.parse(source, filename=file), False)
    return found


def tree_imports() -> list[Import]:
    modules = project_modules()
    out = []
    for name, path in modules.items():
        out += imports_of(path.read_text(encoding="utf-8"), file=path.relative_to(ROOT).as_posix(), module=name,
                          is_package=path.name == "__init__.py", known=set(modules))
    return out


def first_party(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def import_graph(imports: list[Import], modules: set[str]) -> dict[str, set[str]]:
    """Module -> the project's modules it imports at module level."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.lazy or not first_party(imp.module):
            continue
        target = imp.module
        while target not in modules and "." in target:  # ``import pkg.mod.attr``: the module that holds it
            target = target.rpartition(".")[0]
        assert target in modules, f"{imp.file}:{imp.line} imports {imp.module}, which is no module of this repository"
        graph[module_name(ROOT / imp.file)].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:  # the shortest way from the component's first module back to it
        start = min(component)
        paths, seen = [[start]], set()
        while paths:
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in component]
            if start in nxt:
                found.append([*path, start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return found


def _allowed(imp: Import) -> str | None:
    """The reason ``imp`` may stay inside a function, or None."""
    for (file, module), why in LAZY_IMPORTS.items():
        if file == imp.file and _under(imp.module, module):
            return why
    top = imp.module.split(".")[0]
    if not first_party(imp.module) and top in LAZY_THIRD_PARTY:
        return LAZY_THIRD_PARTY[top]
    return None


def unexplained(imports: list[Import]) -> list[str]:
    """The lazy imports no list allows, and allowed ones without their comment."""
    bad = []
    for imp in imports:
        if not imp.lazy:
            continue
        if imp.module.split(".")[0] in sys.stdlib_module_names:
            bad.append(f"{imp.file}:{imp.line} imports the standard library's {imp.module} inside a function: move it to the top")
        elif _allowed(imp) is None:
            bad.append(f"{imp.file}:{imp.line} imports {imp.module} inside a function: move it to the top "
                       f"(breaking any cycle that makes), or list it in tests/test_layering.py with its reason")
        elif not imp.commented:
            bad.append(f"{imp.file}:{imp.line} imports {imp.module} inside a function without a comment saying why")
    return bad


# ---------------------------------------------------------------- the tree

def test_module_level_imports_have_no_cycle():
    modules = project_modules()
    graph = import_graph(tree_imports(), set(modules))
    assert "qublast.vocab" in graph["qublast.apply"] and "qublast.blocks" in graph["qublast.device"]  # the graph is read
    assert "qublast.export" not in graph["qublast.calibrate"]  # a __main__ block is not the module
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_lazy_import_is_listed_with_its_reason():
    bad = unexplained(tree_imports())
    assert not bad, "\n".join(bad)


def test_every_listed_lazy_import_still_exists():
    """A list entry nothing uses any more is removed, so the lists say what the tree does."""
    lazy = [imp for imp in tree_imports() if imp.lazy]
    stale = [f"{file}: {module}" for file, module in LAZY_IMPORTS
             if not any(imp.file == file and _under(imp.module, module) for imp in lazy)]
    stale += [name for name in LAZY_THIRD_PARTY if not any(imp.module.split(".")[0] == name for imp in lazy)]
    assert not stale, f"listed but no longer imported inside a function: {stale}"


def test_lazy_third_party_modules_are_third_party():
    assert not any(first_party(name) or name in sys.stdlib_module_names for name in LAZY_THIRD_PARTY)


# ---------------------------------------------------------------- the checks themselves

KNOWN = {"pkg", "pkg.a", "pkg.b", "pkg.c"}


def _imports(source: str, module: str = "pkg.a") -> list[Import]:
    return imports_of(source, file="qublast/a.py", module=module, is_package=False, known=KNOWN)


def test_cycles_are_found_and_printed():
    assert cycles({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert cycles({"pkg.a": {"pkg.a"}}) == [["pkg.a", "pkg.a"]]
    assert cycles({"pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}) == []


def test_imports_are_resolved_and_classified():
    found = _imports(
        "from . import b\n"
        "from .c import thing\n"
        "import torch\n"
        "def f():\n"
        "    from .b import g  # why\n"
        "    import struct\n"
        "class K:\n"
        "    def m(self):\n"
        "        import matplotlib\n"
        "if __name__ == '__main__':\n"
        "    from pkg import c\n")
    assert [(i.module, i.lazy, i.commented) for i in found] == [
        ("pkg.b", False, False), ("pkg.c", False, False), ("torch", False, False), ("pkg.b", True, True),
        ("struct", True, False), ("matplotlib", True, False), ("pkg.c", True, False)]


def test_a_new_lazy_import_fails():
    lazy_own = _imports("def f():\n    from qublast.vocab import x  # some reason\n", module="qublast.a")
    lazy_stdlib = _imports("def f():\n    import struct  # some reason\n")
    lazy_other = _imports("def f():\n    import numpy  # some reason\n")
    allowed = _imports("def f():\n    import matplotlib\n")
    assert len(unexplained(lazy_own)) == len(unexplained(lazy_stdlib)) == len(unexplained(lazy_other)) == 1
    assert "without a comment" in unexplained(allowed)[0]
    assert unexplained(_imports("def f():\n    import matplotlib.pyplot  # figures only\n")) == []
