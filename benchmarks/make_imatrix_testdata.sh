#!/usr/bin/env bash
# Make tests/data/imatrix-v1-byte-llama.{gguf,dat}: llama.cpp's own llama-imatrix
# (built from the llama-cpp-python 0.3.36 sdist by benchmarks/llama_tools.sh) run on
# the test suite's tiny byte-vocabulary Llama (tests/models.py: byte_vocab_llama,
# seeded, the same file on every run) over the first 16,000 characters of
# WikiText-2's validation text, in chunks of 128 tokens. tests/test_imatrix.py
# checks that ewq reads both files and that its own computation on the same model
# and text agrees with them.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash benchmarks/llama_tools.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
shared=${EWQ_SHARED_DATA:-../shared/data}
head -c 16000 "$shared/wikitext-2/valid.txt" > "$work/wiki16k.txt"
(cd tests && ../.venv/bin/python -c "
from pathlib import Path; from models import byte_vocab_llama
byte_vocab_llama(Path('$work/model.gguf'))")
for fmt in gguf dat; do
  (cd "$work" && "$bin/llama-imatrix" -m model.gguf -f wiki16k.txt -c 128 -t 2 \
     --output-format "$fmt" -o "imatrix.$fmt" >/dev/null 2>&1)
  cp "$work/imatrix.$fmt" "tests/data/imatrix-v1-byte-llama.$fmt"
done
ls -l tests/data/imatrix-v1-byte-llama.*
