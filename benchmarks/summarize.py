"""Print one row per bundle from recipe.json files: sizes, PPLs, times (measured values only)."""
import json
import sys

print("| bundle | constraint | blocks w8a8/w8/w4/fp16 | map kept | whole -% | blocks -% | PPL fp | PPL torch | PPL ORT | ORT vs fp | ORT vs torch | calib s | export s | eval tokens |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    r = json.load(open(path))
    m, t = r["metrics"], r["metrics"].get("timings", {})
    fmts = [b["format"] for b in r["blocks"]]
    c = r["constraint"]
    constraint = "formats (fixed per block)" if c["mode"] == "formats" else f"{c['mode']}={c['value']}"
    quantized = [b for b in r["blocks"] if b["format"] != "fp16"]
    kept = f"{sum(bool(b.get('map')) for b in quantized)}/{len(quantized)}" if r["calibration"].get("scaling") else "off"
    if r["calibration"].get("scaling") and not all("map" in b for b in quantized):
        kept = "-"  # recipe written before the per-block on/off choice
    print(
        f"| {path.split('/')[-2]} | {constraint} | "
        f"{fmts.count('w8a8')}/{fmts.count('w8')}/{fmts.count('w4')}/{fmts.count('fp16')} | {kept} | "
        f"{100 * (1 - m['size_bytes'] / m['size_bytes_fp16']):.1f} | {100 * (1 - m['size_bytes_blocks'] / m['size_bytes_blocks_fp16']):.1f} | "
        f"{m['ppl_fp']:.4f} | {m['ppl_quant_torch']:.4f} | {m['ppl_quant_ort']:.4f} | {100 * m['ppl_increase_ort']:+.2f}% | "
        f"{100 * m['ort_vs_torch']:+.4f}% | {t.get('calibration_s', 0):.0f} | {t.get('export_s', 0):.0f} | {m['eval_tokens']} |"
    )
