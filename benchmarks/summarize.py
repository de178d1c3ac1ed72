"""Print one row per bundle from recipe.json files: target, formats, sizes from the files, PPLs, times
(measured values only).

    python benchmarks/summarize.py BUNDLE/recipe.json [...]
"""
import json
import sys
from pathlib import Path

ORDER = ("w8a8", "w8", "w4m", "w4s", "w4", "fp16")
LETTER = {"w8a8": "A", "w8": "8", "w4m": "m", "w4s": "s", "w4": "4", "fp16": "F"}
strings = []
print("| bundle | target | constraint | blocks w8a8/w8/w4m/w4s/w4/fp16 | quantizers | embedding / lm_head | whole MB | whole -% | "
      "blocks -% | PPL fp | PPL torch | PPL ORT | ORT vs fp | ORT vs torch | calib s | wall s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    r = json.load(open(path))
    record = Path(path).with_name("run.json")  # wall times live beside the recipe (older recipes held them)
    m = r["metrics"]
    t = json.loads(record.read_text())["timings"] if record.is_file() else m.get("timings", {})
    fmts = [b["format"] for b in r["blocks"]]
    c = r["constraint"]
    constraint = "formats (fixed per block)" if c["mode"] == "formats" else f"{c['mode']}={c['value']}"
    quantizers = sorted({b["quantizer"] for b in r["blocks"] if b.get("quantizer")})
    print(
        f"| {path.split('/')[-2]} | {r['target']['name']} | {constraint} | "
        f"{'/'.join(str(fmts.count(f)) for f in ORDER)} | {','.join(quantizers)} | "
        f"{r['embedding']['format']} / {r['lm_head']['format']} | {m['size_bytes'] / 1e6:.1f} | "
        f"{100 * (1 - m['size_bytes'] / m['size_bytes_fp16']):.1f} | {100 * (1 - m['size_bytes_blocks'] / m['size_bytes_blocks_fp16']):.1f} | "
        f"{m['ppl_fp']:.4f} | {m['ppl_quant_torch']:.4f} | {m['ppl_quant_ort']:.4f} | {100 * m['ppl_increase_ort']:+.2f}% | "
        f"{100 * m['ort_vs_torch']:+.4f}% | {t.get('calibration_s', 0):.0f} | {sum(t.values()):.0f} |"
    )
    strings.append(f"{path.split('/')[-2]}: `{''.join(LETTER[f] for f in fmts)}`")
print()
print("Formats per block (" + ", ".join(f"{v} {k}" for k, v in LETTER.items()) + "): " + "; ".join(strings))
