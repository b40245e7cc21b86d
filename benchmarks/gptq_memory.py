"""GPTQ rounding in memory flat in model size (ewq.calibration.moments): what it
costs and what it keeps, in one run per part.

``quality MODEL.gguf EVAL CALIBRATION``: at llama.cpp's preset types, GPTQ
rounding with float32 second moments shared per input and float32 column updates
(today's) against float32 moments with float64 updates, and against float64 for
both (the types switched in process); a noise control: float64 with the damping
2% larger, a change no one would call a loss, to say how far any perturbation
moves GPTQ's KL; and one pass over the text against a pass per block
(``--memory-limit`` of one block): KL from the source on the evaluation text, the
ratios to float64, and whether the per-block passes wrote the same bytes.

``precision MODEL.gguf CALIBRATION EVAL``: what GPTQ minimises, per tensor, on
text it did not see: each weight's output error tr(E H_eval E^T) after rounding
against float32 and against float64 second moments of the calibration text, at
several dampings, as a share of ggml's own rounding's (given H's diagonal);
geometric means over the tensors. Where float32 and float64 agree here, a
difference in the whole model's KL is GPTQ's sensitivity to any change of its
inputs, not a loss of the type.

``passes MODEL.gguf CALIBRATION --memory-limit M``: the passes that give every
block's second moments under a memory limit, two ways in one run: each later
group run alone on a slice of the model from the saved residual stream (today's,
for the architectures in ewq/arch/graphs.toml), and every block before a group
run again for it (the way before, and still the way for other architectures):
seconds of each pass, their sum and its ratio, peak RSS, and whether the two gave
the same second moments bit for bit.

``scale``: synthetic GGUFs with Llama-2-7B's layer shapes (width 4096, MLP 11008,
32 heads; F16, random weights: time and memory only, never quality) and the
default model's tokenizer, at ``--blocks`` (2 and 6): `ewq quantize
--calibration` with llama.cpp's own Q4_K_M recipe as the plan, against
llama.cpp's ``llama-imatrix`` + ``llama-quantize Q4_K_M`` on the same text
(benchmarks/llama_tools.sh builds them): wall seconds and each command's peak RSS
(the largest process), the ratio, the passes, and peak RSS growth from the first
size to the last against the file's growth.

    python benchmarks/gptq_memory.py quality MODEL EVAL CALIB [--presets ...]
    python benchmarks/gptq_memory.py precision MODEL CALIB EVAL [--type Q4_K]
    python benchmarks/gptq_memory.py passes MODEL CALIB --memory-limit 1GiB
    python benchmarks/gptq_memory.py scale [--blocks 2,6] [--chunks 8] \\
        [--memory-limit 2GiB] [--work DIR] [--json OUT]

Run alone: llama.cpp's threads spin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, FFN, HEADS = 4096, 11008, 32
ROOT = Path(__file__).resolve().parents[1]


def quality(a) -> dict:
    import numpy as np

    from ewq import api
    from ewq.api import _gptq
    from ewq.calibration import collect
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.data import load_text
    from ewq.evaluate.reference import Reference, text_metrics
    from ewq.planfile import plan_doc
    from ewq.quant import gptq
    from ewq.quant.gguf import quantize_preset
    from ewq.types import Precision

    layout = api.inspect(a.model).layout
    ref = Reference(
        a.model,
        load_text(a.eval_text),
        ctx=a.ctx,
        windows=a.windows,
        documents=a.documents,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets.split(","):
            types = quantize_preset(a.model, preset, Path(tmp) / "p.gguf")
            plan = plan_doc(
                layout.num_blocks,
                {b.exec_index: Precision.RAW for b in layout.transformer_blocks},
                tensors=types,
            )
            row = {"preset": preset}
            f32, f64, damp0 = np.float32, np.float64, gptq.DAMP
            for name, dtype, work, damp, limit in (
                ("float32", f32, f32, damp0, None),
                ("float32_per_block", f32, f32, damp0, "1"),
                ("updates_float64", f32, f64, damp0, None),
                ("float64", f64, f64, damp0, None),
                ("float64_damp", f64, f64, damp0 * 1.02, None),
            ):
                collect.MOMENTS_DTYPE, gptq.WORK = dtype, work
                gptq.DAMP = damp
                _gptq._HELD.clear()  # moments held from the variant before
                out = Path(tmp) / f"{preset}.{name}.gguf"
                started = time.perf_counter()
                q = api.quantize(
                    a.model,
                    plan,
                    out,
                    calibration=a.calibration,
                    documents=a.documents,
                    calibration_ctx=a.calib_ctx,
                    memory_limit=limit,
                )
                row[f"{name}_seconds"] = time.perf_counter() - started
                row[f"{name}_passes"] = q.rounding["passes"]
                row[f"kl_{name}"] = text_metrics(LlamaCppModel(out, a.ctx), ref)[
                    "kl_mean"
                ]
            collect.MOMENTS_DTYPE, gptq.WORK, gptq.DAMP = f32, f32, damp0
            one = (Path(tmp) / f"{preset}.float32.gguf").read_bytes()
            many = (Path(tmp) / f"{preset}.float32_per_block.gguf").read_bytes()
            row["per_block_same_bytes"] = one == many
            for k in ("float32", "updates_float64", "float64_damp"):
                row[f"kl_ratio_{k}_to_float64"] = row[f"kl_{k}"] / row["kl_float64"]
            rows.append(row)
            print(
                f"{preset}: KL float32 {row['kl_float32']:.6f}, float64 "
                f"{row['kl_float64']:.6f} ({row['kl_ratio_float32_to_float64']:.4f}x; "
                f"float64 updates {row['kl_ratio_updates_float64_to_float64']:.4f}x, "
                f"damping +2% {row['kl_ratio_float64_damp_to_float64']:.4f}x); "
                f"{row['float32_per_block_passes']} passes: same bytes "
                f"{row['per_block_same_bytes']}",
                flush=True,
            )
    return {"model": str(a.model), "eval_tokens": sum(map(len, ref.seqs)), "rows": rows}


def precision(a) -> dict:
    import gguf
    import numpy as np

    from ewq.calibration import collect
    from ewq.calibration.collect import compute_moments
    from ewq.evaluate.data import load_text
    from ewq.quant import ggml, gptq
    from ewq.sources.gguf import GGUFSource

    kw = {"ctx": a.ctx, "documents": a.documents, "tokens": a.tokens}
    moments = {}
    for name, dtype, path in (
        ("float64", np.float64, a.calibration),
        ("float32", np.float32, a.calibration),
        ("eval", np.float64, a.eval_text),
    ):
        collect.MOMENTS_DTYPE = dtype
        moments[name] = compute_moments(a.model, load_text(path), **kw)[1]
    collect.MOMENTS_DTYPE = np.float32
    qtype = int(gguf.GGMLQuantizationType[a.type])
    with GGUFSource(a.model) as s:
        infos = [t for t in s.index.tensors if moments["eval"].of(t.name) is not None]

    def error(w, code, h) -> float:
        back = ggml.dequantize(code, qtype, w.size).reshape(w.shape)
        e = (w - back).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", e, h, e))

    damp0, dampings = gptq.DAMP, [float(x) for x in a.dampings.split(",")]
    logs: dict[str, list[float]] = {}
    tensors = []
    try:
        for info in infos:
            w = ggml.tensor_values(info)
            held = moments["eval"].of(info.name).astype(np.float64)
            diag = np.diag(moments["float64"].of(info.name)).astype(np.float32)
            base = error(w, ggml.quantize(w, qtype, imatrix=diag), held)
            row = {"tensor": info.name}
            for damp in dampings:
                gptq.DAMP = damp
                for kind in ("float64", "float32", "float32_factor32"):
                    h = moments[kind.split("_")[0]].of(info.name)
                    gptq.FACTOR = (
                        np.float32 if kind.endswith("factor32") else np.float64
                    )
                    share = error(w, gptq.rounded(w, h, qtype, os.cpu_count()), held)
                    key = f"{kind}@{damp:g}"
                    row[key] = share / base
                    logs.setdefault(key, []).append(math.log(share / base))
            tensors.append(row)
            print(
                info.name,
                " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "tensor"),
                flush=True,
            )
    finally:
        gptq.DAMP = damp0
        gptq.FACTOR = np.float64
    geo = {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}
    for k, v in geo.items():
        print(f"{k}: held-out output error {v:.4f}x ggml's (geometric mean)")
    return {"model": str(a.model), "type": a.type, "geomean": geo, "tensors": tensors}


def synthetic(path: Path, blocks: int) -> int:
    """An F16 GGUF with Llama-2-7B's layer shapes and the default model's tokenizer
    (random weights, written tensor by tensor); returns its bytes."""
    import gguf
    import numpy as np

    from ewq.sources import default_model_path

    if path.is_file():
        return path.stat().st_size
    tok = gguf.GGUFReader(default_model_path())
    vocab = len(tok.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(blocks)
    tmp = path.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_block_count(blocks)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in tok.fields.items():
        if key.startswith("tokenizer."):
            _copy_field(w, key, field)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(
            np.float16
        )

    shapes = {"token_embd.weight": (vocab, HIDDEN)}
    for b in range(blocks):
        p = f"blk.{b}."
        shapes[p + "attn_norm.weight"] = (HIDDEN,)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[p + n + ".weight"] = (HIDDEN, HIDDEN)
        shapes[p + "ffn_norm.weight"] = (HIDDEN,)
        shapes[p + "ffn_gate.weight"] = (FFN, HIDDEN)
        shapes[p + "ffn_up.weight"] = (FFN, HIDDEN)
        shapes[p + "ffn_down.weight"] = (HIDDEN, FFN)
    shapes["output_norm.weight"] = (HIDDEN,)
    shapes["output.weight"] = (vocab, HIDDEN)
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            w.add_tensor_info(
                name, shape, np.dtype(np.float16), 2 * shape[0] * shape[1]
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for shape in shapes.values():
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            w.write_tensor_data(mat(*shape))
    w.close()
    tmp.rename(path)
    return path.stat().st_size


def _copy_field(w, key: str, field) -> None:
    import gguf

    T = gguf.GGUFValueType
    kind = field.types[0]
    if kind == T.ARRAY:
        sub = field.types[-1]
        values = [field.parts[i] for i in field.data]
        if sub == T.STRING:
            w.add_array(key, [bytes(v).decode("utf-8", "replace") for v in values])
        else:
            w.add_array(key, [v.tolist()[0] for v in values])
    elif kind == T.STRING:
        w.add_string(key, bytes(field.parts[field.data[0]]).decode("utf-8"))
    else:
        w.add_key_value(key, field.parts[field.data[0]].tolist()[0], kind)


def llama_tools() -> Path:
    """The folder of llama.cpp's own tools (benchmarks/llama_tools.sh builds them
    once)."""
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "llama_tools.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(done.stdout.split()[-1])


def tensor_bytes(path: Path) -> dict[str, int]:
    """Each tensor's data bytes in a GGUF file."""
    import gguf

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


def timed(cmd: list[str], log: Path) -> dict:
    """One command as a child process: wall seconds and the peak RSS of the largest
    process it ran (the kernel's accounting of the waited-for children)."""
    runner = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(time.perf_counter() - t, rc,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    with open(log, "a") as fh:
        done = subprocess.run(
            [sys.executable, "-c", runner, *cmd], stdout=subprocess.PIPE, stderr=fh
        )
    seconds, rc, rss = done.stdout.decode().split()[-3:]
    if int(rc) != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {rc}); see {log}")
    return {"seconds": float(seconds), "peak_rss": int(rss)}


def passes(a) -> dict:
    import ewq.calibration.moments as moments_mod
    from ewq.api._gptq import _limit
    from ewq.calibration.text import calibration_text
    from ewq.config import QuantizeConfig
    from ewq.sources import open_source

    index = open_source(str(a.model)).index
    text = calibration_text(a.calibration)
    limit = _limit(QuantizeConfig(memory_limit=a.memory_limit))
    entry = moments_mod.graph_entry
    import hashlib

    got: dict[str, dict] = {}
    held: dict[str, dict[str, str]] = {}  # matrix -> sha256 of its bytes

    def digests(m) -> dict[str, str]:
        return {n: hashlib.sha256(m.of(n).tobytes()).hexdigest() for n in m.names()}

    for how in ("sliced", "prefix"):
        moments_mod.graph_entry = entry if how == "sliced" else (lambda arch: None)
        try:
            run = moments_mod.MomentPasses(
                str(a.model),
                index,
                text,
                ctx=a.ctx,
                documents=a.documents,
                threads=None,
                limit=limit,
                tokens=a.tokens,
                workdir=Path(a.work) if a.work else None,
            )
            _, first = run.first()
            mats = digests(first)
            del first
            for m in run.rest():
                mats.update(digests(m))
                del m
        finally:
            moments_mod.graph_entry = entry
        held[how] = mats
        got[how] = {
            "passes": [list(p) for p in run.plan.passes],
            "seconds": run.seconds,
            "total_seconds": sum(run.seconds),
            "sliced": run.sliced,
            "stream_bytes": run.stream_bytes,
            # the process's peak so far (the sliced way runs first)
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        print(
            f"{how}: {len(run.seconds)} passes, {sum(run.seconds):.1f} s "
            f"({', '.join(f'{x:.1f}' for x in run.seconds)})",
            flush=True,
        )
    same = held["sliced"] == held["prefix"]
    ratio = got["prefix"]["total_seconds"] / got["sliced"]["total_seconds"]
    print(f"prefix / sliced: {ratio:.2f}x; same second moments: {same}")
    return {
        "model": str(a.model),
        "memory_limit": a.memory_limit,
        "tokens": a.tokens,
        "ctx": a.ctx,
        "ways": got,
        "prefix_over_sliced": ratio,
        "same_second_moments": same,
    }


def scale(a) -> dict:
    from ewq.evaluate.data import load_text
    from ewq.planfile import plan_doc
    from ewq.quant.gguf import preset_recipes
    from ewq.types import Precision

    tools = llama_tools()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calibration.txt"
    wiki = Path(os.environ.get("EWQ_SHARED_DATA", ROOT.parent / "shared" / "data"))
    text.write_text(load_text(wiki / "wikitext-2" / "valid.txt")[: a.chars])
    ewq = str(ROOT / ".venv" / "bin" / "ewq")
    log = work / "log.txt"
    rows = []
    for n in (int(x) for x in a.blocks.split(",")):
        src = work / f"llama2-7b-shapes-{n}.f16.gguf"
        size = synthetic(src, n)
        types = preset_recipes(src, ("Q4_K_M",))["Q4_K_M"]
        plan = work / f"plan-{n}.json"
        # exec_index 2..n+1: the transformer blocks (ewq.arch.layout)
        raw = {i: Precision.RAW for i in range(2, n + 2)}
        plan.write_text(json.dumps(plan_doc(n, raw, tensors=types)))
        out = work / f"ewq-{n}.gguf"
        for f in (out, Path(str(out) + ".ewq.json")):
            f.unlink(missing_ok=True)
        cmd = [ewq, "quantize", str(src), "--plan", str(plan), "--out", str(out)]
        cmd += ["--calibration", str(text), "--calibration-ctx", str(a.ctx)]
        if a.memory_limit:
            cmd += ["--memory-limit", a.memory_limit]
        env_cache = tempfile.mkdtemp(prefix="ewq-cache-")
        os.environ["EWQ_CACHE"] = env_cache  # from an empty cache
        ours = timed(cmd, log)
        record = json.loads(Path(str(out) + ".ewq.json").read_text())
        im = work / f"imatrix-{n}.gguf"
        theirs_im = timed(
            [
                str(tools / "llama-imatrix"),
                "-m",
                str(src),
                "-f",
                str(text),
                "-c",
                str(a.ctx),
                "-o",
                str(im),
                "-t",
                str(os.cpu_count()),
            ],
            log,
        )
        q = work / f"llama-{n}.gguf"
        theirs_q = timed(
            [
                str(tools / "llama-quantize"),
                "--imatrix",
                str(im),
                str(src),
                str(q),
                "Q4_K_M",
            ],
            log,
        )
        theirs = theirs_im["seconds"] + theirs_q["seconds"]
        row = {
            "blocks": n,
            "file_bytes": size,
            "ewq_seconds": ours["seconds"],
            "ewq_peak_rss": ours["peak_rss"],
            "llama_imatrix_seconds": theirs_im["seconds"],
            "llama_quantize_seconds": theirs_q["seconds"],
            "llama_peak_rss": max(theirs_im["peak_rss"], theirs_q["peak_rss"]),
            "ratio": ours["seconds"] / theirs,
            "rounding": record.get("rounding", {}),
            # tensors, not files: ewq's file carries its ewq.* metadata keys
            "same_tensor_bytes": tensor_bytes(out) == tensor_bytes(q),
        }
        rows.append(row)
        print(
            f"{n} blocks ({size / 2**30:.2f} GiB): ewq {ours['seconds']:.0f} s, peak "
            f"{ours['peak_rss'] / 2**30:.2f} GiB, {row['rounding'].get('passes')} "
            f"passes; llama.cpp {theirs:.0f} s (imatrix {theirs_im['seconds']:.0f}), "
            f"peak {row['llama_peak_rss'] / 2**30:.2f} GiB; {row['ratio']:.2f}x",
            flush=True,
        )
        for f in (out, q, im):
            f.unlink(missing_ok=True)
    doc = {"chars": a.chars, "ctx": a.ctx, "memory_limit": a.memory_limit}
    doc["rows"] = rows
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        growth = last["file_bytes"] - first["file_bytes"]
        doc["rss_growth_over_file_growth"] = (
            last["ewq_peak_rss"] - first["ewq_peak_rss"]
        ) / growth
        print(
            f"peak RSS growth / file growth: {doc['rss_growth_over_file_growth']:.2f}"
        )
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("model", type=Path)
    q.add_argument("eval_text", type=Path)
    q.add_argument("calibration", type=Path)
    q.add_argument("--presets", default="IQ4_XS,Q4_K_M,Q3_K_S")
    q.add_argument("--documents", default="stream")
    q.add_argument("--ctx", type=int, default=512)
    q.add_argument("--windows", type=int, default=8)
    q.add_argument("--calib-ctx", type=int, default=512)
    e = sub.add_parser("precision")
    e.add_argument("model", type=Path)
    e.add_argument("calibration", type=Path)
    e.add_argument("eval_text", type=Path)
    e.add_argument("--type", default="Q4_K")
    e.add_argument("--dampings", default="0.01,0.02,0.05,0.1")
    e.add_argument("--documents", default="stream")
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--tokens", type=int, default=8192)
    m = sub.add_parser("passes")
    m.add_argument("model", type=Path)
    m.add_argument("calibration", type=Path)
    m.add_argument("--memory-limit", required=True)
    m.add_argument("--tokens", type=int, default=None)
    m.add_argument("--ctx", type=int, default=512)
    m.add_argument("--documents", default="stream")
    m.add_argument("--work", default=None)
    m.add_argument("--json", type=Path)
    s = sub.add_parser("scale")
    s.add_argument("--blocks", default="2,6")
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument(
        "--chars", type=int, default=20000, help="of WikiText-2 (validation)"
    )
    s.add_argument("--memory-limit", default=None)
    s.add_argument("--work", default=Path.home() / ".cache" / "ewq" / "synthetic7b")
    for p in (q, e, s):
        p.add_argument("--json", type=Path)
    a = ap.parse_args()
    parts = {"quality": quality, "precision": precision, "passes": passes}
    doc = (parts | {"scale": scale})[a.part](a)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
