"""QuBLAST side by side with the tools users would pick instead, in one resumable run (issue 27).

    python -m benchmarks.peers [--model FILE] [--out DIR] [--windows 40] [--points NAME,...]
                               [--speed] [--list]

Every point is a graph ONNX Runtime runs, measured the same way on the same windows of the same
text: size from the files it deploys (``model.onnx``, its external data and a host embedding
table; the tokenizer and reports are not counted), WikiText-2 PPL through ONNX Runtime on the
first ``--windows`` windows of ``--seqlen`` (512) tokens of the test split, and the wall time and peak RSS of the process
that produced it. With ``--speed``, prefill-512 and decode ms/token at 1 and 2 threads, all points
in one interleaved run (``benchmarks/ort_speed.py``'s method).

Points (``--list`` prints them): the fp32 and fp16 graphs (QuBLAST's exporter with every unit
fp16: the CPU target's graph is fp32, the Jetson target's fp16); ONNX Runtime's
``MatMulNBitsQuantizer`` on the fp32 graph (affine and symmetric RTN, HQQ, at block sizes 32 and
128, with ``lm_head`` quantized and kept fp32; ``k_quant``; 8-bit); ``quantize_dynamic`` (INT8);
QuBLAST at fixed budgets on both targets. The peers' graphs are what those tools write, run with
ONNX Runtime's default session options; QuBLAST's bundles run with theirs (``runtime.bundle``).
Jetson points are fp16 graphs measured in ONNX Runtime on the CPU, not TensorRT engines.

Resumable: ``DIR/results.json`` gets each point as soon as it is measured, and a point's files are
written under a temporary name and renamed when complete, so a killed run continues with the
next point not yet in the results (a point made but not measured is measured, with the cost its
making recorded in ``DIR/costs``). Nothing outside ``DIR`` is written; an existing ``DIR`` that is
not this command's results (no ``results.json`` for the same model and text) is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
DEFAULT_MODEL = ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = ASSETS / "wikitext-2" / "wiki.test.raw"
DEFAULT_CALIB = ASSETS / "wikitext-2" / "wiki.valid.calib.txt"
DEPLOYED = ("model.onnx", "model.onnx.data", "embedding.safetensors")  # what a graph deploys
# QuBLAST's budgets, fixed before any run (issue 27: not tuned to the peers' points)
BUDGETS = (("ppl0.5", ["--max-ppl-increase", "0.005"]), ("ppl1", ["--max-ppl-increase", "0.01"]),
           ("ppl2", ["--max-ppl-increase", "0.02"]), ("ppl5", ["--max-ppl-increase", "0.05"]),
           ("ppl10", ["--max-ppl-increase", "0.10"]), ("size30", ["--target-size", "0.3"]))


@dataclass(frozen=True)
class Point:
    name: str
    tool: str  # "fp", "ort", "qublast"
    params: dict = field(default_factory=dict)


def points() -> list[Point]:
    """Every point of a run, in the order they are produced (the fp32 graph first: the ORT points quantize it)."""
    out = [Point("fp32", "fp", {"target": "cpu"}), Point("fp16", "fp", {"target": "jetson"})]
    for block in (32, 128):
        for head in (False, True):
            suffix = f"b{block}" + ("-head" if head else "")
            out.append(Point(f"ort-rtn-asym-{suffix}", "ort", {"algo": "default", "bits": 4, "block": block, "symmetric": False, "head": head}))
            out.append(Point(f"ort-rtn-sym-{suffix}", "ort", {"algo": "default", "bits": 4, "block": block, "symmetric": True, "head": head}))
            out.append(Point(f"ort-hqq-{suffix}", "ort", {"algo": "hqq", "bits": 4, "block": block, "head": head}))
    for head in (False, True):
        suffix = "-head" if head else ""
        out.append(Point(f"ort-kquant{suffix}", "ort", {"algo": "k_quant", "bits": 4, "block": 32, "head": head}))
        out.append(Point(f"ort-int8-b128{suffix}", "ort", {"algo": "default", "bits": 8, "block": 128, "symmetric": True, "head": head}))
    out.append(Point("ort-dynamic-int8", "ort", {"algo": "dynamic"}))
    for algo in ("rtn", "k_quant_mixed", "k_quant_last"):
        for shared in (False, True):
            out.append(Point(f"genai-{algo.replace('_', '')}" + ("-shared" if shared else ""), "genai", {"algo": algo, "shared": shared}))
    for method in ("rtn_dq", "awq_clip", "awq_lite"):
        for mixed in (False, True) if method != "awq_lite" else (False,):  # ModelOpt 0.47 has no mixed awq_lite per subgraph
            out.append(Point(f"modelopt-{method.replace('_', '')}" + ("-mixed" if mixed else ""), "modelopt", {"method": method, "mixed": mixed}))
    for target in ("cpu", "jetson"):
        for label, flags in BUDGETS:
            out.append(Point(f"qublast-{target}-{label}", "qublast", {"target": target, "flags": flags}))
        out.append(Point(f"qublast-{target}-uniform-w4", "qublast", {"target": target, "flags": ["--uniform", "w4"]}))
    out.append(Point("qublast-cpu-uniform-w8", "qublast", {"target": "cpu", "flags": ["--uniform", "w8"]}))  # no w8 on jetson
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="evaluation text (WikiText raw layout)")
    p.add_argument("--calib-text", default=str(DEFAULT_CALIB))
    p.add_argument("--out", help="results folder (default benchmarks/results/peers-<model file stem>)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512, help="evaluation and calibration window length")
    p.add_argument("--points", help="comma-separated point names (default: all)")
    p.add_argument("--speed", action="store_true", help="prefill / decode speed of every measured point")
    p.add_argument("--whole-split", metavar="NAME,...",
                   help="measured points whose PPL is measured once more on every window of the text (the headline points)")
    p.add_argument("--list", action="store_true", help="print the points and exit")
    p.add_argument("--modelopt-python", default=os.environ.get("QUBLAST_MODELOPT_PYTHON"),
                   help="python of a venv with nvidia-modelopt[onnx] (its pins conflict with QuBLAST's; "
                        "default $QUBLAST_MODELOPT_PYTHON; without it the ModelOpt points are reported as skipped, with why)")
    p.add_argument("--make", help=argparse.SUPPRESS)  # internal: produce one point in this process
    args = p.parse_args(argv)
    every = {pt.name: pt for pt in points()}
    if args.list:
        for pt in every.values():
            print(f"{pt.name:28s} {pt.tool:8s} {json.dumps(pt.params)}")
        return 0
    try:
        chosen = _chosen(args.points, every)
        whole = [pt.name for pt in _chosen(args.whole_split, every)] if args.whole_split else []
        if args.windows < 1 or args.seqlen < 2:
            raise ValueError(f"--windows must be >= 1 and --seqlen >= 2, got {args.windows}, {args.seqlen}")
        if not Path(args.model).exists():
            raise ValueError(f"--model {args.model} does not exist (a GGUF file or a folder with safetensors)")
        if args.modelopt_python and not Path(args.modelopt_python).is_file():
            raise ValueError(f"--modelopt-python {args.modelopt_python} is not a file")
        for flag in ("text", "calib_text"):
            if not Path(getattr(args, flag)).is_file():
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a file")
        out = Path(args.out or ROOT / "benchmarks" / "results" / f"peers-{Path(args.model).stem}")
        identity = {"model": str(Path(args.model).resolve()), "text": str(Path(args.text).resolve()), "windows": args.windows,
                    "seqlen": args.seqlen}
        results = _open_results(out, identity)
    except ValueError as exc:
        print(f"peers: error: {exc}", file=sys.stderr)
        return 2
    if args.make:
        _make(every[args.make], out, args)
        return 0
    for name, r in results["points"].items():  # results measured before block-linear bytes were recorded
        if "bytes" in r and "bytes_blocks" not in r:
            r["bytes_blocks"], r["bytes_head"] = linear_bytes(out / "points" / name / "model.onnx")
    todo = [pt for pt in chosen if pt.name not in results["points"]]
    print(f"peers: {len(chosen)} points, {len(chosen) - len(todo)} already recorded in {out / 'results.json'}", file=sys.stderr)
    if any(pt.tool == "ort" for pt in todo) and "fp32" not in [pt.name for pt in chosen]:
        todo.insert(0, every["fp32"])  # the ORT points quantize the fp32 graph
    for k, pt in enumerate(todo, 1):
        print(f"peers: [{k}/{len(todo)}] {pt.name}", file=sys.stderr, flush=True)
        try:
            results["points"][pt.name] = _produce_and_measure(pt, out, args)
        except _Skipped as exc:  # a dependency missing here, or a budget the model cannot have: recorded, with why
            results["points"][pt.name] = {**asdict(pt), exc.kind: str(exc), **exc.cost}
            print(f"peers: {pt.name} {exc.kind}: {exc}", file=sys.stderr)
        except RuntimeError as exc:
            print(f"peers: error: {pt.name}: {exc}", file=sys.stderr)
            return 1
        _write_json(out / "results.json", results)
    for name in whole:
        r = results["points"].get(name, {})
        if "bytes" in r and "ppl_whole" not in r:
            print(f"peers: {name} on every window of {args.text}", file=sys.stderr, flush=True)
            r["ppl_whole"], r["tokens_whole"] = _whole_split(Point(**{k: r[k] for k in ("name", "tool", "params")}), out, args)
            _write_json(out / "results.json", results)
    if args.speed:
        _speed(results, out, [pt.name for pt in chosen], args.seqlen)
        _write_json(out / "results.json", results)
    print(write_reports(results, out))
    return 0


def write_reports(results: dict, out: Path) -> str:
    """results.md (the table and the frontier per peer) and pareto.png into ``out``; the markdown."""
    table = summary_table(results) + "\n" + frontier_table(results)
    (out / "results.md").write_text(table, encoding="utf-8")
    pareto_plot(results, out / "pareto.png")
    return table


def _chosen(names: str | None, every: dict[str, Point]) -> list[Point]:
    if not names:
        return list(every.values())
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in every]
    if unknown:
        raise ValueError(f"unknown point(s) {', '.join(unknown)}; --list prints them")
    return [every[n] for n in wanted]


def _open_results(out: Path, identity: dict) -> dict:
    path = out / "results.json"
    if out.exists():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ValueError(f"--out {out} exists and holds no results of this command: not touching it") from None
        if results.get("identity") != identity:
            raise ValueError(f"--out {out} holds results for another model, text or window count: give another --out")
        return results
    out.mkdir(parents=True)
    results = {"identity": identity, "points": {}}
    _write_json(path, results)
    return results


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


MARKERS = (("SKIPPED", "skipped"), ("INFEASIBLE", "infeasible"))  # a point's folder holding one was not produced


class _Skipped(Exception):
    """A point not produced, with why: "skipped" where this machine cannot produce it (a method's
    optional dependency is not installed), "infeasible" where the model cannot have it (the export
    refused its budget, e.g. a size below the smallest model the target can hold)."""

    def __init__(self, reason: str, kind: str = "skipped", cost: dict | None = None):
        super().__init__(reason)
        self.kind, self.cost = kind, cost or {}


def _produce_and_measure(pt: Point, out: Path, args) -> dict:
    """Produce the point in a child process (its wall time and peak RSS are the point's cost), then measure it."""
    folder = out / "points" / pt.name
    cost_file = out / "costs" / f"{pt.name}.json"  # kept apart: a measurement that fails later does not lose it
    cost = json.loads(cost_file.read_text(encoding="utf-8")) if folder.is_dir() and cost_file.is_file() else {}
    if not folder.is_dir():
        command = [sys.executable, "-m", "benchmarks.peers", "--make", pt.name, "--out", str(out), "--model", args.model,
                   "--text", args.text, "--calib-text", args.calib_text, "--windows", str(args.windows), "--seqlen", str(args.seqlen),
                   *(["--modelopt-python", args.modelopt_python] if args.modelopt_python else [])]
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        cost = {"seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024}
        if child.returncode != 0:
            raise RuntimeError(f"producing it failed (exit code {child.returncode}); see the output above")
        if not any((folder / marker).is_file() for marker, _ in MARKERS):
            cost_file.parent.mkdir(exist_ok=True)
            _write_json(cost_file, cost)
    for marker, kind in MARKERS:  # checked on a resumed run too (killed before the folder was removed)
        if (folder / marker).is_file():
            reason = (folder / marker).read_text(encoding="utf-8").strip()
            shutil.rmtree(folder)
            raise _Skipped(reason, kind, cost if kind == "infeasible" else None)  # a refusal can come after the sweep
    model = _open(pt, folder)
    from runtime.perplexity import perplexity, windows

    ppl = perplexity(model, windows(_text_ids(out, args), args.seqlen, max_windows=args.windows), progress=False)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.name in DEPLOYED}
    blocks, head = linear_bytes(folder / "model.onnx")
    return {**asdict(pt), "files": files, "bytes": sum(files.values()), "bytes_blocks": blocks, "bytes_head": head,
            "ppl": ppl["ppl"], "tokens": ppl["tokens"], "eval_seconds": ppl["seconds"], **cost}


MATMULS = ("MatMul", "MatMulNBits", "MatMulInteger", "Gemm", "FusedMatMul", "DynamicQuantizeMatMul")


def linear_bytes(path: Path) -> tuple[int, int]:
    """(block linears, lm_head) bytes of any tool's graph: the initializers each MatMul-like node
    reads as its weight (directly or through DequantizeLinear / Cast / Transpose / Reshape) and a
    bias added right after it; ``lm_head`` is the MatMul the ``logits`` output comes from. The
    embedding's Gather is neither (QuBLAST's bundles count block linears the same way)."""
    import onnx

    from export.sizes import graph_index, initializer_bytes

    proto = onnx.load(str(path), load_external_data=False)
    inits, producers, users = graph_index(proto)

    def weights(node) -> set[str]:
        found, stack = set(), list(node.input[1:])
        while stack:
            name = stack.pop()
            if name in inits:
                found.add(name)
            elif name in producers and producers[name].op_type == "DequantizeLinear":
                stack.extend(producers[name].input)
            elif name in producers and producers[name].op_type in ("Cast", "Transpose", "Reshape"):
                stack.append(producers[name].input[0])
        for user in users.get(node.output[0], []):
            if user.op_type == "Add":
                found.update(n for n in user.input if n in inits)
        return found

    head = _logits_matmul(proto)
    head_weights = weights(head)
    block_weights = set().union(*(weights(n) for n in proto.graph.node if n.op_type in MATMULS and n is not head)) - head_weights
    return sum(initializer_bytes(inits[n]) for n in block_weights), sum(initializer_bytes(inits[n]) for n in head_weights)


def _whole_split(pt: Point, out: Path, args) -> tuple[float, int]:
    from runtime.perplexity import perplexity, windows

    ppl = perplexity(_open(pt, out / "points" / pt.name), windows(_text_ids(out, args), args.seqlen), progress=True)
    return ppl["ppl"], ppl["tokens"]


def _tokenizer(out: Path):
    """The model's tokenizer, as the fp32 point's bundle carries it, or else any finished QuBLAST
    bundle of the run (each carries the same one): every point reads text through it."""
    from tokenizers import Tokenizer

    points = out / "points"
    found = [points / "fp32" / "tokenizer" / "tokenizer.json",
             *sorted(points.glob("*/tokenizer/tokenizer.json"))]
    found = [f for f in found if f.is_file() and not f.parent.parent.name.endswith(".partial")]
    if not found:
        raise RuntimeError(f"no point in {points} carries the model's tokenizer yet (make fp32 or a QuBLAST point first)")
    return Tokenizer.from_file(str(found[0]))


def _text_ids(out: Path, args) -> list[int]:
    from runtime.perplexity import wikitext_text

    return _tokenizer(out).encode(wikitext_text(args.text), add_special_tokens=False).ids


def _open(pt: Point, folder: Path, threads: int | None = None):
    """The point's model: a QuBLAST bundle with its own session options, a peer's graph (ONNX
    Runtime's quantizers, ModelOpt, genai) with ORT's defaults."""
    from runtime.bundle import open_bundle
    from runtime.session import OrtModel

    if pt.tool in ("fp", "qublast"):
        return open_bundle(folder, threads=threads).model
    if pt.tool == "genai":
        return GenaiGraph(folder, threads=threads)
    return OrtModel(str(folder / "model.onnx"), threads=threads)


def _make(pt: Point, out: Path, args) -> None:
    """Write the point's folder under a temporary name, then rename it (a killed run leaves no half point)."""
    final = out / "points" / pt.name
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed run's leftover, inside this command's own results folder
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if pt.tool in ("fp", "qublast"):
        flags = ["--embeddings", "fp16", "--lm-head", "fp16", "--uniform", "fp16"] if pt.tool == "fp" else pt.params["flags"]
        command = [sys.executable, "-m", "qublast.export", "--model", args.model, "--target", pt.params["target"], *flags,
                   "--calib-text", args.calib_text, "--eval-text", args.text, "--max-eval-windows", str(args.windows),
                   "--seqlen", str(args.seqlen), "--calib-seqlen", str(args.seqlen),
                   "--cache-dir", str(out / "cache"), "--out", str(tmp)]
        refused = _export(command)
        if refused:  # a budget this model cannot have on this target: recorded, with the export's line
            tmp.mkdir()
            (tmp / "INFEASIBLE").write_text(refused + "\n", encoding="utf-8")
    else:
        tmp.mkdir()
        try:
            if pt.tool == "genai":
                _genai_point(pt, args.model, tmp, out / "cache")
            elif pt.tool == "modelopt":
                _modelopt_point(pt, args, out, tmp)
            else:
                _ort_point(pt, out / "points" / "fp32" / "model.onnx", tmp / "model.onnx")
        except ImportError as exc:  # an optional dependency of the method
            (tmp / "SKIPPED").write_text(f"needs {exc.name}, which is not installed: {exc}\n", encoding="utf-8")
    os.replace(tmp, final)


# how the export words a ``BudgetError`` (qublast/calibrate.py, qublast/allocate.py): the one refusal
# (exit code 2) that is a fact about the point, not a failure of the run
BUDGET_REFUSALS = ("size budget ", "no allocation has predicted loss")


def _export(command: list[str]) -> str | None:
    """Run the export, its stderr passed through as it comes; None when it succeeds, its error line
    when it refuses the budget; any other failure raises."""
    child = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE)
    tail = b""
    while chunk := os.read(child.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail = (tail + chunk)[-8192:]
    child.stderr.close()
    if child.wait() == 0:
        return None
    lines = [line.strip() for line in tail.decode("utf-8", "replace").splitlines() if line.startswith("qublast: error: ")]
    message = lines[-1].removeprefix("qublast: error: ") if lines else ""
    if child.returncode == 2 and message.startswith(BUDGET_REFUSALS):
        return message
    raise subprocess.CalledProcessError(child.returncode, command)


def _genai_point(pt: Point, model: str, dest: Path, cache: Path) -> None:
    """onnxruntime-genai's model builder, INT4 for the CPU, from the checkpoint as an HF folder."""
    import onnxruntime_genai  # noqa: F401  (ImportError: the point is skipped, with why)

    source = Path(model)
    if not source.is_dir():  # a GGUF file: the builder reads HF folders, so write the dequantized fp32 weights once
        source = cache / "hf-fp32"
        if not (source / "config.json").is_file():
            from qublast.models import load_model, resolve_source

            fp, tokenizer, _ = load_model(resolve_source(model))
            fp.config.__dict__.pop("quantization_config", None)  # the GGUF's: the weights written are dequantized
            fp.hf_quantizer = None  # else transformers refuses to save a GGUF-loaded model
            partial = source.with_name("hf-fp32.partial")
            fp.save_pretrained(str(partial), safe_serialization=True)
            tokenizer.save_pretrained(str(partial))
            os.replace(partial, source)
    options = [f"algo_config={pt.params['algo']}", f"shared_embeddings={str(pt.params['shared']).lower()}"]
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(dest),
               "-p", "int4", "-e", "cpu", "-c", str(dest / "builder-cache"), "--extra_options", *options]
    with open(dest / "builder.log", "w", encoding="utf-8") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    shutil.rmtree(dest / "builder-cache", ignore_errors=True)


MODELOPT_CALIB_WINDOWS = 8
LLAMA_LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                 "mlp/down_proj")


def _modelopt_point(pt: Point, args, out: Path, dest: Path) -> None:
    """ModelOpt's ONNX INT4 on the fp32 graph, in ModelOpt's own interpreter (benchmarks/modelopt_int4.py)."""
    if not args.modelopt_python:
        (dest / "SKIPPED").write_text(
            "ModelOpt 0.47 pins onnx~=1.21 and onnxruntime-gpu~=1.24, which conflict with this environment's onnx and onnxruntime: "
            "give --modelopt-python of a venv with nvidia-modelopt[onnx]\n", encoding="utf-8")
        return
    import numpy as np
    import onnx

    from runtime.perplexity import windows

    model = onnx.load(str(out / "points" / "fp32" / "model.onnx"), load_external_data=True)
    try:
        name_linears(model)
    except ValueError as exc:  # only the mixed mode reads the names
        if pt.params["mixed"]:
            (dest / "SKIPPED").write_text(f"ModelOpt's mixed mode picks its INT8 layers by genai's names, and {exc}\n", encoding="utf-8")
            return
    onnx.save(model, str(dest / "source.onnx"), save_as_external_data=True, location="source.onnx.data")
    ids = _tokenizer(out).encode(Path(args.calib_text).read_text(encoding="utf-8"), add_special_tokens=False).ids
    np.save(dest / "calib.npy", windows(ids, args.seqlen, max_windows=MODELOPT_CALIB_WINDOWS))
    command = [args.modelopt_python, str(ROOT / "benchmarks" / "modelopt_int4.py"), str(dest / "source.onnx"), str(dest / "model.onnx"),
               pt.params["method"], "1" if pt.params["mixed"] else "0", str(dest / "calib.npy")]
    with open(dest / "modelopt.log", "w", encoding="utf-8") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    for name in ("source.onnx", "source.onnx.data", "calib.npy"):
        (dest / name).unlink()
    if not (dest / "SKIPPED").is_file():
        _rename_data(dest / "model.onnx", keep=("modelopt.log",))


def name_linears(model) -> None:
    """Name a Llama-layout graph's linears as onnxruntime-genai does (``/model/layers.{i}/mlp/down_proj/MatMul``,
    ``/lm_head/MatMul``), from their order and shapes; ``ValueError`` when the graph is not that layout."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    head = lm_head_node(model)
    linears = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in shapes and len(shapes[n.input[1]]) == 2]
    blocks = [n for n in linears if n.name != head]
    layers = sum(1 for i in model.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    if len(blocks) != len(LLAMA_LINEARS) * layers:
        raise ValueError(f"{len(blocks)} linears for {layers} layers: not the Llama layout (q, k, v, o, gate, up, down)")
    for i in range(layers):
        seven = blocks[7 * i: 7 * i + 7]
        q, k, v, o, gate, up, down = (shapes[n.input[1]] for n in seven)
        if not (k == v and gate == up and down == gate[::-1] and q[0] == k[0] == gate[0] == o[1] and o[0] == q[1]):
            raise ValueError(f"layer {i}'s linears have shapes {[q, k, v, o, gate, up, down]}: not the Llama layout")
        for node, label in zip(seven, LLAMA_LINEARS):
            node.name = f"/model/layers.{i}/{label}/MatMul"
    next(n for n in model.graph.node if n.name == head).name = "/lm_head/MatMul"


class GenaiGraph:
    """An onnxruntime-genai graph (``input_ids``, ``attention_mask``, ``past_key_values.N.key|value``;
    no position ids) behind the ``forward`` the perplexity and speed measurements call."""

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        decoder = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.kv_heads, self.head_dim = decoder["num_key_value_heads"], decoder["head_size"]
        self.output_names = ["logits", *(n.replace("past_key_values", "present") for n in self.past_names)]

    def forward(self, input_ids, past=None):
        import numpy as np

        batch, seq = input_ids.shape
        if past is None:
            past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": np.ones((batch, past[0].shape[2] + seq), np.int64)}
        feeds.update(zip(self.past_names, past))
        logits, *present = self.session.run(self.output_names, feeds)
        return logits.astype(np.float32), present


def _ort_point(pt: Point, source: Path, dest: Path) -> None:
    import onnx

    model = onnx.load(str(source), load_external_data=True)
    params = pt.params
    if params.get("head"):  # a tied head reads Transpose(table): the quantizer needs it as a constant to quantize it
        fold_transposed_weights(model)
    if params["algo"] == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx.save(model, str(dest.with_name("fp32.onnx")), save_as_external_data=True, location="fp32.onnx.data")
        quantize_dynamic(str(dest.with_name("fp32.onnx")), str(dest), weight_type=QuantType.QInt8, use_external_data_format=True)
        for name in ("fp32.onnx", "fp32.onnx.data"):
            dest.with_name(name).unlink()
        _rename_data(dest)
        return
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    if params["algo"] == "default":
        config = mnb.DefaultWeightOnlyQuantConfig(block_size=params["block"], is_symmetric=params["symmetric"], bits=params["bits"])
    elif params["algo"] == "hqq":
        config = mnb.HQQWeightOnlyQuantConfig(block_size=params["block"], bits=params["bits"])
    elif params["algo"] == "k_quant":
        config = mnb.KQuantWeightOnlyQuantConfig()
    else:
        raise ValueError(f"unknown ORT method {params['algo']!r}")
    exclude = [] if params["head"] else [lm_head_node(model)]
    quantizer = mnb.MatMulNBitsQuantizer(model, bits=params["bits"], block_size=params.get("block", 128),
                                         is_symmetric=params.get("symmetric", False), nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dest), use_external_data_format=True)
    _rename_data(dest)


def fold_transposed_weights(model) -> None:
    """Give every MatMul whose weight is ``Transpose(initializer)`` (a tied ``lm_head`` reading the
    embedding table) a transposed constant of its own, as an untied export stores it: ONNX Runtime's
    weight quantizers skip a MatMul without a constant weight. The table stays for the Gather, so a
    point that quantizes the head deploys the table and the head's codes (the points that keep the
    head fp32 keep it shared)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        source = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[source.input[0]]).transpose(perm)
        name = f"{source.input[0]}.transposed_for_{node.name}"
        model.graph.initializer.append(numpy_helper.from_array(weight.copy(), name))
        node.input[1] = name
        if not any(source.output[0] in other.input for other in model.graph.node):
            model.graph.node.remove(source)


def _rename_data(dest: Path, keep: tuple[str, ...] = ()) -> None:
    """Store the external data as ``model.onnx.data`` (one file, named as the bundles name it)."""
    import onnx

    model = onnx.load(str(dest), load_external_data=True)
    for f in dest.parent.iterdir():
        if f.name != "model.onnx" and f.name not in keep:
            f.unlink()
    onnx.save(model, str(dest), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)


def lm_head_node(model) -> str:
    """Name of the MatMul-like node the ``logits`` output comes from (through Cast / Reshape / Add)."""
    return _logits_matmul(model).name


def _logits_matmul(model):
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type not in MATMULS:
        node = producers.get(node.input[0])
    if node is None:
        raise ValueError("no MatMul computes the logits: not a graph this benchmark knows")
    return node


def _speed(results: dict, out: Path, names: list[str], seqlen: int) -> None:
    from benchmarks.ort_speed import interleaved

    vocab = _tokenizer(out).get_vocab_size()
    measured = [n for n in names if "bytes" in results["points"].get(n, {})]
    for threads in (1, 2):
        models = []
        for name in measured:
            r = results["points"][name]
            models.append(_open(Point(name, r["tool"], r["params"]), out / "points" / name, threads=threads))
        timings = interleaved(models, prefill=seqlen, decode=32, repeats=5, vocab=min(vocab, 1000))
        for name, (prefill, decode) in zip(measured, timings):
            results["points"][name][f"prefill_ms_t{threads}"] = prefill
            results["points"][name][f"decode_ms_t{threads}"] = decode


def summary_table(results: dict) -> str:
    """Markdown: one row a point, sizes against the fp16 graph's."""
    pts = results["points"]
    fp32 = pts.get("fp32", {}).get("ppl")
    fp16_bytes = pts.get("fp16", {}).get("bytes")
    blocks16 = pts.get("fp16", {}).get("bytes_blocks")
    lines = ["| point | tool | MB deployed | vs fp16 | block linears MB | vs fp16 | PPL (ORT) | vs fp32 | whole split PPL | prefill-512 ms (1t / 2t) "
             "| decode ms/token (1t / 2t) | s to make | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = ("fp", "qublast", "ort", "genai", "modelopt")

    def order(item):  # tools together, QuBLAST's targets apart, each by size
        _, r = item
        return (groups.index(r["tool"]) if r["tool"] in groups else len(groups), r.get("params", {}).get("target", ""),
                "bytes" not in r, r.get("bytes", 0))

    for name, r in sorted(pts.items(), key=order):
        kind = next((k for k in ("skipped", "infeasible") if k in r), None)
        if kind:
            lines.append(f"| {name} | {r['tool']} | {kind}: {r[kind]} | | | | | | | | | | |")
            continue
        size = f"{r['bytes'] / 1e6:.1f}"
        rel = _smaller(r["bytes"], fp16_bytes)
        blocks = f"{r['bytes_blocks'] / 1e6:.1f}" if "bytes_blocks" in r else "-"
        blocks_rel = _smaller(r.get("bytes_blocks"), blocks16)
        ppl_rel = f"{100 * (r['ppl'] / fp32 - 1):+.2f}%" if fp32 else ""
        speed = [" / ".join(f"{r[f'{k}_t{t}']:.1f}" if f"{k}_t{t}" in r else "-" for t in (1, 2)) for k in ("prefill_ms", "decode_ms")]
        made = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        whole = f"{r['ppl_whole']:.4f}" if "ppl_whole" in r else "-"
        lines.append(f"| {name} | {r['tool']} | {size} | {rel} | {blocks} | {blocks_rel} | {r['ppl']:.4f} |"
                     f" {ppl_rel} | {whole} | {speed[0]} | {speed[1]} | {made} | {rss} |")
    return "\n".join(lines) + "\n"


def _smaller(size: int | None, reference: int | None) -> str:
    if not size or not reference:
        return ""
    change = 1 - size / reference
    return f"{100 * change:.1f}% smaller" if change >= 0 else f"{100 * -change:.1f}% larger"


def frontier_table(results: dict) -> str:
    """Markdown: each peer point against QuBLAST's measured points, no interpolation. At the peer's
    size: the lowest PPL of a QuBLAST point no larger; at the peer's PPL: the smallest QuBLAST
    point no worse. Sizes both as deployed and as block linears alone."""
    pts = [r for r in results["points"].values() if "bytes" in r]
    ours = [r for r in pts if r["tool"] == "qublast"]
    lines = ["| peer point | its MB (blocks) | its PPL | QuBLAST's best PPL at <= its MB | at <= its block MB "
             "| QuBLAST's smallest MB at <= its PPL | blocks MB at <= its PPL |", "|---|---|---|---|---|---|---|"]

    def best_ppl(key, limit):
        if limit is None:
            return "-"
        found = [r for r in ours if key in r and r[key] <= limit]
        return "none" if not found else "{:.4f} ({})".format(*min((r["ppl"], r["name"]) for r in found))

    def smallest(key, limit):
        found = [r for r in ours if key in r and r["ppl"] <= limit]
        return "none" if not found else "{:.1f} ({})".format(*min((r[key] / 1e6, r["name"]) for r in found))

    for r in sorted((r for r in pts if r["tool"] not in ("qublast", "fp")), key=lambda r: (r["tool"], r["bytes"])):
        blocks = f"{r['bytes_blocks'] / 1e6:.1f}" if "bytes_blocks" in r else "-"
        lines.append(f"| {r['name']} | {r['bytes'] / 1e6:.1f} ({blocks}) | {r['ppl']:.4f} "
                     f"| {best_ppl('bytes', r['bytes'])} | {best_ppl('bytes_blocks', r.get('bytes_blocks'))} "
                     f"| {smallest('bytes', r['ppl'])} | {smallest('bytes_blocks', r['ppl'])} |")
    return "\n".join(lines) + "\n"


def pareto_plot(results: dict, path: Path) -> None:
    """Size vs PPL, every tool its own marker, QuBLAST's frontier per target a line; the whole
    deployed model on the left, the block linears alone on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"fp": ("s", "black"), "ort": ("^", "tab:orange"), "genai": ("v", "tab:green"), "modelopt": ("D", "tab:purple"),
               "qublast cpu": ("o", "tab:blue"), "qublast jetson": ("P", "tab:red")}
    measured = [r for r in results["points"].values() if "bytes" in r]

    def group(r: dict) -> str:
        return f"qublast {r['params']['target']}" if r["tool"] == "qublast" else r["tool"]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, label in ((axes[0], "bytes", "deployed MB (the files the graph ships)"),
                           (axes[1], "bytes_blocks", "block linears MB (embedding and lm_head left out)")):
        for name, (marker, color) in markers.items():
            pts = [(r[key] / 1e6, r["ppl"]) for r in measured if group(r) == name and r.get(key)]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=name, s=28)
            if name.startswith("qublast") and len(pts) > 1:
                frontier, best = [], float("inf")
                for size, ppl in sorted(pts):
                    if ppl < best:
                        frontier.append((size, ppl))
                        best = ppl
                ax.plot(*zip(*frontier), color=color, linewidth=1)
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("WikiText-2 PPL through ONNX Runtime")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
