"""Speed and memory of the data-free error criterion, every row against sampled rows,
with a plain read of the same files as the floor, in one run.

Synthetic Llama models (width 2048, as the analysis benchmark writes them) of 2 and
8 blocks: bf16 safetensors (``--format hf``), or the same shapes as a GGUF that
llama.cpp's own quantizer made Q4_K_M from F16 (``--format gguf``); each measurement in its own process from an empty
ewq cache (peak RSS from VmHWM), page cache warm. Printed per mode: seconds, the
marginal throughput between the two sizes (parameters the 8-block model adds /
seconds it adds: the embedding and fixed costs cancel), its ratio to plain reading,
peak RSS at both sizes, and for the sampled pass the share of rows read and the
widest interval.

    .venv/bin/python benchmarks/sensitivity_speed.py [--format hf|gguf]
        [--fraction 0.02] [--dir DIR]
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
from analyze_speed import warm  # noqa: E402
from stream_sharded import peak_rss, write_model  # noqa: E402


def child(mode: str, source: str, fmt: str, fraction: float) -> None:
    from ewq import api

    start = time.perf_counter()
    out: dict = {}
    if mode == "write":
        import stream_sharded

        stream_sharded.LAYERS = int(os.environ["BENCH_LAYERS"])
        if fmt == "gguf":
            print(json.dumps({"total": write_q4_k_m(Path(source))}))
        else:
            print(json.dumps({"total": write_model(Path(source))}))
        return
    if mode == "read":
        from ewq.sources import open_source

        n = 0
        with open_source(source) as src:
            buf = bytearray(max(t.nbytes for t in src.index.tensors))
            for info in src.index.tensors:
                n += info.num_elements
                fd = os.open(info.file, os.O_RDONLY)
                try:
                    os.preadv(fd, [memoryview(buf)[: info.nbytes]], info.offset)
                finally:
                    os.close(fd)
        out["params"] = n
    else:
        from ewq.sampling import Sampling

        sample = Sampling(fraction=fraction) if mode == "sampled" else None
        s = api.sensitivity(source, "error", format=fmt, sample=sample)
        out["params"] = sum(b.num_parameters for b in api.inspect(source).layout.blocks)
        rec = s.details.get("sampling")
        if rec:
            out["rows"] = rec["rows_read"] / max(1, rec["rows_total"])
            widths = [
                t["widest_relative_halfwidth"]
                for t in rec["tensors"].values()
                if t["widest_relative_halfwidth"] is not None
            ]
            out["widest"] = max(widths, default=0.0)
    out["seconds"] = time.perf_counter() - start
    out["peak_rss"] = peak_rss()
    print(json.dumps(out))


def write_q4_k_m(path: Path) -> int:
    """stream_sharded's Llama shapes as an F16 GGUF (random weights, llama.cpp's
    names), then llama.cpp's Q4_K_M of it at ``path``; returns its bytes."""
    import gguf
    import numpy as np
    import stream_sharded as s

    from ewq.quant.gguf import quantize_preset

    rng = np.random.default_rng(0)
    f16 = path.with_suffix(".f16.gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(f16, "llama")
    w.add_block_count(s.LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(s.HIDDEN)
    w.add_feed_forward_length(s.INTER)
    w.add_head_count(16)
    w.add_head_count_kv(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    def mat(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", mat(s.VOCAB, s.HIDDEN))
    for b in range(s.LAYERS):
        p = f"blk.{b}."
        w.add_tensor(p + "attn_norm.weight", np.ones(s.HIDDEN, np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + n + ".weight", mat(s.HIDDEN, s.HIDDEN))
        w.add_tensor(p + "ffn_norm.weight", np.ones(s.HIDDEN, np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(s.INTER, s.HIDDEN))
        w.add_tensor(p + "ffn_up.weight", mat(s.INTER, s.HIDDEN))
        w.add_tensor(p + "ffn_down.weight", mat(s.HIDDEN, s.INTER))
    w.add_tensor("output_norm.weight", np.ones(s.HIDDEN, np.float32))
    w.add_tensor("output.weight", mat(s.VOCAB, s.HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    try:
        quantize_preset(f16, "Q4_K_M", path)
    finally:
        f16.unlink(missing_ok=True)
    return path.stat().st_size


def measure(mode: str, source: str, fmt: str, fraction: float, env=None) -> dict:
    cache = tempfile.mkdtemp(prefix="ewq-bench-cache-")
    try:
        res = subprocess.run(
            [sys.executable, __file__, "--child", mode, source, fmt, str(fraction)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "EWQ_CACHE": cache, **(env or {})},
        ).stdout
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return json.loads(res.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="hf", choices=("hf", "gguf"))
    ap.add_argument("--fraction", type=float, default=0.02)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument(
        "--modes",
        default="read,sampled,full",
        help="what to measure (full, every row, is slow: GGUF's 8 blocks about 7 min)",
    )
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = tuple(args.modes.split(","))
    if args.child:
        mode, source, fmt, fraction = args.child
        return child(mode, source, fmt, float(fraction))
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ewq-sens-"))
    runs: dict[int, dict[str, dict]] = {}
    try:
        for layers in (2, 8):
            folder = root / f"llama-{layers}"
            if args.format == "gguf":
                folder = root / f"llama-{layers}.gguf"
            measure("write", str(folder), args.format, 0, {"BENCH_LAYERS": str(layers)})
            if folder.is_dir():
                warm(folder)
            else:
                with open(folder, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
            runs[layers] = {
                m: measure(m, str(folder), args.format, args.fraction) for m in modes
            }
            for m, r in runs[layers].items():
                extra = ""
                if "rows" in r:
                    extra = f"  rows read {r['rows']:.1%}, widest +-{r['widest']:.1%}"
                print(
                    f"{layers} blocks {m:8s} {r['seconds']:8.2f} s  peak RSS "
                    f"{r['peak_rss'] / 1e9:.3f} GB{extra}"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    small, big = runs[2], runs[8]
    print(f"\nmarginal throughput, 2 -> 8 blocks, format {args.format}:")
    rates = {}
    for m in modes:
        dp = big[m]["params"] - small[m]["params"]
        ds = big[m]["seconds"] - small[m]["seconds"]
        rates[m] = dp / ds / 1e9 if ds > 0 else float("inf")
        print(
            f"  {m:8s} {rates[m]:8.3f} Gparam/s   peak RSS "
            f"{small[m]['peak_rss'] / 1e9:.3f} -> {big[m]['peak_rss'] / 1e9:.3f} GB"
        )
    if "full" in rates:
        print(f"  sampled / full {rates['sampled'] / rates['full']:.1f}x")
    print(f"  sampled / plain read {rates['sampled'] / rates['read']:.3f}")


if __name__ == "__main__":
    main()
