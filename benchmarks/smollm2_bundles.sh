#!/usr/bin/env bash
# Issue-3 bundles on SmolLM2-135M (../shared/assets): prints each run's wall time, then a table.
# Usage: bash benchmarks/smollm2_bundles.sh OUT_DIR [MAX_EVAL_WINDOWS]   (no second argument: whole test split)
set -euo pipefail
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
  python -m qublast.export "${common[@]}" --out "$out/$name" "$@" 2>"$out/$name.log" || { echo "$name FAILED (see $out/$name.log)"; return 1; }
  echo "$name: $((SECONDS - start)) s wall"
}
mkdir -p "$out"
run ppl1 --max-ppl-increase 0.01
run ppl5 --max-ppl-increase 0.05
run size50 --target-size 0.5
run size40 --target-size 0.4
python "$(dirname "$0")/summarize.py" "$out"/*/recipe.json
