"""Importance matrices, checked against llama.cpp's own llama-imatrix: files it wrote
for the tiny byte-vocabulary Llama (tests/data, made by
benchmarks/make_imatrix_testdata.sh) are read, ewq's in-process computation on the
same model and text agrees with them, and the quantizer is handed them as
llama-quantize hands them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from models import byte_vocab_llama, shared_data
from test_cli import run

from ewq import api
from ewq.imatrix import Entry, Imatrix, ImatrixError, read_imatrix, write_imatrix

pytest.importorskip("llama_cpp")

DATA = Path(__file__).parent / "data"
TOOL_GGUF = DATA / "imatrix-v1-byte-llama.gguf"
TOOL_DAT = DATA / "imatrix-v1-byte-llama.dat"
#: llama-imatrix (llama-cpp-python 0.3.36's llama.cpp, -c 128, -t 2) on wiki16k.txt
#: for byte_vocab_llama(experts=4): routed experts, two used per token
TOOL_MOE = DATA / "imatrix-v1-byte-moe.gguf"


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory) -> Path:
    return byte_vocab_llama(tmp_path_factory.mktemp("bytellama") / "model.gguf")


@pytest.fixture(scope="module")
def wiki16k(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "wiki16k.txt"
    path.write_bytes((shared_data() / "wikitext-2" / "valid.txt").read_bytes()[:16000])
    return path


def test_llama_cpps_files_are_read():
    g, d = read_imatrix(TOOL_GGUF), read_imatrix(TOOL_DAT)
    names = {
        f"blk.{b}.{t}.weight"
        for b in (0, 1)
        for t in (
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    assert set(g.entries) == set(d.entries) == names
    assert g.datasets == d.datasets == ("wiki16k.txt",)
    assert g.chunk_size == 128 and g.chunk_count == d.chunk_count > 10
    assert g.entries["blk.0.ffn_down.weight"].columns == 512
    for n in names:  # the two formats give the quantizer the same values
        np.testing.assert_allclose(
            g.entries[n].weights(), d.entries[n].weights(), rtol=1e-6
        )


def test_ewqs_computation_agrees_with_llama_imatrix(byte_llama, wiki16k):
    ref = read_imatrix(TOOL_GGUF)
    m = api.imatrix(byte_llama, wiki16k, ctx=128)
    assert set(m.entries) == set(ref.entries)
    assert m.chunk_count == ref.chunk_count and m.chunk_size == 128
    for n, e in ref.entries.items():
        assert m.entries[n].counts.tolist() == e.counts.tolist()  # tokens, exactly
        # to 0.1%: the tool sums in float32 and decodes 16 chunks per batch (other
        # matrix-product kernels); ewq sums in float64, one chunk per decode
        np.testing.assert_allclose(m.entries[n].sums, e.sums, rtol=1e-3, err_msg=n)


def test_routed_experts_agree_with_llama_imatrix(tmp_path, wiki16k):
    """Per expert, the tokens routed to it and the mean squares of their inputs, as
    llama-imatrix counts them (a file it wrote). Routing is not bit-stable across
    batchings (the tool decodes 16 chunks at a time): a few tokens near a tie go to
    another expert, so counts agree to 0.1% and weights to 5% (0.5% on average);
    the total is exact."""
    ref = read_imatrix(TOOL_MOE)
    src = byte_vocab_llama(tmp_path / "moe.gguf", experts=4)
    m = api.imatrix(src, wiki16k, ctx=128)
    assert set(m.entries) == set(ref.entries)
    exps = [n for n in ref.entries if "_exps" in n]
    assert len(exps) == 6
    for n in exps:
        got, want = m.entries[n], ref.entries[n]
        assert got.sums.shape == want.sums.shape == (4, want.columns)
        assert got.counts.sum() == want.counts.sum() == 2 * m.chunk_count * 128
        np.testing.assert_allclose(got.counts, want.counts, rtol=1e-3, err_msg=n)
        np.testing.assert_allclose(got.weights(), want.weights(), rtol=0.05, err_msg=n)
        assert np.mean(np.abs(got.weights() / want.weights() - 1)) < 0.005


def test_written_files_are_llama_cpps_format(tmp_path):
    """ewq's GGUF has the tool's keys and tensors (names, shapes, values); its .dat
    gives the same weights; both read back equal."""
    ref = read_imatrix(TOOL_GGUF)
    out = write_imatrix(ref, tmp_path / "m.gguf")
    a, b = gguf.GGUFReader(TOOL_GGUF), gguf.GGUFReader(out)
    keys = lambda r: {k for k in r.fields if not k.startswith("GGUF.")}  # noqa: E731
    assert (
        keys(a)
        == keys(b)
        == {
            "general.type",
            "imatrix.datasets",
            "imatrix.chunk_count",
            "imatrix.chunk_size",
        }
    )
    ta = {t.name: (tuple(t.shape), np.array(t.data)) for t in a.tensors}
    tb = {t.name: (tuple(t.shape), np.array(t.data)) for t in b.tensors}
    assert ta.keys() == tb.keys()
    for n in ta:
        assert ta[n][0] == tb[n][0]
        np.testing.assert_array_equal(ta[n][1], tb[n][1])
    dat = read_imatrix(write_imatrix(ref, tmp_path / "m.dat", legacy=True))
    for n, e in ref.entries.items():
        np.testing.assert_allclose(dat.entries[n].weights(), e.weights(), rtol=1e-6)


def _types_plan(types: dict[str, str]) -> dict:
    return {
        "schema_version": 2,
        "num_blocks": 2,
        "blocks": [{"exec_index": i, "precision": "raw"} for i in (2, 3)],
        "tensors": [{"name": n, "type": t} for n, t in types.items()],
    }


def test_quantize_hands_the_matrix_to_llama_cpp(byte_llama, tmp_path):
    """Quantized with the tool's file or with ewq's rewrite of it, the tensors are
    the same bytes (llama.cpp's quantizer read the same weights), they differ from
    the plain quantization, and the GGUF's metadata says so as llama-quantize
    writes it (quantize.imatrix.*)."""
    ref = read_imatrix(TOOL_GGUF)
    mine = write_imatrix(ref, tmp_path / "mine.dat", legacy=True)
    plan = _types_plan(
        {"blk.0.ffn_down.weight": "IQ3_S", "blk.1.attn_q.weight": "Q4_K"}
    )
    outs = {}
    for label, m in (("tool", TOOL_GGUF), ("mine", mine), ("none", None)):
        outs[label] = tmp_path / f"{label}.gguf"
        api.quantize(byte_llama, plan, outs[label], imatrix=m)
    data = {
        k: {t.name: bytes(t.data) for t in gguf.GGUFReader(p).tensors}
        for k, p in outs.items()
    }
    assert data["tool"] == data["mine"]
    assert (
        data["tool"]["blk.0.ffn_down.weight"] != data["none"]["blk.0.ffn_down.weight"]
    )
    r = gguf.GGUFReader(outs["tool"])
    f = r.fields
    assert bytes(f["quantize.imatrix.file"].parts[-1]).decode() == str(TOOL_GGUF)
    assert bytes(f["quantize.imatrix.dataset"].parts[-1]).decode() == "wiki16k.txt"
    assert int(f["quantize.imatrix.entries_count"].parts[-1][0]) == 14
    assert int(f["quantize.imatrix.chunks_count"].parts[-1][0]) == ref.chunk_count
    assert "quantize.imatrix.file" not in gguf.GGUFReader(outs["none"]).fields


def test_a_type_that_needs_a_matrix_is_refused_without_one(byte_llama, tmp_path):
    from ewq.errors import FormatError

    with pytest.raises(FormatError, match="only with an importance matrix"):
        api.quantize(
            byte_llama,
            _types_plan({"blk.0.ffn_up.weight": "IQ2_XS"}),
            tmp_path / "o.gguf",
        )
    assert not (tmp_path / "o.gguf").exists()


def test_cli_imatrix_then_plan_then_quantize(
    monkeypatch, capsys, tmp_path, byte_llama, wiki16k
):
    """`ewq imatrix` writes the file; `ewq plan --imatrix` records it (its SHA-256)
    and weighs by it; `ewq quantize` finds it beside the plan; the plan offers the
    types that need it."""
    m = tmp_path / "m.gguf"
    code, _, err = run(
        monkeypatch,
        capsys,
        "imatrix",
        str(byte_llama),
        "--calibration",
        str(wiki16k),
        "--ctx",
        "128",
        "--out",
        str(m),
    )
    assert code == 0, err
    assert read_imatrix(m).chunk_count == read_imatrix(TOOL_GGUF).chunk_count
    plan = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        str(byte_llama),
        "--bpw",
        "2.6",
        "--context",
        "0",
        "--imatrix",
        str(m),
        "--json",
        str(plan),
    )
    assert code == 0, err
    doc = json.loads(plan.read_text())
    assert doc["imatrix"]["sha256"] == read_imatrix(m).digest()
    assert doc["criterion"] == "error" and doc["bits_per_weight"] <= 2.6
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(byte_llama),
        "--plan",
        str(plan),
        "--out",
        str(tmp_path / "q.gguf"),
    )
    assert code == 0, err
    written = {
        t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors
    }
    assert all(written[t["name"]] == t["type"] for t in doc["tensors"])


def _bad(tmp_path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "case",
    [
        "truncated-gguf",
        "truncated-dat",
        "nan",
        "empty",
        "negative-count",
        "not-imatrix",
    ],
)
def test_a_bad_file_is_one_error_line(tmp_path, case):
    good = TOOL_GGUF.read_bytes()
    if case == "truncated-gguf":
        p = _bad(tmp_path, "m.gguf", good[: len(good) // 2])
    elif case == "truncated-dat":
        p = _bad(tmp_path, "m.dat", TOOL_DAT.read_bytes()[:300])
    elif case == "nan":
        ref = read_imatrix(TOOL_GGUF)
        e = ref.entries["blk.0.attn_q.weight"]
        sums = e.sums.copy()
        sums[0, 3] = np.nan
        p = write_imatrix(
            Imatrix(
                {**ref.entries, "blk.0.attn_q.weight": Entry(sums, e.counts)},
                ref.datasets,
                1,
                128,
            ),
            tmp_path / "m.gguf",
        )
    elif case == "empty":
        p = _bad(tmp_path, "m.dat", b"")
    elif case == "negative-count":
        p = _bad(tmp_path, "m.dat", struct.pack("<i", -3))
    else:
        p = Path(__file__).parent / "golden" / "plan.json"
    with pytest.raises(ImatrixError) as exc:
        read_imatrix(p)
    assert "\n" not in str(exc.value) and str(p) in str(exc.value)


@pytest.mark.parametrize("case", ["other-model", "wrong-length"])
def test_an_imatrix_for_another_model_is_refused_in_one_line(
    monkeypatch, capsys, tmp_path, byte_llama, case
):
    ref = read_imatrix(TOOL_GGUF)
    entries = dict(ref.entries)
    if case == "other-model":
        entries["blk.7.attn_q.weight"] = entries.pop("blk.0.attn_q.weight")
        want = "for another model"
    else:
        e = entries["blk.1.ffn_up.weight"]
        entries["blk.1.ffn_up.weight"] = Entry(e.sums[:, :100], e.counts)
        want = "rows are 256 wide"
    p = write_imatrix(Imatrix(entries, ref.datasets, 1, 128), tmp_path / "m.gguf")
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        str(byte_llama),
        "--bpw",
        "4",
        "--context",
        "0",
        "--imatrix",
        str(p),
    )
    lines = [x for x in err.splitlines() if x.startswith("ewq: error:")]
    assert code == 1 and len(lines) == 1 and want in lines[0], err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_imatrix_pass(tmp_path, signum):
    """Ctrl-C or SIGTERM while llama.cpp computes (the signal arrives inside the
    activation callback, where ctypes would drop it and the pass went on): the
    command ends with 128 + the signal, without a traceback or an output."""
    import subprocess
    import sys
    import time

    from models import byte_vocab_llama

    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=4, hidden=1024)
    text = tmp_path / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:200_000])
    out = tmp_path / "m.imatrix.gguf"
    cmd = [sys.executable, "-m", "ewq", "imatrix", str(src), "--calibration"]
    proc = subprocess.Popen(
        [*cmd, str(text), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # into the pass: its stage line (stderr is a pipe, so ewq prints one)
    assert proc.stderr is not None
    seen = b""
    while b"importance matrix: " not in seen:
        line = proc.stderr.readline()
        assert line, (seen + proc.communicate()[1]).decode()
        seen += line
    time.sleep(1)  # a few windows in
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    err = seen + err
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signum, err.decode()
    assert took < 5.0, took
    assert "Traceback" not in err.decode()
    assert not out.exists() and not list(tmp_path.glob(".m.imatrix*"))


def test_an_imatrix_for_output_that_takes_none_is_one_line(
    monkeypatch, capsys, tmp_path, byte_llama
):
    """The Hugging Face output's quantizer takes no importance matrix: quantize
    says which format does, in one line, and writes nothing."""
    plan = tmp_path / "plan.json"
    doc = {
        "schema_version": 1,
        "blocks": [{"exec_index": i, "precision": "8-bit"} for i in range(2, 4)],
        "embedding": {"precision": "8-bit"},
        "head": {"precision": "8-bit"},
    }
    plan.write_text(json.dumps(doc))
    out = tmp_path / "out"
    code, _, err = run(
        monkeypatch, capsys, "quantize", str(byte_llama), "--plan", str(plan),
        "--out", str(out), "--format", "hf", "--imatrix", str(TOOL_GGUF),
    )  # fmt: skip
    lines = [x for x in err.splitlines() if x.startswith("ewq: error:")]
    assert code == 1 and len(lines) == 1, err
    assert "an importance matrix is for GGUF files (--format gguf)" in lines[0]
    assert not out.exists()
