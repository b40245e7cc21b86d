#!/usr/bin/env bash
# IgLM (the one real fp32 decoder on the registries; measurement only, never
# shipped: ../shared/docs/MODELS.md) against llama.cpp's presets at equal bytes,
# and the damage model's predicted against measured KL on random mixed plans.
#
#   bash benchmarks/iglm_compare.sh [WORK]    (default WORK: ~/.cache/ewq/iglm)
#
# Writes results/iglm/compare (ewq compare) and results/iglm/damage_model.json.
# About 1 hour on 2 cores; run it alone (llama.cpp's threads spin).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$HOME/.cache/ewq/iglm}
.venv/bin/python benchmarks/iglm.py "$WORK" > "$WORK.paths" 2>/dev/null || \
  .venv/bin/python benchmarks/iglm.py "$WORK" > "$WORK.paths"
get() { awk -v k="$1" '$1 == k {print $2}' "$WORK.paths"; }
GGUF=$(get gguf); HF=$(get hf); EVAL=$(get eval); CAL=$(get calibration)
# one sequence per line, cut to 64 tokens: windows that start at a sequence start
OPTS=(--documents lines --calib-ctx 64 --calib-tokens 8192)
.venv/bin/ewq compare "$GGUF" --text "$EVAL" --calibration "$CAL" --ctx 64 \
  --windows 512 "${OPTS[@]}" --out results/iglm/compare
.venv/bin/python benchmarks/damage_model.py "$GGUF" "$EVAL" "$CAL" --ctx 64 \
  --windows 512 --documents lines --calib-ctx 64 --calib-tokens 8192 \
  --json results/iglm/damage_model.json
# GPTQ rounding against llama.cpp's own rounding, at the presets' own types
.venv/bin/python benchmarks/gptq_gain.py "$GGUF" "$EVAL" "$CAL" --documents lines \
  --ctx 64 --windows 512 --calib-ctx 64 --json results/iglm/gptq_gain.json
# the data-free sensitivity table from both models' damage-model runs (SmolLM2's:
# benchmarks/damage_model.py default WIKITEXT CALIB --ctx 256 --windows 8
# --calib-ctx 256 --calib-tokens 512 --type-probes 2)
.venv/bin/python benchmarks/fit_prior.py results/iglm/damage_model.json \
  results/smollm2-135m/damage_model.json
# the Hugging Face folder plans as the GGUF llama.cpp's converter makes of it
for src in "$HF" "$GGUF"; do
  .venv/bin/ewq plan "$src" --format gguf --bpw 4.5 --context 0 --calibration "$CAL" \
    --documents lines --calibration-ctx 64 --probe-tokens 8192 \
    --json "$WORK/plan-$(basename "$src").json" >/dev/null
done
.venv/bin/python - "$WORK/plan-$(basename "$HF").json" "$WORK/plan-$(basename "$GGUF").json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
ta = {t["name"]: t["type"] for t in a["tensors"]}
tb = {t["name"]: t["type"] for t in b["tensors"]}
print("Hugging Face folder and F32 GGUF plan the same tensors:", ta == tb)
PY
