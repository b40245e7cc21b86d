#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-imatrix, llama-quantize,
# llama-perplexity) from the llama.cpp that llama-cpp-python 0.3.36 vendors: the
# same sources as the library ewq runs. The benchmarks use them as the reference
# ewq is checked against; ewq itself never runs them.
#
# Usage: bash benchmarks/llama_tools.sh   (prints the folder holding the binaries)
# About 10 minutes on 2 cores the first time; then it only checks. The folder is
# $EWQ_LLAMA_TOOLS or ~/.cache/ewq/llama-tools-0.3.36.
set -euo pipefail
cd "$(dirname "$0")/.."
# without AMX, as scripts/setup.sh builds the library (SIGILL where the tile state is
# not handed to the process)
NOAMX=""
case "$(uname -m)" in x86_64|amd64) NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;; esac
OUT=${EWQ_LLAMA_TOOLS:-$HOME/.cache/ewq/llama-tools-0.3.36${NOAMX:+-noamx}}
TOOLS=(llama-imatrix llama-quantize llama-perplexity)
have() { for t in "${TOOLS[@]}"; do [ -x "$OUT/bin/$t" ] || return 1; done; }
if have; then echo "$OUT/bin"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip --disable-pip-version-check -q download --no-deps \
  --no-binary :all: llama-cpp-python==0.3.36 -d "$work" >&2
tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
src="$work/llama_cpp_python-0.3.36/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DCMAKE_C_FLAGS="$NOAMX" -DCMAKE_CXX_FLAGS="$NOAMX" >&2
cmake --build "$work/build" -j "$(nproc)" --target "${TOOLS[@]}" >&2
mkdir -p "$OUT/bin"
for t in "${TOOLS[@]}"; do cp "$work/build/bin/$t" "$OUT/bin/"; done
have && echo "$OUT/bin"
