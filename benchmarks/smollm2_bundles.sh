#!/usr/bin/env bash
# Bundles on SmolLM2-135M (../shared/assets): the issue-3 constraints, then the issue-4 ablation
# (scaling map off) and uniform baselines. Prints each run's wall time, then one table row per bundle.
# Usage: bash benchmarks/smollm2_bundles.sh OUT_DIR [MAX_EVAL_WINDOWS]   (no second argument: whole test split)
set -uo pipefail
out=${1:?usage: smollm2_bundles.sh OUT_DIR [MAX_EVAL_WINDOWS]}
assets=$(cd "$(dirname "$0")/../.." && pwd)/shared/assets
limit=()
[ -n "${2:-}" ] && limit=(--max-eval-windows "$2")
common=(--target jetson --model "$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        --calib-text "$assets/wikitext-2/wiki.valid.calib.txt" --eval-text "$assets/wikitext-2/wiki.test.raw"
        --seqlen 512 "${limit[@]}")
run() {
  local name=$1; shift
  local start=$SECONDS
  if python -m qublast.export "${common[@]}" --out "$out/$name" "$@" 2>"$out/$name.log"; then
    echo "$name: $((SECONDS - start)) s wall"
  else
    echo "$name FAILED: $(grep 'qublast: error' "$out/$name.log" | tail -1)"
  fi
}
mkdir -p "$out"
run ppl1 --max-ppl-increase 0.01
run ppl5 --max-ppl-increase 0.05
run size50 --target-size 0.5
run size40 --target-size 0.4
run uniform-w4 --uniform w4
run uniform-w4-nomap --uniform w4 --no-scaling
run uniform-w8a8 --uniform w8a8
run uniform-w8a8-nomap --uniform w8a8 --no-scaling
run ppl1-nomap --max-ppl-increase 0.01 --no-scaling
run ppl5-nomap --max-ppl-increase 0.05 --no-scaling
run size40-nomap --target-size 0.4 --no-scaling
run uniform-w8 --uniform w8
# Each side at the sizes the other side's PPL-bound runs reached: the equal-size comparison of issue 4.
size_of() {
  python -c "import json,math,sys; m=json.load(open(sys.argv[1]))['metrics']; print(math.ceil(1e4*m['size_bytes_blocks']/m['size_bytes_blocks_fp16'])/1e4)" "$1"
}
for name in ppl1 ppl5; do
  [ -f "$out/$name-nomap/recipe.json" ] && run "$name-size-map" --target-size "$(size_of "$out/$name-nomap/recipe.json")"
  [ -f "$out/$name/recipe.json" ] && run "$name-size-nomap" --target-size "$(size_of "$out/$name/recipe.json")" --no-scaling
done
python "$(dirname "$0")/summarize.py" "$out"/*/recipe.json
