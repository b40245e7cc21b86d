"""Peak memory of streaming a sharded model, against loading it whole.

Writes a synthetic Llama-shaped bf16 model of about 4.4 GB in 5 shards, then in
separate processes (so each peak RSS is its own):

* ewq:      ``open_source(folder).iter_tensors()``, one tensor at a time;
* baseline: ``safetensors.torch.load`` of every shard's bytes, keeping the state
            dict: the whole model in memory, as a naive loader holds it.

Prints wall time, throughput and peak RSS of each, and their ratios. The page cache
is warmed first so both read from memory, not disk.

    .venv/bin/python benchmarks/stream_sharded.py [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, VOCAB, SHARDS = 2048, 5632, 40, 32000, 5


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_model(folder: Path) -> int:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
    }
    (folder / "config.json").write_text(json.dumps(config))
    shapes = tensor_shapes()
    names = list(shapes)
    per = -(-len(names) // SHARDS)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for s in range(SHARDS):
        shard = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {
            n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
            for n in names[s * per : (s + 1) * per]
        }
        save_file(part, folder / shard)
        total += sum(t.numel() * 2 for t in part.values())
        weight_map.update(dict.fromkeys(part, shard))
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def child(mode: str, folder: str) -> None:
    start = time.perf_counter()
    n = 0
    if mode == "write":
        print(json.dumps({"total": write_model(Path(folder))}))
        return
    if mode == "ewq":
        from ewq.sources import open_source

        with open_source(folder) as src:
            for info, _array in src.iter_tensors():
                n += info.num_elements
    else:
        from safetensors.torch import load

        state = {}  # the whole model in memory, as a naive loader holds it
        for shard in sorted(Path(folder).glob("*.safetensors")):
            state.update(load(shard.read_bytes()))
        n = sum(t.numel() for t in state.values())
    seconds = time.perf_counter() - start
    print(json.dumps({"params": n, "seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes.

    Not ru_maxrss: Linux carries that across fork and exec, so a child would report
    its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(folder)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write the model")
    ap.add_argument("--keep", action="store_true", help="keep the model afterwards")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ewq-bench-"))
    folder = root / "synthetic-llama"
    try:
        t0 = time.perf_counter()
        total = measure("write", folder)["total"]  # in a child: keep this process small
        print(
            f"wrote {total / 1e9:.2f} GB in {SHARDS} shards ({time.perf_counter() - t0:.0f} s)"
        )
        for f in folder.glob("*.safetensors"):  # warm the page cache
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        ewq, base = measure("ewq", folder), measure("baseline", folder)
        gb = 1e9
        for label, r in (("ewq stream", ewq), ("load all", base)):
            print(
                f"{label:14s} {r['seconds']:7.2f} s  {r['params'] / r['seconds'] / 1e9:5.2f} "
                f"Gparam/s  peak RSS {r['peak_rss'] / gb:6.3f} GB"
            )
        print(
            f"ewq peak RSS {ewq['peak_rss'] / gb:.3f} GB for a {total / gb:.2f} GB model "
            f"({ewq['peak_rss'] / total:.1%} of it); baseline/ewq memory ratio "
            f"{base['peak_rss'] / ewq['peak_rss']:.1f}x, time ratio "
            f"{base['seconds'] / ewq['seconds']:.2f}x"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
