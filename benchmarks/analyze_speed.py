"""Speed and memory of `ewq analyze` against a naive torch reference, in one run.

The naive reference does what the paper describes, per tensor, in torch: flatten,
softmax, entropy (``-sum p log(p + eps)``, eps = 0.01, float32, torch's default
threads), one tensor loaded at a time. ewq computes the exact entropy (eps = 0,
float64 sums) of the same matrices. Models:

* synthetic bf16 Llama-shaped models written here (safetensors, sharded), at two
  sizes, so peak memory can be compared across model size;
* the embedded default model (SmolLM2-135M, GGUF Q4_1: dequantized by gguf-py on
  both sides).

Each measurement runs in its own process (peak RSS from VmHWM); page cache is warmed
first. Also printed: plain reading speed of the files (os.preadv into one buffer),
the floor any analysis stands on.

    .venv/bin/python benchmarks/analyze_speed.py [--layers 22] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stream_sharded import peak_rss, write_model  # noqa: E402


def _matrices(src, layout):
    from ewq.analysis.scan import counts_as_matrix

    return [
        t for t in src.index.tensors if counts_as_matrix(t, layout.keys.get(t.name))
    ]


def child(mode: str, source: str) -> None:
    # imports first: the clock measures the work, not loading torch or numba; torch
    # only where it is used, so that peak memory is each side's own
    if mode == "naive":
        import torch

    from ewq import api
    from ewq.analysis.entropy import histogram16
    from ewq.arch import resolve
    from ewq.sources import open_source

    histogram16(__import__("numpy").zeros(4, "uint16"))  # load the jitted kernel
    start = time.perf_counter()
    if mode == "write":
        layers = int(os.environ["BENCH_LAYERS"])
        import stream_sharded

        stream_sharded.LAYERS = layers
        print(json.dumps({"total": write_model(Path(source))}))
        return
    if mode == "ewq":
        result = api.analyze(source)
        n = sum(b.matrix_parameters for b in result.profile.blocks)
    elif mode == "naive":
        n = 0
        with open_source(source) as src:
            for info in _matrices(src, resolve(src.index)):
                array = src.read(info)
                if array.dtype.name == "bfloat16":  # torch has no bf16 numpy bridge
                    w = torch.from_numpy(array.view("uint16").astype("int32") << 16)
                    w = w.view(torch.float32)
                else:
                    w = torch.from_numpy(array.astype("float32", copy=False))
                p = torch.softmax(w.flatten().float(), dim=0)
                float(-(p * torch.log(p + 0.01)).sum())
                n += info.num_elements
    elif mode == "read":
        n, buf = 0, None
        with open_source(source) as src:
            for info in src.index.tensors:
                n += info.num_elements
                fd = os.open(info.file, os.O_RDONLY)
                try:
                    buf = (
                        bytearray(info.nbytes)
                        if buf is None or len(buf) < info.nbytes
                        else buf
                    )
                    os.preadv(fd, [memoryview(buf)[: info.nbytes]], info.offset)
                finally:
                    os.close(fd)
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    print(json.dumps({"params": n, "seconds": seconds, "peak_rss": peak_rss()}))


def measure(mode: str, source: str, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, source],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def warm(folder: Path) -> None:
    for f in sorted(folder.glob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def report(label: str, size: float, results: dict[str, dict]) -> None:
    print(f"\n{label} ({size / 1e9:.2f} GB)")
    for mode, r in results.items():
        rate = r["params"] / r["seconds"] / 1e9
        print(
            f"  {mode:6s} {r['seconds']:7.2f} s  {rate:6.3f} Gparam/s  "
            f"peak RSS {r['peak_rss'] / 1e9:6.3f} GB  ({r['params']:,} params)"
        )
    ewq, naive = results["ewq"], results["naive"]
    speed = (ewq["params"] / ewq["seconds"]) / (naive["params"] / naive["seconds"])
    print(f"  ewq / naive throughput: {speed:.1f}x")
    if "read" in results:
        r = results["read"]
        print(
            f"  ewq / plain read throughput: "
            f"{(ewq['params'] / ewq['seconds']) / (r['params'] / r['seconds']):.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22, help="layers of the larger model")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the models")
    ap.add_argument("--keep", action="store_true", help="keep the models afterwards")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    print(f"{os.cpu_count()} CPUs; ewq uses {len(os.sched_getaffinity(0))} threads")
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ewq-bench-"))
    try:
        peaks = {}
        for layers in (args.layers // 2, args.layers):
            folder = root / f"synthetic-{layers}"
            total = measure("write", str(folder), {"BENCH_LAYERS": str(layers)})[
                "total"
            ]
            warm(folder)
            results = {m: measure(m, str(folder)) for m in ("read", "ewq", "naive")}
            report(f"synthetic bf16 Llama, {layers} layers", total, results)
            peaks[total] = results["ewq"]["peak_rss"]
            shutil.rmtree(folder)
        (small, p_small), (big, p_big) = sorted(peaks.items())
        print(
            f"\newq peak RSS: {p_small / 1e9:.3f} GB for {small / 1e9:.2f} GB, "
            f"{p_big / 1e9:.3f} GB for {big / 1e9:.2f} GB "
            f"(model {big / small:.2f}x larger, peak {p_big / p_small:.2f}x)"
        )
        from ewq.sources import default_model_path

        path = default_model_path()
        warm(path.parent)
        results = {m: measure(m, "default") for m in ("ewq", "naive")}
        report("default model, SmolLM2-135M GGUF Q4_1", path.stat().st_size, results)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
