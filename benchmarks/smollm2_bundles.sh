#!/usr/bin/env bash
# The SmolLM2-135M bundles of docs/results.md (../shared/assets), one at a time: both targets under
# the two PPL bounds, the fp32 graph (speed baseline), and the quantizer ablation (uniform w4,
# embedding and lm_head fp16). Prints each run's wall time, then a table row per bundle, then speed.
# Usage: bash benchmarks/smollm2_bundles.sh OUT_DIR [MAX_EVAL_WINDOWS]   (default 40; "all" = whole test split)
set -uo pipefail
out=${1:?usage: smollm2_bundles.sh OUT_DIR [MAX_EVAL_WINDOWS]}
windows=${2:-40}
assets=$(cd "$(dirname "$0")/../.." && pwd)/shared/assets
limit=()
[ "$windows" != all ] && limit=(--max-eval-windows "$windows")
common=(--model "$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf" --calib-text "$assets/wikitext-2/wiki.valid.calib.txt"
        --eval-text "$assets/wikitext-2/wiki.test.raw" --seqlen 512 "${limit[@]}")
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
run cpu-ppl5 --target cpu --max-ppl-increase 0.05
run cpu-ppl1 --target cpu --max-ppl-increase 0.01
run jet-ppl5 --target jetson --max-ppl-increase 0.05
run jet-ppl1 --target jetson --max-ppl-increase 0.01
run cpu-fp32 --target cpu --uniform fp16 --embeddings fp16 --lm-head fp16
# why Jetson tries w8a8 only on request: the 1% bundle with it, and which static ranges cost PPL on which text
run jet-ppl1-w8a8 --target jetson --max-ppl-increase 0.01 --candidates fp16,w8a8,w4 --safety 1
python "$(dirname "$0")/static_ranges.py" "$out/jet-ppl1-w8a8" --model "$assets/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --calib-text "$assets/wikitext-2/wiki.valid.calib.txt" --eval-text "$assets/wikitext-2/wiki.test.raw" --windows "${windows/all/100000}"
# the quantizer ablation: uniform w4 on the Jetson graph, embedding and lm_head fp16
w4=(--target jetson --uniform w4 --embeddings fp16 --lm-head fp16)
run w4-rtn "${w4[@]}" --quantizers rtn --no-scaling --reconstruct 0
run w4-rtn-map "${w4[@]}" --quantizers rtn --reconstruct 0
run w4-gptq "${w4[@]}" --quantizers gptq --no-scaling --reconstruct 0
run w4-gptq-map "${w4[@]}" --reconstruct 0
run w4-gptq-map-cbq "${w4[@]}"
# the mixed format on its own: every block w4m (gate/up w4, the other linears fp16 on Jetson)
run w4m-gptq-map-cbq --target jetson --uniform w4m --embeddings fp16 --lm-head fp16
python "$(dirname "$0")/summarize.py" "$out"/*/recipe.json
python "$(dirname "$0")/ort_speed.py" "$out/cpu-fp32" "$out/cpu-ppl5" "$out/cpu-ppl1" "$out/jet-ppl5"
