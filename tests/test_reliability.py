"""Hand-made bad inputs, one per class the hostile-user tryout found (issue 13):
each ends in one `ewq: error:` line and exit 1, never a traceback."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from models import f16_gguf, plan_file, tiny_llama_config
from test_cli import run


def one_error(monkeypatch, capsys, *argv) -> str:
    code, _, err = run(monkeypatch, capsys, *argv)
    assert "Traceback" not in err, err
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("ewq: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('"vocab_size": Infinity', "not valid JSON"),
        ('"vocab_size": ' + "9" * 5000, "not valid JSON"),
        ('"num_attention_heads": 0', "num_attention_heads must be at least 1"),
        ('"architectures": [1, 2]', "architectures must be a list of names"),
        ('"tie_word_embeddings": "false"', "tie_word_embeddings must be true or false"),
        ('"hidden_size": -64', "hidden_size = -64 is out of range"),
        ('"x": ' + "[" * 5000 + "]" * 5000, "JSON nested"),
    ],
)
def test_bad_config_json(monkeypatch, capsys, tmp_path, tiny_models, change, message):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    text = (folder / "config.json").read_text().rstrip().rstrip("}")
    key = change.split(":")[0]
    doc = json.loads((folder / "config.json").read_text())
    doc.pop(json.loads(key), None)
    text = json.dumps(doc)[:-1] + ", " + change + "}"
    (folder / "config.json").write_text(text)
    for argv in (["inspect", str(folder)], ["features", str(folder / "config.json")]):
        assert message in one_error(monkeypatch, capsys, *argv)


def quantize_error(monkeypatch, capsys, src, plan, out) -> str:
    return one_error(
        monkeypatch,
        capsys,
        "quantize",
        str(src),
        "--plan",
        str(plan),
        "--out",
        str(out),
    )


def _safetensors(path, header: dict, data: bytes = b"\0" * 64):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": ["F32"], "shape": [4, 4], "data_offsets": [0, 64]}, "unknown dtype"),
        (
            {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]},
            "needs 73786976294838206464",
        ),
    ],
)
def test_bad_safetensors_header(monkeypatch, capsys, tmp_path, entry, message):
    f = _safetensors(
        tmp_path / "m.safetensors", {"model.layers.0.mlp.up_proj.weight": entry}
    )
    assert message in one_error(monkeypatch, capsys, "inspect", str(f))


@pytest.mark.parametrize("value", [0, 3, 2**31])
def test_bad_gguf_alignment(monkeypatch, capsys, tmp_path, value):
    import gguf

    f = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(f, "llama")
    w.add_block_count(1)
    w.add_custom_alignment(32)  # then patched: the writer needs a sane one
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(f.read_bytes())
    key = b"general.alignment"
    at = data.index(key) + len(key)
    (vtype,) = struct.unpack_from("<I", data, at)
    assert vtype == 4  # uint32
    struct.pack_into("<I", data, at + 4, value)
    f.write_bytes(bytes(data))
    assert "general.alignment" in one_error(monkeypatch, capsys, "inspect", str(f))


def test_an_analysis_json_given_as_a_plan(monkeypatch, capsys, tmp_path):
    src = f16_gguf(tmp_path / "m.gguf")
    plan = tmp_path / "a.json"
    plan.write_text(
        json.dumps({"schema_version": 1, "kind": "ewq-analysis", "blocks": 7})
    )
    line = quantize_error(monkeypatch, capsys, src, plan, tmp_path / "o.gguf")
    assert "an ewq analysis whose blocks are not a list" in line
    deep = tmp_path / "deep.json"
    deep.write_text('{"schema_version": 1, "blocks": ' + "[" * 5000 + "]" * 5000 + "}")
    line = quantize_error(monkeypatch, capsys, src, deep, tmp_path / "o.gguf")
    assert "nested too deeply" in line


def test_absurd_sizes(monkeypatch, capsys, tmp_path, tiny_models):
    model = str(tiny_models["llama"])
    line = one_error(monkeypatch, capsys, "plan", model, "--memory", "1e308TB")
    assert "larger than any machine" in line
    c = tmp_path / "c.yaml"
    c.write_text("machines:\n  - {name: a, memory: 1e308TB}\n")
    line = one_error(monkeypatch, capsys, "plan", model, "--cluster", str(c))
    assert "larger than any machine" in line
    c.write_text("machines: " + "[" * 3000 + "]" * 3000 + "\n")
    line = one_error(monkeypatch, capsys, "plan", model, "--cluster", str(c))
    assert "nested too deeply" in line


def test_classifier_zip_bomb_is_refused_before_inflating(tmp_path, monkeypatch, capsys):
    import zipfile

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("meta.npy", "{}")
        zf.writestr("big.bin", b"\0" * (300 * 2**20))  # deflates to ~300 KB
    assert bomb.stat().st_size < 2 * 2**20
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_llama_config()))
    line = one_error(
        monkeypatch,
        capsys,
        "plan",
        str(cfg),
        "--memory",
        "1GB",
        "--method",
        "fast",
        "--classifier",
        str(bomb),
    )
    assert "inflates to" in line


def test_dataset_csv_with_a_byte_order_mark_is_read(tmp_path):
    from ewq.fast.dataset import read_dataset

    cols = "model_name,num_blocks,exec_index,num_parameters,quantization_type,quantized"
    f = tmp_path / "d.csv"
    rows = [
        f"{m},2,{i},10,{p},{q}"
        for m in "mn"
        for i, p, q in ((2, "raw", 0), (3, "8-bit", 1))
    ]
    f.write_bytes(b"\xef\xbb\xbf" + (cols + "\n" + "\n".join(rows) + "\n").encode())
    got = read_dataset(f)
    assert got[0]["model_name"] == "m" and got[0]["exec_index"] == 2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [
                f"a,6,{i},{1000 + i},{'8-bit' if i % 2 else 'raw'},{i % 2}"
                for i in range(2, 8)
            ],
            "needs at least 2",
        ),
        (
            [f"{m},6,{i},{1000 + i},raw,0" for m in "abc" for i in range(2, 8)]
            + ["a,6,9,1,8-bit,1"],
            "at least 2 of each",
        ),
        (["a,6,2,100000000000000000000,raw,0"], "out of range"),
    ],
)
def test_datasets_the_study_cannot_use(tmp_path, monkeypatch, capsys, rows, message):
    cols = "model_name,num_blocks,exec_index,num_parameters,quantization_type,quantized"
    f = tmp_path / "d.csv"
    f.write_text(cols + "\n" + "\n".join(rows) + "\n")
    line = one_error(
        monkeypatch, capsys, "fast", "train", str(f), "--out", str(tmp_path / "m.npz")
    )
    assert message in line and not (tmp_path / "m.npz").exists()


def test_outputs_refused_before_any_work(monkeypatch, capsys, tmp_path, tiny_models):
    """A provenance path that is a folder, a --report that is a file, an empty
    --json: refused before anything is written (each used to leave a file)."""
    src = f16_gguf(tmp_path / "m.gguf")
    plan = plan_file(tmp_path / "plan.json", "8-bit")
    (tmp_path / "o.gguf.ewq.json").mkdir()  # the record's path is a folder
    line = quantize_error(monkeypatch, capsys, src, plan, tmp_path / "o.gguf")
    assert "is a folder" in line and not (tmp_path / "o.gguf").exists()
    cols = "model_name,num_blocks,exec_index,num_parameters,quantization_type,quantized"
    rows = [
        f"{m},6,{i},{1000 + i},{'8-bit' if i % 2 else 'raw'},{i % 2}"
        for m in "ab"
        for i in range(2, 8)
    ]
    data = tmp_path / "d.csv"
    data.write_text(cols + "\n" + "\n".join(rows) + "\n")
    (tmp_path / "r.txt").write_text("a file")
    line = one_error(
        monkeypatch,
        capsys,
        "fast",
        "train",
        str(data),
        "--out",
        str(tmp_path / "m.npz"),
        "--report",
        str(tmp_path / "r.txt"),
    )
    assert "is a file" in line and not (tmp_path / "m.npz").exists()
    code, _, err = run(monkeypatch, capsys, "inspect", str(src), "--json", "")
    assert code == 1 and "give a file name" in err


def test_a_cluster_host_with_a_lone_surrogate(
    monkeypatch, capsys, tmp_path, tiny_models
):
    c = tmp_path / "c.yaml"
    c.write_text('machines:\n  - {name: a, memory: 1GB, host: "\\ud800:1"}\n')
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        str(tiny_models["llama"]),
        "--cluster",
        str(c),
        "--context",
        "0",
        "--criterion",
        "position",
    )
    assert code in (0, 1) and "Traceback" not in err


def test_a_file_that_is_no_model_is_not_echoed(monkeypatch, capsys, tmp_path):
    """Its first bytes are not shown, not even as a header length."""
    f = tmp_path / "secret.txt"
    f.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    line = one_error(monkeypatch, capsys, "inspect", str(f))
    assert "not a safetensors file" in line
    assert str(struct.unpack("<Q", b"root:x:0")[0]) not in line and "root:x" not in line


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ("1" + "0" * 30, "larger than any machine"),  # an int float() cannot hold
        ("9" * 5000, "not a cluster file"),  # past Python's limit on int digits
    ],
)
def test_a_cluster_memory_of_absurd_size_is_one_line(
    monkeypatch, capsys, tmp_path, tiny_models, memory, message
):
    """Held-out fuzzing found both as tracebacks (OverflowError, ValueError)."""
    c = tmp_path / "c.yaml"
    c.write_text(f"machines:\n  - {{name: a, memory: {memory}}}\n")
    line = one_error(
        monkeypatch,
        capsys,
        "plan",
        str(tiny_models["llama"]),
        "--cluster",
        str(c),
        "--context",
        "0",
        "--criterion",
        "position",
    )
    assert message in line


@pytest.mark.parametrize("budget", ["memory", "cluster"])
@pytest.mark.parametrize("source", ["float", "quantized"])
def test_a_budget_that_holds_the_model_whole(
    monkeypatch, capsys, tmp_path, budget, source
):
    """A small model with room to spare is planned as it is: exit 0 and the plan
    table, no ZeroDivisionError comparing damages with llama.cpp's recipe (which
    does none either)."""
    from ewq.quant.gguf import quantize_preset

    src = f16_gguf(tmp_path / "m.gguf")
    if source == "quantized":
        src = tmp_path / "q.gguf"
        quantize_preset(tmp_path / "m.gguf", "Q8_0", src)
    where = ["--memory", "1GB"]
    if budget == "cluster":
        c = tmp_path / "c.yaml"
        c.write_text(
            "machines:\n  - {name: a, memory: 1GB}\n  - {name: b, memory: 1GB}\n"
        )
        where = ["--cluster", str(c)]
    out = tmp_path / "plan.json"
    code, stdout, err = run(
        monkeypatch, capsys, "plan", str(src), *where, "--json", str(out)
    )
    assert code == 0 and "Traceback" not in err, err
    doc = json.loads(out.read_text())
    assert doc["fits"] and doc["predicted_kl"] == 0


def test_an_importance_matrix_with_an_absurd_value(monkeypatch, capsys, tmp_path):
    """A legacy .dat whose bytes were overwritten into a finite but absurd value is
    refused when read, naming the tensor (it reached the allocator as NaN)."""
    from ewq.imatrix import Entry, Imatrix, write_imatrix

    src = f16_gguf(tmp_path / "m.gguf")
    name = "blk.0.attn_q.weight"
    vals = np.ones((1, 64), np.float32)
    vals[0, 3] = 3e38
    m = write_imatrix(
        Imatrix({name: Entry(vals, np.array([4]))}), tmp_path / "m.dat", legacy=True
    )
    line = one_error(
        monkeypatch, capsys, "plan", str(src), "--bpw", "4", "--imatrix", str(m)
    )
    assert name in line and "mean squared activation" in line


def test_a_damage_that_is_no_number_is_one_line_before_the_allocator():
    from ewq.api._fit import fit_tensors
    from ewq.arch import resolve
    from ewq.errors import EwqError
    from ewq.formats import GGUF
    from ewq.planning import Machine
    from ewq.sensitivity import Sensitivity
    from ewq.sources import open_source

    with open_source("default") as s:
        layout = resolve(s.index)
    bad = Sensitivity("error", {"blk.3.ffn_down.weight": {"Q5_0": float("nan")}})
    with pytest.raises(EwqError, match=r"blk\.3\.ffn_down\.weight.*nan.*Q5_0"):
        fit_tensors(GGUF, layout, bad, None, None, [Machine("m", 10**9)], None, None)


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_calibration_text_that_is_no_regular_file(
    monkeypatch, capsys, tmp_path, kind
):
    """Said as what it is, and never opened (a FIFO would block)."""
    import os

    src = f16_gguf(tmp_path / "m.gguf")
    text = {"directory": tmp_path, "device": "/dev/zero"}.get(kind)
    if kind == "fifo":
        text = tmp_path / "pipe"
        os.mkfifo(text)
    line = one_error(
        monkeypatch,
        capsys,
        "plan",
        str(src),
        "--bpw",
        "4",
        "--calibration",
        str(text),
    )
    assert "not a regular file" in line


def test_stages_say_what_they_do_where_no_progress_bar_is_seen(
    monkeypatch, capsys, tmp_path
):
    """stderr is not a terminal here (a pipe, a job queue): each long stage is a line
    with its size when it starts and one with its time when it ends, as llama.cpp's
    tools print theirs; what ewq says otherwise is unchanged."""
    import re

    js = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch, capsys, "plan", "default", "--bpw", "4.5", "--context", "0",
        "--json", str(js),
    )  # fmt: skip
    assert code == 0, err
    stages = [x for x in err.splitlines() if x.startswith("[ewq] ")]
    # a measurement an earlier run cached says so, inside its stage
    reused = [x for x in stages if ": reused from the cache (measured in " in x]
    stages = [x for x in stages if x not in reused]
    started = [x for x in stages if not re.search(r": done in [0-9. minh]+ s$", x)]
    ended = [x for x in stages if x not in started]
    assert any(re.match(r"\[ewq\] entropy analysis: 272 tensors, ", x) for x in started)
    assert any(x.startswith("[ewq] error criterion: 272 tensors") for x in started)
    assert len(started) == len(ended) >= 2, stages
    assert f"wrote {js}" in err
    # the second time, the errors come from the cache, and the run says so
    code, _, err = run(
        monkeypatch, capsys, "plan", "default", "--bpw", "4.5", "--context", "0",
    )  # fmt: skip
    assert code == 0 and "[ewq] errors: reused from the cache (measured in " in err
    assert "error criterion: reused from the cache (measured once in " in err


def test_no_stage_lines_on_a_terminal_without_verbose(monkeypatch, capsys, tmp_path):
    """On a terminal the progress bars say it: no stage lines unless -v."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = run(monkeypatch, capsys, "analyze", "default")
    assert code == 0 and "[ewq] " not in err, err
