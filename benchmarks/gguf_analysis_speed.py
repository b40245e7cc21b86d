"""Speed of `ewq analyze` on GGUF files quantized by llama.cpp, in one run:
entropy sums straight from the quant blocks (analysis/_quant_kernels.py) against
dequantizing every block with gguf-py first (EWQ_QUANT_KERNELS=0, the path before),
and against plainly reading the same files.

Synthetic Llama models (hidden 2048, feed-forward 5632, vocab 32000) at 2 and 8
layers, written as F16 GGUF and quantized by llama.cpp (llama-cpp-python) to Q4_K_M
and Q4_1. Throughput is *marginal*: (parameters of 8 layers - of 2) / (time of 8 -
of 2), so start-up (imports, JIT loading) cancels. Each run is its own process,
page cache warm; peak RSS from VmHWM.

    .venv/bin/python benchmarks/gguf_analysis_speed.py [--dir DIR] [--keep]
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

HIDDEN, FF, VOCAB = 2048, 5632, 32000


def write_f16(path: Path, layers: int) -> int:
    import gguf
    import numpy as np

    rng = np.random.default_rng(layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(16)
    w.add_head_count_kv(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // 16)
    w.add_vocab_size(VOCAB)
    params = 0

    def add(name, shape, scale=0.02):
        nonlocal params
        data = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
        w.add_tensor(name, data)
        params += data.size

    add("token_embd.weight", (VOCAB, HIDDEN))
    for b in range(layers):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{b}.{n}.weight", (HIDDEN, HIDDEN))
        add(f"blk.{b}.ffn_gate.weight", (FF, HIDDEN))
        add(f"blk.{b}.ffn_up.weight", (FF, HIDDEN))
        add(f"blk.{b}.ffn_down.weight", (HIDDEN, FF))
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    add("output.weight", (VOCAB, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return params


def quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} ({rc})")


def child(mode: str, path: str) -> None:
    import numpy as np

    from ewq import api
    from ewq.analysis import quantized

    if mode != "read":  # load the jitted kernels before the clock starts
        quantized.quant_stats("Q4_K", np.zeros(144, np.uint8))
    start = time.perf_counter()
    if mode == "read":
        fd = os.open(path, os.O_RDONLY)
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        off = 0
        while n := os.preadv(fd, [view], off):
            off += n
        os.close(fd)
    else:
        api.analyze(path)
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as fh:
        peak = next(int(x.split()[1]) for x in fh if x.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "peak_kib": peak}))


def run(mode: str, path: Path, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="ewq-gguf-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        files: dict[tuple[str, int], Path] = {}
        params: dict[int, int] = {}
        for layers in (2, 8):
            f16 = folder / f"f16-{layers}.gguf"
            params[layers] = write_f16(f16, layers)
            for name, ftype in (("Q4_K_M", 15), ("Q4_1", 3)):
                files[name, layers] = folder / f"{name}-{layers}.gguf"
                quantize(f16, files[name, layers], ftype)
            f16.unlink()
        extra = params[8] - params[2]
        print(f"marginal parameters (8 - 2 layers): {extra / 1e9:.3f} G")
        for name in ("Q4_K_M", "Q4_1"):
            for f in (files[name, 2], files[name, 8]):
                run("read", f, {})  # warm the page cache
            t = {}
            for mode, env in (
                ("read", {}),
                ("blocks", {}),
                ("gguf-py", {"EWQ_QUANT_KERNELS": "0"}),
            ):
                small = run(
                    "read" if mode == "read" else "analyze", files[name, 2], env
                )
                big = run("read" if mode == "read" else "analyze", files[name, 8], env)
                t[mode] = (big["seconds"] - small["seconds"], small, big)
            rate = {m: extra / v[0] / 1e9 for m, v in t.items()}
            size = files[name, 8].stat().st_size - files[name, 2].stat().st_size
            print(
                f"{name}: blocks {rate['blocks']:.2f} Gparam/s, gguf-py "
                f"{rate['gguf-py']:.2f} Gparam/s ({rate['blocks'] / rate['gguf-py']:.1f}x), "
                f"plain read {size / t['read'][0] / 1e9:.2f} GB/s = "
                f"{rate['read']:.2f} Gparam/s (blocks at "
                f"{rate['blocks'] / rate['read']:.2f}x of reading); peak RSS "
                f"{t['blocks'][1]['peak_kib'] / 1024:.0f} / "
                f"{t['blocks'][2]['peak_kib'] / 1024:.0f} MiB (2 / 8 layers)"
            )
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
