"""A user's files are never lost and a bad flag never costs the work (issue 23), on tiny models:
every bad input refused with one line and exit 2 before any work; ``--out`` never replaces what
is not a bundle unless told, and never the run's inputs; identical inputs give identical bytes;
a run killed at any point leaves the previous bundle or the new one and nothing else; the
runtime holds its memory over many generations."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from export import outdir
from qublast.errors import InputError
from qublast.export import main
from runtime import generate as rgen
from runtime import perplexity as rppl
from runtime.bundle import open_bundle, verify

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--target", "cpu", "--calib-seqlen", "32", "--calib-windows", "2", "--holdout-windows", "2",
        "--seqlen", "32", "--max-eval-windows", "3", "--max-ppl-increase", "0.05"]
SAME_BYTES = ("model.onnx", "model.onnx.data", "scales.safetensors", "embedding.safetensors", "manifest.json")
TEST_EXCERPT = str(resources.files("qublast.data").joinpath("wikitext2_test_excerpt.raw"))


def _error_line(capsys, *, before_work: bool = True) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qublast: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not before_work or "[qublast] loading" not in err, err  # refused before any work
    return lines[0]


def _strays(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def first(tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted export: the reference for determinism and for the fault runs."""
    root = tmp_path_factory.mktemp("first")
    assert main(["--model", str(tiny_model_dir), *ARGS, "--out", str(root / "b"), "--cache-dir", str(root / "cache")]) == 0
    return root / "b"


def _tiny_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((256, 1024), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


EXPORT_REFUSALS = [
    (["--threads", "-1"], "--threads must be from 1 to"),
    (["--threads", "0"], "--threads must be from 1 to"),
    (["--threads", "100000"], "x this machine's"),
    (["--model", ""], "--model is empty"),
    (["--safety", "2"], "--safety must be in (0, 1], got 2.0"),
    (["--formats", "w8,w8,w8"], "--formats gives 3 formats for a model with 2 blocks"),
    (["--calib-windows", "50000"], "fewer than the"),  # more tokens than the embedded text has bytes
    (["--target", "cpu", "--context", "64"], "--target cpu builds no engine"),
    (["--range-method", "percentile"], "--range-method has no effect without w8a8 among the formats"),
    (["--quantizers", "rtn", "--no-act-order"], "--no-act-order has no effect without gptq in --quantizers"),
    (["--quantizers", "rtn", "--gptq-windows", "8"], "--gptq-windows has no effect without gptq in --quantizers"),
    (["--reconstruct", "0", "--reconstruct-steps", "9"], "--reconstruct-steps has no effect with --reconstruct 0"),
    (["--reconstruct-steps", "99999999999"], "--reconstruct-steps must be at most 10000"),
    (["--reconstruct", "0", "--reconstruct-windows", "9"], "--reconstruct-windows has no effect with --reconstruct 0"),
    (["--reconstruct", "0", "--retune", "changed"], "--retune has no effect with --reconstruct 0"),
    (["--reconstruct-windows", "0"], "--reconstruct-windows must be >= 1, got 0"),
    (["--reconstruct-windows", "50000"], "--reconstruct-windows 50000 less --calib-windows 49998"),
    (["--calib-windows", "0"], "--calib-windows must be >= 1, got 0"),
    (["--target", "jetson", "--context", "0"], "--context must be >= 2, got 0"),
    (["--seqlen", "300"], "--seqlen 300 is beyond the model's 256 positions"),
    (["--calib-seqlen", "512"], "--calib-seqlen 512 is beyond the model's 256 positions"),
    (["--target", "jetson", "--context", "4096"], "--context 4096 is beyond the model's 256 positions"),
    (["--max-ppl-increase", "inf"], "--max-ppl-increase must be a finite number > 0, got inf"),
    (["--max-ppl-increase", "nan"], "--max-ppl-increase must be a finite number > 0, got nan"),
    (["--candidates", ""], "--candidates is empty"),
    (["--quantizers", ""], "--quantizers is empty"),
    (["--calib-text", TEST_EXCERPT], "calibrating on test text makes every measured PPL look better"),
]


@pytest.mark.parametrize("extra, message", EXPORT_REFUSALS, ids=[" ".join(e) or "empty" for e, _ in EXPORT_REFUSALS])
def test_bad_flags_refused_before_any_work(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    model = [] if "--model" in extra else ["--model", str(tiny_model_dir)]
    args = ARGS[:-2] if "--formats" in extra else ARGS  # --formats takes the budget's place
    assert main([*model, *args, *extra, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    assert message in _error_line(capsys)
    assert not out.exists() and not _strays(tmp_path, "x")


def test_flags_a_mode_ignores_are_refused(tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), *ARGS[:-2], "--out", str(tmp_path / "x"), "--cache-dir", str(tmp_path / "c")]
    cases = [
        (["--uniform", "w8", "--candidates", "fp16,w8"], "--candidates has no effect with --uniform (the formats are fixed)"),
        (["--uniform", "w8", "--alloc-loss", "dce"], "--alloc-loss has no effect with --uniform"),
        (["--formats", "w8,w4", "--spend-tries", "5"], "--spend-tries has no effect with --formats"),
        (["--target-size", "0.5", "--safety", "0.5"], "--safety has no effect with --target-size"),
        (["--uniform", "w8", "--retune", "changed"], "--retune has no effect with --uniform"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in _error_line(capsys), extra
    assert not (tmp_path / "x").exists()


def test_bad_files_refused_before_any_work(first, tiny_model_dir, tmp_path, capsys):
    """Texts and a recipe that cannot serve are refused from the files alone, before the model loads."""
    empty, short, latin1 = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "latin1.txt"
    empty.write_text(" \n\n")
    short.write_text("A few words.\n")
    few_tokens = tmp_path / "few-tokens.txt"  # bytes enough for the windows, tokens not: " the" is one token
    few_tokens.write_text(" the" * 400 + "\n")
    few_eval = tmp_path / "few-eval.txt"
    few_eval.write_text(" the" * 20 + "\n")
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 500)
    recipe = tmp_path / "r" / "recipe.json"
    shutil.copytree(first, recipe.parent)
    data = json.loads(recipe.read_text())
    data["model"]["num_blocks"] = 3
    data["blocks"].append(dict(data["blocks"][-1], index=2))
    recipe.write_text(json.dumps(data))
    damaged = tmp_path / "d" / "recipe.json"
    shutil.copytree(first, damaged.parent)
    scales = damaged.with_name("scales.safetensors")
    scales.write_bytes(scales.read_bytes()[:-16])
    cases = [
        (["--calib-text", str(empty)], f"calibration text file:{empty} is empty"),
        (["--eval-text", str(empty)], f"evaluation text file:{empty} is empty"),
        (["--calib-text", str(short)], f"calibration text file:{short} has 13 bytes, fewer than the"),
        (["--calib-text", str(few_tokens)], "tokens: 12 windows of 32, 36 needed"),
        (["--eval-text", str(few_eval)], "tokens, fewer than one window of 32"),
        (["--calib-text", str(latin1)], f"text file is not UTF-8: {latin1}"),
        (["--recipe", str(recipe)], "is for a llama model of 3 blocks; this one is llama with 2"),
        (["--recipe", str(damaged)], f"{scales} is damaged (it does not load)"),
        (["--recipe", str(first / "recipe.json"), "--out", str(first / "scales.safetensors"), "--overwrite"],
         "is the recipe's scales"),
    ]
    for extra, message in cases:
        flags = ["--target", "cpu", "--seqlen", "32"] if "--recipe" in extra else ARGS
        out = [] if "--out" in extra else ["--out", str(tmp_path / "x")]
        assert main(["--model", str(tiny_model_dir), *flags, *extra, *out, "--cache-dir", str(tmp_path / "c")]) == 2, extra
        assert message in _error_line(capsys), extra
    assert not (tmp_path / "x").exists() and verify(first)


def test_probe_rerun_cases_are_refused_before_any_work(first, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The second probe's findings: empty and non-UTF-8 values, a recipe that is a folder, the cache
    inside the model, a model file cut short, two sources for one text, the home folder as --out."""
    cut = tmp_path / "cut-model"
    shutil.copytree(tiny_model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    folder = tmp_path / "texts"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cases = [
        (["--cache-dir", ""], "--cache-dir is empty"),
        (["--eval-dataset", ""], "--eval-dataset is empty"),
        (["--recipe", "", "--target", "cpu"], "--recipe is empty"),
        (["--cache-dir", str(tmp_path / "c\udcff")], "is not valid UTF-8"),
        (["--eval-dataset", "wikitext2", "--eval-text", TEST_EXCERPT], "give one of --eval-text and --eval-dataset"),
        (["--cache-dir", str(tiny_model_dir / "cache")], f"is inside the model ({tiny_model_dir})"),
        (["--model", str(cut)], f"--model {cut}: model.safetensors is not a complete safetensors file"),
        (["--model", str(tmp_path / "nope")], f"--model {tmp_path / 'nope'}: no such file or folder"),
        (["--calib-text", str(folder)], f"text file {folder} is a folder"),
        (["--out", str(home), "--overwrite"], f"--out {home} is your home folder"),
    ]
    for extra, message in cases:
        model = [] if "--model" in extra else ["--model", str(tiny_model_dir)]
        out = [] if "--out" in extra else ["--out", str(tmp_path / "x")]
        cache = [] if "--cache-dir" in extra else ["--cache-dir", str(tmp_path / "c")]
        assert main([*model, *ARGS, *extra, *out, *cache]) == 2, extra
        assert message in _error_line(capsys), extra
    assert main(["--model", str(tiny_model_dir), "--target", "cpu", "--seqlen", "32", "--recipe", str(tmp_path),
                 "--out", str(tmp_path / "x")]) == 2
    assert f"--recipe {tmp_path} is a folder" in _error_line(capsys)
    assert (home / ".ssh").is_dir() and not (tmp_path / "x").exists() and not (tiny_model_dir / "cache").exists()


def test_hub_models_cache_is_never_the_output(tiny_model_dir, tmp_path):
    """A model given by hub id is read from the Hugging Face cache: --out may not go there."""
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    for out, overwrite in ((snapshot / "bundle", []), (tmp_path / "hf", ["--overwrite"])):
        run = subprocess.run([sys.executable, "-m", "qublast.export", "--model", "org/tiny", *ARGS, "--out", str(out),
                              "--cache-dir", str(tmp_path / "c"), *overwrite], env=env, capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
        assert run.returncode == 2, run.stderr
        assert "the Hugging Face cache" in run.stderr.strip().splitlines()[-1], run.stderr
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())


def test_sigterm_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "b"
    run = subprocess.run([sys.executable, "-m", "tests.faults", "term", "qublast.sensitivity:_measure", "1", "--",
                          "--model", str(tiny_model_dir), *ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"qublast: error: stopped by signal SIGTERM; {out} is as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_interrupt_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from export import pipeline

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_recipe_and_scales", ctrl_c)
    out = tmp_path / "new" / "deeper" / "b"
    assert main(["--model", str(tiny_model_dir), *ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 130
    assert f"interrupted (Ctrl-C); {out} is as it was" in _error_line(capsys, before_work=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging, no folder made for --out


def test_recipe_with_a_budget_flag_is_refused(first, tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--target", "cpu", "--recipe", str(first / "recipe.json"), "--out", str(tmp_path / "x")]
    assert main([*base, "--target-size", "0.5"]) == 2
    assert "--recipe decides what --target-size would set" in _error_line(capsys)
    assert main([*base, "--calib-windows", "4", "--uniform", "w8"]) == 2
    assert "drop them" in _error_line(capsys)


def test_test_split_calibration_only_when_asked(tiny_model_dir, tmp_path):
    from export.pipeline import ExportConfig, preflight
    from qublast.calibrate import CalibConfig

    cfg = {"model": str(tiny_model_dir), "out": tmp_path / "x", "target": "cpu", "calib_text": TEST_EXCERPT, "seqlen": 32,
           "calib": CalibConfig(target="cpu", cache_dir=tmp_path / "c", calib_seqlen=32)}
    with pytest.raises(InputError, match="--allow-test-calibration"):
        preflight(ExportConfig(**cfg))
    inputs = preflight(ExportConfig(**cfg, allow_test_calibration=True))
    assert inputs.calib_src.label.endswith("wikitext2_test_excerpt.raw")


def test_truncated_gguf_is_refused(tmp_path, capsys):
    whole = tmp_path / "m.gguf"
    _tiny_gguf(whole)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    head = tmp_path / "head.gguf"
    head.write_bytes(whole.read_bytes()[:100])
    assert main(["--model", str(cut), "--out", str(tmp_path / "x")]) == 2
    assert f"{cut} is not a complete GGUF file" in _error_line(capsys)
    assert main(["--model", str(head), "--out", str(tmp_path / "x")]) == 2
    assert f"{head} is not a complete GGUF file" in _error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_gguf_header_gives_the_readers_tensor_end(tmp_path):
    import gguf

    from qublast.models import gguf_data_end

    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(256)  # the data starts elsewhere than at 32's multiple
    writer.add_block_count(2)
    writer.add_float32("a.float", 0.5)
    writer.add_bool("a.bool", True)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
    writer.add_array("a.ints", list(range(17)))
    writer.add_key_value("a.u64s", [1, 2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)
    writer.add_string("a.string", "caf\u00e9")
    writer.add_tensor("token_embd.weight", np.zeros((33, 64), dtype=np.float16))
    q8 = np.zeros((3, 2 * 34), dtype=np.uint8)  # Q8_0: 32 values in 34 bytes
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    assert gguf_data_end(path) == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))  # a version the short parse does not know
    with pytest.raises(ValueError):
        gguf_data_end(path)


def test_out_never_loses_a_file(first, tiny_model_dir, tmp_path, capsys, monkeypatch):
    base = ["--model", str(tiny_model_dir), *ARGS, "--cache-dir", str(tmp_path / "cache")]
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    link = tmp_path / "link"
    link.symlink_to(folder)
    parent_file = tmp_path / "plain"
    parent_file.write_text("x")
    cases = [
        (folder, False, "is a folder that is not a QuBLAST bundle (1 files); pass --overwrite"),
        (notes, False, "is a file, not a bundle folder; pass --overwrite"),
        (link, False, "is a symbolic link; pass --overwrite"),
        (tiny_model_dir, False, f"is the model ({tiny_model_dir})"),
        (tiny_model_dir, True, f"is the model ({tiny_model_dir})"),
        (tiny_model_dir.parent, True, f"holds the model ({tiny_model_dir})"),
        (tiny_model_dir / "model.safetensors", True, f"is inside the model ({tiny_model_dir})"),
        (tiny_model_dir / "new", True, f"is inside the model ({tiny_model_dir})"),
        (tmp_path / "cache", True, "is the cache"),
        (Path(TEST_EXCERPT), True, "is the evaluation text"),
        (parent_file / "b", False, "is a file, not a folder"),
        (Path("/"), True, "is a file system root"),
    ]
    for out, overwrite, message in cases:
        extra = ["--eval-text", TEST_EXCERPT] if "evaluation" in message else []
        assert main([*base, *extra, "--out", str(out), *(["--overwrite"] if overwrite else [])]) == 2, out
        assert message in _error_line(capsys), out
    monkeypatch.chdir(folder)
    for out, message in ((".", f"--out {folder} is the current directory"), ("..", f"--out {tmp_path} holds the current directory")):
        assert main([*base, "--out", out, "--overwrite"]) == 2
        assert message in _error_line(capsys)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outdir.os, "access", lambda *a: False)  # as root every folder is writable: the check's answer
    assert main([*base, "--out", str(tmp_path / "new")]) == 2
    assert f"no permission to write in {tmp_path}" in _error_line(capsys)
    monkeypatch.undo()
    # all still there, nothing beside them
    assert (folder / "cat.jpg").read_bytes() == b"\xff\xd8 a cat" and notes.read_text() == "my notes" and link.is_symlink()
    assert verify(first) and (tiny_model_dir / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a bundle is replaced; a bundle holding a file its manifest does not list is not
    shutil.copytree(first, tmp_path / "old")
    (tmp_path / "old" / "mine.txt").write_text("added by hand")
    assert main([*base, "--out", str(tmp_path / "old")]) == 2
    assert "is a bundle holding files its manifest does not list (mine.txt)" in _error_line(capsys)


def test_overwrite_replaces_a_folder_and_a_bad_cache_entry_is_measured_again(first, tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(first.parent / "cache", cache)
    (entry,) = cache.glob("ppl-fp-*.json")
    entry.write_text('{"ppl": ')  # cut short
    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / "old.txt").write_text("replace me")
    assert main(["--model", str(tiny_model_dir), *ARGS, "--out", str(folder), "--overwrite", "--cache-dir", str(cache)]) == 0
    err = capsys.readouterr().err
    assert f"cache entry {entry} is unreadable: measuring the fp PPL again" in err
    assert verify(folder) and not (folder / "old.txt").exists()
    assert json.loads(entry.read_text())["ppl"] > 0
    assert not _strays(tmp_path, "scratch")


@pytest.mark.parametrize("where", ["cache", "graph"])
def test_disk_full_is_one_line_and_leaves_nothing(first, tiny_model_dir, tmp_path, capsys, monkeypatch, where):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "cache":  # every durable write (cache entries, the sweep's journal) syncs
        monkeypatch.setattr(os, "fsync", full)
        path = str(tmp_path / "cache")
    else:
        import onnx

        monkeypatch.setattr(onnx, "save", full)
        path = "model.onnx"
    out = tmp_path / "b"
    shutil.copytree(first, out)
    assert main(["--model", str(tiny_model_dir), *ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 2
    line = _error_line(capsys, before_work=False)
    assert line.startswith("qublast: error: No space left on device: ") and path in line, line
    assert verify(out) and (out / "model.onnx").read_bytes() == (first / "model.onnx").read_bytes()
    assert not _strays(tmp_path, "b")


def test_a_file_size_limit_fails_cleanly(first, tiny_model_dir, tmp_path):
    """A real write failure (RLIMIT_FSIZE: EFBIG), in the cache and in the bundle: one line, exit 2."""
    for limit, where in ((20_000, f"{tmp_path / 'cache'}/"), (150_000, f"{tmp_path / '.b.qublast-'}")):  # cache; staged graph
        run = subprocess.run([sys.executable, "-m", "tests.faults", "fsize", str(limit), "--", "--model", str(tiny_model_dir),
                              *ARGS, "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "cache")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 2, run.stderr[-2000:]
        lines = [line for line in run.stderr.splitlines() if line.startswith("qublast: error:")]
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert where in lines[0], lines[0]
        assert not (tmp_path / "b").exists() and not _strays(tmp_path, "b")


def test_identical_inputs_identical_bytes(first, tiny_model_dir, tmp_path):
    """A second run from a fresh cache writes the same deployed files and the same manifest."""
    assert main(["--model", str(tiny_model_dir), *ARGS, "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "cache")]) == 0
    for name in SAME_BYTES:
        if (first / name).exists() or (tmp_path / "b" / name).exists():
            assert (tmp_path / "b" / name).read_bytes() == (first / name).read_bytes(), name
    a, b = (json.loads((d / "recipe.json").read_text()) for d in (first, tmp_path / "b"))
    assert a["blocks"] == b["blocks"] and a["allocation"] == b["allocation"]


KILL_POINTS = [  # (where, function replaced, the call that dies)
    ("sweep", "qublast.sensitivity:_measure", 2),
    ("gptq", "qublast.gptq:_solve", 2),
    ("export", "export.graph:_qdq", 1),
    ("verify", "runtime.perplexity:perplexity", 1),
    ("bundle write", "qublast.report:write_report", 1),
]


def test_killed_anywhere_the_previous_bundle_or_the_new_one(first, tiny_model_dir, tmp_path):
    """SIGKILL at five points, each run resuming the last: ``--out`` always holds a whole bundle
    (the previous one until the swap), each run clears the last one's leftovers, and the run that
    finishes writes the graph an uninterrupted run wrote."""
    out = tmp_path / "b"
    shutil.copytree(first, out)
    previous = (out / "manifest.json").read_bytes()
    args = ["--model", str(tiny_model_dir), *ARGS, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    for where, target, nth in KILL_POINTS:
        run = subprocess.run([sys.executable, "-m", "tests.faults", "kill", target, str(nth), "--", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == -signal.SIGKILL, (where, run.stderr[-2000:])
        assert verify(out) and (out / "manifest.json").read_bytes() == previous, where
        left = _strays(tmp_path, "b")
        assert len(left) <= 1 and all(".b.qublast-" in n for n in left), (where, left)  # only this kill's staging
    assert main(args) == 0
    assert not _strays(tmp_path, "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "cache"]
    for name in ("model.onnx", "model.onnx.data", "scales.safetensors"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]


def test_a_swap_cut_between_its_two_renames_is_put_back(tmp_path):
    """Where the atomic exchange is not available the swap is two renames; a kill between them
    leaves ``.NAME.qublast-PID-previous``, which the next run puts back at ``--out``."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    aside = tmp_path / f".b.qublast-{dead}-previous"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    staging = tmp_path / f".b.qublast-{dead}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half")
    done = outdir.recover(tmp_path / "b")
    assert (tmp_path / "b" / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and len(done) == 2
    keep = tmp_path / ".b.backup_1"  # a user's hidden folder beside --out, even one shaped like a bundle: kept
    keep.mkdir(mode=0o700)
    (keep / "recipe.json").write_text("{}")
    outdir.recover(tmp_path / "b")
    assert (keep / "recipe.json").is_file()
    assert outdir.stage(tmp_path / "c").stat().st_mode & 0o777 == 0o755


def test_runtime_bad_input_is_one_line(first, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [
        (rgen, ["--prompt", "The", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (rgen, ["--prompt", "The", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (rgen, ["--prompt", "The", "--max-new-tokens", "41000"], "plus --max-new-tokens 41000 is"),
        (rgen, ["--prompt", "The lobster " * 200], "more than this bundle's context of 256"),
        (rgen, ["--prompt", ""], "the prompt has no tokens"),
        (rgen, ["--prompt", "The", "--threads", "0"], "--threads must be from 1 to"),
        (rgen, ["--prompt", "The", "--threads", "100000"], "--threads must be from 1 to"),
        (rgen, ["--prompt", "The", "--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
        (rgen, ["--prompt", "The", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (rgen, ["--prompt", "The", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (rgen, ["--prompt", "The", "--backend", "trt"], "which runs on ONNX Runtime: use --backend ort"),
        (rppl, ["--text", str(latin1)], f"text file is not UTF-8: {latin1}"),
        (rgen, ["--prompt", "a\udcffb"], "--prompt is not valid UTF-8"),
        (rgen, ["--prompt", "The", "--top-k", "5"], "--top-k has no effect on greedy decoding: give --temperature > 0"),
        (rppl, ["--text", str(first)], f"--text '{first}' is a folder"),
        (rppl, ["--text", TEST_EXCERPT, "--seqlen", "300"], "--seqlen 300 is 300 tokens, more than this bundle's context of 256"),
        (rppl, ["--text", TEST_EXCERPT, "--seqlen", "1"], "--seqlen must be >= 2, got 1"),
        (rppl, ["--text", TEST_EXCERPT, "--max-windows", "0"], "--max-windows must be >= 1, got 0"),
    ]
    for module, extra, message in cases:
        assert module.main(["--bundle", str(first), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)


def test_runtime_memory_holds_over_200_generations(first):
    """200 sequential generations in one process: resident memory stops growing after the first few."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    bundle = open_bundle(first)
    prompt = bundle.tokenizer.encode("The lobster is", add_special_tokens=False).ids
    seen = []
    for i in range(200):
        ids = list(rgen.generate_ids(bundle.model, prompt, max_new_tokens=16,
                                     sampling=rgen.Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=i)))
        assert len(ids) == 16
        seen.append(rss())
    growth = seen[-1] - seen[19]
    assert growth < 8 << 20, f"RSS grew {growth / 2**20:.1f} MiB from generation 20 to 200 ({seen[19] / 2**20:.0f} MiB at 20)"


def test_safetensors_defect_reads_the_header_only(tmp_path):
    """One check for every safetensors file QuBLAST reads (model folders, scales, cached codes):
    complete files pass; cut, padded, or inconsistent ones are named with the reason."""
    import json
    import struct

    import torch
    from safetensors.torch import save_file

    from qublast.files import safetensors_defect, safetensors_loads

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.int8)}, str(good))
    data = good.read_bytes()
    assert safetensors_defect(good) is None and safetensors_loads(good)
    cases = {"cut": data[:-3], "padded": data + b"\0", "short header": data[:4], "not json": struct.pack("<Q", 4) + b"abcd"}
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["a"]["shape"] = [3, 6]  # the byte range no longer fits dtype x shape
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    cases["inconsistent"] = data[:8] + text + data[8 + length :]
    for name, content in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        assert safetensors_defect(path) is not None and not safetensors_loads(path), name
    assert "bytes, its header says" in safetensors_defect(tmp_path / "cut.safetensors")
    assert "tensor a holds 60 bytes" in safetensors_defect(tmp_path / "inconsistent.safetensors")


def test_a_model_config_is_read_once_per_file_and_again_when_the_file_changes(tiny_model_dir, tmp_path):
    """The checks before any work and the load read the same config once (a GGUF header takes
    seconds); each caller gets its own copy, and a file changed in between is read again."""
    from qublast.models import load_config, resolve_source

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    source = resolve_source(str(folder))
    first = load_config(source)
    first.num_hidden_layers = 99  # a caller's change stays its own
    assert load_config(source).num_hidden_layers != 99
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["num_hidden_layers"] = 3
    path.write_text(json.dumps(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_config(source).num_hidden_layers == 3
