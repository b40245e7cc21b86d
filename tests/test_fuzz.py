"""A seeded mutation fuzzer over every kind of input ewq reads (issues 13 and 39).

Each case mutates one valid input (safetensors and GGUF headers, config.json, plan
JSON, cluster YAML, dataset CSV, FastEWQ .npz, importance matrices in llama.cpp's GGUF
and legacy .dat formats, calibration texts, per-tensor plans) or plans with a budget
that holds the model whole, and runs the command that reads it, in process. Every case must end in success (0), one `ewq: error:` line and exit 1, or a
usage error (2): never a traceback, never a file left behind after a failure. The
counts per kind are printed (pytest -s) and asserted.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from models import Q, byte_vocab_llama, gguf_tensors, shared_data, write_gguf
from test_cli import run

from ewq.quant.gguf import quantize_preset

CASES = {  # per input kind; >= 2,000 in all
    "safetensors": 500,
    "gguf": 500,
    "config": 330,
    "plan": 250,
    "cluster": 250,
    "csv": 200,
    "classifier": 120,
    # issue 39: the planner's edge and the newest inputs
    "whole": 24,  # budgets that hold the model whole
    "imatrix": 80,  # importance matrices, both formats, mutated
    "text": 27,  # calibration texts of every wrong kind
    "tensor_plan": 80,  # per-tensor plans, mutated
}

_HUGE = [
    10**5000,
    -(10**30),
    2**63,
    2**64 + 1,
    1e308,
    float("inf"),
    float("nan"),
    -1,
    0,
    0.5,
    "x",
    "",
    [],
    {},
    None,
    True,
    [1, [2, [3]]],
    "\ud800",
    "\x1b[2J",
]


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if not b:
            break
        if op < 0.4:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.6:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op < 0.8:  # insert
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:  # overwrite a little-endian integer with an extreme value
            at = rng.randrange(max(1, len(b) - 8))
            value = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1])
            b[at : at + 8] = struct.pack("<Q", value)[: len(b) - at]
    return bytes(b)


def _mutate_doc(doc, rng: random.Random):
    """Replace, drop or deepen one value somewhere in a JSON-like document."""
    if isinstance(doc, dict) and doc:
        key = rng.choice(list(doc))
        op = rng.random()
        out = dict(doc)
        if op < 0.15:
            del out[key]
        elif op < 0.25:
            out[rng.choice(["extra", "\ud800", "n" * 300])] = rng.choice(_HUGE)
        elif op < 0.6:
            out[key] = rng.choice(_HUGE)
        else:
            out[key] = _mutate_doc(doc[key], rng)
        return out
    if isinstance(doc, list) and doc:
        out = list(doc)
        i = rng.randrange(len(out))
        op = rng.random()
        if op < 0.2:
            del out[i]
        elif op < 0.3:
            out = out * rng.randint(2, 50)
        else:
            out[i] = _mutate_doc(out[i], rng)
        return out
    if rng.random() < 0.05:
        deep = 0
        for _ in range(rng.choice([50, 5000])):
            deep = [deep]
        return deep
    return rng.choice(_HUGE)


_TYPES = ["Q4_K", "Q8_0", "IQ2_XS", "IQ4_XS", "Q5_0", "Q2_K", "F16", "F32", "BF16"]
_TYPES += ["TQ1_0", "IQ1_S", "Q4_0_4_4", "NOPE", "", "q4_k"]


#: calibration text kinds, each met CASES["text"] / 9 times
_TEXTS = ["empty", "binary", "utf8", "line", "blank", "control", "fifo", "dir", "ok"]


def case_of(d: Path) -> int:
    """The case number of a case's folder (c0, c1, ...)."""
    return int(d.name[1:])


def _tensor_plan(rng: random.Random, default: str) -> dict:
    """A per-tensor plan for the byte-vocabulary Llama (2 blocks), some tensors at
    other types, one missing or one that the model does not have."""
    names = [
        f"blk.{b}.{t}.weight"
        for b in (0, 1)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")
    ] + ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "token_embd.weight"]
    tensors = [{"name": n, "type": default} for n in names]
    for t in rng.sample(tensors, rng.randint(0, 3)):
        t["type"] = rng.choice(_TYPES)
    if rng.random() < 0.2:
        tensors.pop(rng.randrange(len(tensors)))
    if rng.random() < 0.2:
        tensors.append({"name": "blk.9.attn_q.weight", "type": default})
    return {
        "schema_version": 2,
        "num_blocks": 2,
        "blocks": [{"exec_index": i, "precision": "raw"} for i in (2, 3)],
        "tensors": tensors,
    }


def _dump(doc) -> str:
    try:
        return json.dumps(doc, allow_nan=True)
    except (ValueError, RecursionError):
        return '{"x": ' + "[" * 3000 + "]" * 3000 + "}"


def _check(kind: str, case: int, code: int, err: str, out_dir: Path, keep: set):
    assert "Traceback" not in err, (kind, case, err[-2000:])
    assert code in (0, 1, 2), (kind, case, code, err[-2000:])
    if code == 1:
        lines = [ln for ln in err.splitlines() if ln.startswith("ewq: error: ")]
        assert len(lines) == 1, (kind, case, err[-2000:])
        left = {p.name for p in out_dir.iterdir()} - keep
        assert not left, (kind, case, left)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    llama = tiny_models["llama"]
    t = gguf_tensors("llama", 2, hidden=64)
    t = {k: (v[0], Q.F32 if v[1] == Q.F32 else Q.F16) for k, v in t.items()}
    gg = write_gguf(root / "m.gguf", "llama", 2, t, hidden=64)
    byte = byte_vocab_llama(root / "byte.gguf")  # what tests/data's imatrices fit
    q8 = root / "q8.gguf"
    quantize_preset(gg, "Q8_0", q8)
    return {
        "byte": byte,
        "q8": q8,
        "safetensors": (llama / "model.safetensors").read_bytes(),
        "config": json.loads((llama / "config.json").read_text()),
        "llama": llama,
        "gguf": gg.read_bytes(),
        "gguf_path": gg,
    }


def _kinds(seeds) -> dict[str, Callable]:
    """Per input kind: (workdir, rng) -> (argv, files to keep)."""

    def safetensors(d: Path, rng):
        folder = d / "m"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(seeds["config"]))
        (folder / "model.safetensors").write_bytes(
            _mutate_bytes(seeds["safetensors"][:4096], rng)
            + seeds["safetensors"][4096:]
            if rng.random() < 0.7
            else _mutate_bytes(seeds["safetensors"], rng)
        )
        cmd = rng.choice(["inspect", "analyze"])
        return [cmd, str(folder), "--json", str(d / "o.json")], {"m"}

    def gguf(d: Path, rng):
        f = d / "m.gguf"
        data = seeds["gguf"]
        cut = min(len(data), 6000)
        f.write_bytes(_mutate_bytes(data[:cut], rng) + data[cut:])
        cmd = rng.choice(["inspect", "analyze", "features"])
        return [cmd, str(f), "--json", str(d / "o.json")], {"m.gguf"}

    def config(d: Path, rng):
        folder = d / "m"
        folder.mkdir()
        (folder / "config.json").write_text(_dump(_mutate_doc(seeds["config"], rng)))
        if rng.random() < 0.5:
            shutil.copy(seeds["llama"] / "model.safetensors", folder)
            return ["inspect", str(folder)], {"m"}
        return ["features", str(folder / "config.json")], {"m"}

    def plan(d: Path, rng):
        doc = {
            "schema_version": 1,
            "kind": "ewq-plan",
            "num_blocks": 2,
            "embedding": {"precision": "raw"},
            "head": {"precision": "8-bit"},
            "blocks": [
                {"exec_index": 2, "precision": "4-bit", "num_parameters": 1},
                {"exec_index": 3, "precision": "raw"},
            ],
        }
        doc["blocks"][0].pop("num_parameters")
        p = d / "plan.json"
        p.write_text(_dump(_mutate_doc(doc, rng)))
        out = d / "o.gguf"
        return (
            ["quantize", str(seeds["gguf_path"]), "--plan", str(p), "--out", str(out)],
            {"plan.json"} | ({"o.gguf", "o.gguf.ewq.json"}),
        )

    def cluster(d: Path, rng):
        import yaml

        doc = {
            "reserve": "1KB",
            "machines": [
                {"name": "a", "memory": "200KB", "speed": 1.0, "host": "h:1"},
                {"name": "b", "memory": "1MB", "disk": "2MB"},
            ],
        }
        mutated = _mutate_doc(doc, rng)
        try:
            text = yaml.safe_dump(mutated, allow_unicode=True)
        except (yaml.YAMLError, RecursionError, UnicodeEncodeError, ValueError):
            text = "machines: " + "[" * 3000
        if rng.random() < 0.1:  # integers YAML reads but float() or int() cannot
            text = text.replace("200KB", rng.choice(["1" + "0" * 30, "9" * 5000]), 1)
        if rng.random() < 0.2:
            text = _mutate_bytes(text.encode("utf-8", "surrogatepass"), rng).decode(
                "utf-8", "replace"
            )
        c = d / "c.yaml"
        c.write_text(text, encoding="utf-8", errors="surrogatepass")
        argv = ["plan", str(seeds["llama"]), "--cluster", str(c), "--context", "0"]
        return [*argv, "--criterion", "position", "--json", str(d / "p.json")], {
            "c.yaml"
        }

    def csv_(d: Path, rng):
        rows = [
            "model_name,num_blocks,exec_index,num_parameters,quantization_type,quantized,label_source"
        ]
        for m in ("a", "b", "c"):
            for i in range(2, 8):
                q = rng.random() < 0.4
                rows.append(
                    f"{m},6,{i},{1000 + i},{'8-bit' if q else 'raw'},{int(q)},ewq"
                )
        text = "\n".join(rows) + "\n"
        data = (
            _mutate_bytes(text.encode(), rng) if rng.random() < 0.7 else text.encode()
        )
        if rng.random() < 0.1:
            data = b"\xef\xbb\xbf" + data
        f = d / "d.csv"
        f.write_bytes(data)
        return ["fast", "train", str(f), "--out", str(d / "m.npz")], {"d.csv"}

    def classifier(d: Path, rng):
        from ewq.fast.classify import default_model_path

        data = Path(default_model_path()).read_bytes()
        f = d / "c.npz"
        f.write_bytes(_mutate_bytes(data, rng))
        cfg = d / "config.json"
        cfg.write_text(json.dumps(seeds["config"]))
        argv = ["plan", str(cfg), "--memory", "1GB", "--method", "fast"]
        return [*argv, "--classifier", str(f)], {"c.npz", "config.json"}

    def whole(d: Path, rng):
        """A budget with room to spare: the plan keeps or upgrades everything and
        says so, for float and quantized sources, one machine or a cluster."""
        src = rng.choice([seeds["gguf_path"], seeds["q8"], seeds["llama"]])
        size = sum(f.stat().st_size for f in Path(src).rglob("*") if f.is_file())
        size = size or Path(src).stat().st_size
        room = int(size * rng.choice([1.5, 3, 100, 10**6]))
        argv = ["plan", str(src), "--context", "0", "--json", str(d / "p.json")]
        argv += ["--criterion", rng.choice(["error", "position", "entropy", "random"])]
        if rng.random() < 0.5:
            argv += ["--memory", f"{room}B"]
        else:
            c = d / "c.yaml"
            machines = "".join(
                f"  - {{name: m{i}, memory: {room}B}}\n"
                for i in range(rng.randint(1, 3))
            )
            c.write_text("machines:\n" + machines)
            argv += ["--cluster", str(c)]
        return argv, {"c.yaml"}

    tool = Path(__file__).parent / "data" / "imatrix-v1-byte-llama"

    def imatrix(d: Path, rng):
        """llama.cpp's own files, mutated: bytes, or values made NaN, infinite,
        negative or huge, or another model's matrix; read by a plan and by the
        quantizer."""
        ext = rng.choice([".gguf", ".dat"])
        data = bytearray(Path(str(tool) + ext).read_bytes())
        op = rng.random()
        if op < 0.5:
            data = bytearray(_mutate_bytes(bytes(data), rng))
        elif op < 0.9:  # float32 values past the header
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(len(data) // 2, len(data) - 4) & ~3
                value = rng.choice([float("nan"), float("inf"), -1.0, -1e30, 3e38])
                data[at : at + 4] = struct.pack("<f", value)
        f = d / f"m.imatrix{ext}"
        f.write_bytes(bytes(data))
        model = seeds["byte"] if op < 0.9 else seeds["gguf_path"]
        if rng.random() < 0.5:  # read and checked against the model (a criterion
            # that measures nothing: the error criterion's round trips take seconds)
            argv = ["plan", str(model), "--bpw", "4.5", "--context", "0"]
            argv += ["--imatrix", str(f), "--criterion", "position"]
            return argv, {f.name}
        p = d / "plan.json"
        p.write_text(json.dumps(_tensor_plan(rng, "IQ4_XS")))
        out = d / "o.gguf"
        argv = ["quantize", str(model), "--plan", str(p), "--out", str(out)]
        return [*argv, "--imatrix", str(f)], {f.name, "plan.json"}

    wiki = (shared_data() / "wikitext-2" / "valid.txt").read_bytes()[:6000]

    def text(d: Path, rng):
        """Calibration texts of every wrong kind: empty, binary, invalid UTF-8, one
        huge line, empty lines, control characters, a FIFO, a directory."""
        import os

        f = d / "t.txt"
        kind = _TEXTS[case_of(d) % len(_TEXTS)]
        if kind == "fifo":
            os.mkfifo(f)
        elif kind == "dir":
            f.mkdir()
        else:
            f.write_bytes(
                {
                    "empty": b"",
                    "binary": bytes(rng.randrange(256) for _ in range(4000)),
                    "utf8": wiki[:3000] + b"\xff\xfe\xc3" + wiki[3000:],
                    "line": wiki.replace(b"\n", b" ") * 40,
                    "blank": b"\n" * 20000 + wiki[:500],
                    "control": bytes(rng.randrange(32) for _ in range(3000)) + wiki,
                    "ok": _mutate_bytes(wiki, rng),
                }[kind]
            )
        argv = ["imatrix", str(seeds["byte"]), "--calibration", str(f)]
        argv += ["--out", str(d / "o.gguf"), "--ctx", "64", "--chunks", "2"]
        return argv, {"t.txt"}

    def tensor_plan(d: Path, rng):
        """Per-tensor plans, mutated: unknown types, types a tensor's rows do not
        allow, missing and extra tensors, a type that needs an importance matrix
        given none."""
        doc = _tensor_plan(rng, rng.choice(["Q4_K", "Q8_0", "IQ2_XS", "Q5_0"]))
        if rng.random() < 0.6:
            doc = _mutate_doc(doc, rng)
        p = d / "plan.json"
        p.write_text(_dump(doc))
        out = d / "o.gguf"
        return (
            ["quantize", str(seeds["byte"]), "--plan", str(p), "--out", str(out)],
            {"plan.json"},
        )

    return {
        "whole": whole,
        "imatrix": imatrix,
        "text": text,
        "tensor_plan": tensor_plan,
        "safetensors": safetensors,
        "gguf": gguf,
        "config": config,
        "plan": plan,
        "cluster": cluster,
        "csv": csv_,
        "classifier": classifier,
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_fuzz(kind, seeds, tmp_path, monkeypatch, capsys):
    rng = random.Random(f"ewq-fuzz-{kind}")
    make = _kinds(seeds)[kind]
    outcomes = {0: 0, 1: 0, 2: 0}
    proc = psutil.Process()
    base = proc.memory_info().rss
    n = CASES[kind] if kind != "csv" else CASES[kind] // 4  # training takes seconds
    for case in range(n):
        d = tmp_path / f"c{case}"
        d.mkdir()
        argv, keep = make(d, rng)
        started = time.monotonic()
        code, _, err = run(monkeypatch, capsys, *argv)
        assert time.monotonic() - started < 30, (kind, case)
        _check(kind, case, code, err, d, keep | {"o.json", "p.json", "m.npz"})
        outcomes[code] += 1
        assert proc.memory_info().rss - base < 2 * 2**30, (kind, case)
        shutil.rmtree(d)
    print(f"fuzz {kind}: {n} cases, {outcomes}")
    assert sum(outcomes.values()) == n
