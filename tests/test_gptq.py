"""GPTQ rounding inside llama.cpp's types (ewq.quant.gptq, `ewq quantize
--calibration`): the bytes are llama.cpp's format, read back by ggml and by
llama.cpp itself, and they lower the output error the rounding is for."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ewq import api
from ewq.calibration.collect import compute_moments, input_groups
from ewq.quant import ggml
from ewq.quant.gptq import rounded
from ewq.sources.gguf import GGUFSource


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    from models import byte_vocab_llama, shared_data

    root = tmp_path_factory.mktemp("gptq")
    src = byte_vocab_llama(root / "m.gguf")
    text = root / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:6000])
    return src, text


def _output_error(w, back, h):
    e = (w - back).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, h, e))


@pytest.mark.parametrize("type_name", ["Q4_K", "IQ4_XS", "Q3_K", "Q5_0"])
def test_gptq_bytes_decode_to_less_output_error(model_and_text, type_name):
    """ggml decodes the bytes (the same size as its own quantizer's), and on the
    activations llama.cpp computes for real text their output error tr(E H E^T) is
    below that of ggml's own rounding given the same importance (H's diagonal)."""
    src, text = model_and_text
    from ewq.evaluate.data import load_text

    _, moments = compute_moments(src, load_text(text), ctx=64, chunks=8)
    qtype = int(gguf.GGMLQuantizationType[type_name])
    with GGUFSource(src) as s:
        info = next(t for t in s.index.tensors if t.name == "blk.1.ffn_down.weight")
    w = ggml.tensor_values(info)
    h = moments.of(info.name).astype(np.float64)
    ours = rounded(w, h, qtype)
    plain = ggml.quantize(w, qtype, imatrix=np.diag(h).astype(np.float32))
    assert ours.nbytes == plain.nbytes == w.shape[0] * ggml.row_bytes(qtype, w.shape[1])
    back = ggml.dequantize(ours, qtype, w.size).reshape(w.shape)
    back_plain = ggml.dequantize(plain, qtype, w.size).reshape(w.shape)
    assert _output_error(w, back, h) < 0.95 * _output_error(w, back_plain, h)


def test_quantize_with_calibration_writes_what_llama_cpp_runs(model_and_text, tmp_path):
    """`ewq quantize --calibration`: llama.cpp loads the file, its metadata says how
    it was rounded, the provenance counts the tensors, and llama.cpp's KL from the
    source is below that of the same types rounded by llama.cpp."""
    src, text = model_and_text
    plan = _q3k_plan(src)
    near, gptq = tmp_path / "near.gguf", tmp_path / "gptq.gguf"
    api.quantize(src, plan, near)
    q = api.quantize(src, plan, gptq, calibration=text, calibration_ctx=64)
    assert q.rounding["method"] == "gptq"
    assert q.rounding["tensors"] == len(plan["tensors"])
    meta = gguf.GGUFReader(gptq).fields["ewq.rounding"].contents()
    assert meta == "gptq"
    kl = {}
    for name, path in (("near", near), ("gptq", gptq)):
        r = api.evaluate(src, "kld", data=text, quantized=path, limit=4, ctx=64)
        kl[name] = r.metrics["kl_mean"]
    assert 0 < kl["gptq"] < kl["near"]


def test_gptq_needs_a_calibration_text(model_and_text, tmp_path, monkeypatch, capsys):
    from test_cli import run

    src, _ = model_and_text
    plan = tmp_path / "p.json"
    code, _, err = run(
        monkeypatch, capsys, "plan", str(src), "--bpw", "4", "--json", str(plan)
    )
    assert code == 0, err
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(src),
        "--plan",
        str(plan),
        "--out",
        str(tmp_path / "q.gguf"),
        "--rounding",
        "gptq",
    )
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and "calibration text" in lines[0]
    assert not (tmp_path / "q.gguf").exists()


def test_second_moments_agree_with_the_importance_matrix(model_and_text):
    """X^T X of each distinct input, summed in float32 over rows held and multiplied
    out together: its diagonal is the importance matrix's per-column sums of squared
    activations (computed per window in float64), and it is symmetric."""
    from ewq.calibration import collect
    from ewq.evaluate.data import load_text

    src, text = model_and_text
    limit = collect.FLUSH_ROWS
    collect.FLUSH_ROWS = 100  # multiplied out many times on the way
    try:
        m, moments = compute_moments(src, load_text(text), ctx=64, chunks=8)
    finally:
        collect.FLUSH_ROWS = limit
    assert len(moments.names()) == 14  # 7 dense weights in each of 2 blocks
    assert len(moments.matrices) == 8  # 4 distinct inputs in each block
    for name in moments.names():
        h = moments.of(name)
        assert h.dtype == np.float32
        np.testing.assert_allclose(np.diag(h), m.entries[name].sums[0], rtol=1e-4)
        np.testing.assert_array_equal(h, h.T)
    assert set(moments.rows.values()) == {8 * 64}


def test_a_pass_without_sums_stops_after_its_last_block(model_and_text, monkeypatch):
    """A pass for block 0's second moments alone ends llama.cpp's graph at block 1's
    first product (no weight after it is seen), and block 0's matrices are those
    of a whole pass, bit for bit."""
    from ewq.calibration import collect
    from ewq.evaluate.data import load_text

    src, text = model_and_text
    _, whole = compute_moments(src, load_text(text), ctx=64, chunks=4)
    seen: list[str] = []
    dense = collect._Collector._dense

    def spy(self, name, src0, src1):
        seen.append(name)
        return dense(self, name, src0, src1)

    monkeypatch.setattr(collect._Collector, "_dense", spy)
    imatrix, part = compute_moments(
        src, load_text(text), ctx=64, chunks=4, blocks={0}, sums=False
    )
    assert imatrix is None and set(part.names()) == {
        n for n in whole.names() if n.startswith("blk.0.")
    }
    assert {n.split(".")[1] for n in seen} == {"0"} and len(seen) == 4 * 7
    for name in part.names():
        np.testing.assert_array_equal(part.of(name), whole.of(name))


def test_weights_that_llama_cpp_feeds_one_input_share_its_second_moment(
    model_and_text,
):
    """The groups are llama.cpp's own graph: q, k and v multiply the attention
    norm's output, gate and up the feed-forward norm's; the attention output and
    down each their own input (llama.cpp's build_attn and build_ffn)."""
    from ewq.evaluate.data import load_text

    src, text = model_and_text
    groups = input_groups(src, load_text(text), ctx=64)
    for b in range(2):
        p = f"blk.{b}."
        assert {n: g for n, g in groups.items() if n.startswith(p)} == {
            p + "attn_q.weight": p + "attn_q.weight",
            p + "attn_k.weight": p + "attn_q.weight",
            p + "attn_v.weight": p + "attn_q.weight",
            p + "attn_output.weight": p + "attn_output.weight",
            p + "ffn_gate.weight": p + "ffn_gate.weight",
            p + "ffn_up.weight": p + "ffn_gate.weight",
            p + "ffn_down.weight": p + "ffn_down.weight",
        }


def test_one_pass_and_a_pass_per_block_write_the_same_bytes(model_and_text, tmp_path):
    """A memory limit that holds one block's second moments makes a pass over the
    text per block, rounding each block as its pass completes; the file is the one
    a single pass writes, byte for byte, and the record says how it was made."""
    src, text = model_and_text
    plan = _q3k_plan(src)
    one, many = tmp_path / "one.gguf", tmp_path / "many.gguf"
    a = api.quantize(src, plan, one, calibration=text, calibration_ctx=64)
    b = api.quantize(
        src, plan, many, calibration=text, calibration_ctx=64, memory_limit="5MiB"
    )
    assert a.rounding["passes"] == 1 and b.rounding["passes"] == 2
    assert b.rounding["blocks_per_pass"] == [1, 1]
    assert a.rounding["distinct_inputs"] == 8 and a.rounding["weights"] == 14
    assert one.read_bytes() == many.read_bytes()


def test_a_memory_limit_that_cannot_be_read_is_one_line(model_and_text, tmp_path):
    from ewq.errors import EwqError

    src, text = model_and_text
    with pytest.raises(EwqError, match="--memory-limit"):
        api.quantize(
            src,
            _q3k_plan(src),
            tmp_path / "q.gguf",
            calibration=text,
            memory_limit="lots",
        )
    assert not (tmp_path / "q.gguf").exists()


def _q3k_plan(src) -> dict:
    """Every weight matrix of the transformer blocks at Q3_K, the rest as stored."""
    from ewq.planfile import plan_doc
    from ewq.types import Precision

    blocks = api.inspect(src).layout.transformer_blocks
    return plan_doc(
        len(blocks),
        {b.exec_index: Precision.RAW for b in blocks},
        tensors={
            i.name: "Q3_K" for b in blocks for i in b.tensors if len(i.shape) == 2
        },
    )


@pytest.mark.parametrize("precision", [np.float32, np.float64])
def test_the_inverse_factor_is_the_cholesky_factor_of_the_inverse(
    precision, monkeypatch
):
    """U from one Cholesky of the reversed matrix and a triangular inverse is the
    upper factor of H^-1 (damped; an unreached column kept at the damped unit),
    computed in float32 (the default) or float64."""
    from ewq.quant import gptq
    from ewq.quant.gptq import DAMP, _inverse_factor

    monkeypatch.setattr(gptq, "FACTOR", precision)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 64))
    x[:, 5] = 0.0  # a column no input reached
    h = x.T @ x
    u = _inverse_factor(h.astype(np.float32))
    assert np.allclose(u, np.triu(u))
    ref = h.copy()
    ref[5, 5] = 1.0
    ref[np.diag_indices(64)] += DAMP * np.mean(np.diag(ref))
    want = np.linalg.cholesky(np.linalg.inv(ref)).T
    assert u.dtype == precision
    np.testing.assert_allclose(u, want, rtol=1e-4, atol=1e-7)


def test_a_matrix_float32_cannot_factor_is_factored_in_float64():
    """Second moments past float32's range (inf once cast) fall back to a float64
    factor: finite, and the one float64 gives."""
    from ewq.quant import gptq

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 32)) * 1e20
    h = x.T @ x  # about 3e42: beyond float32
    u = gptq._inverse_factor(h)
    assert u.dtype == np.float64 and np.isfinite(u).all()
    gptq_f64 = gptq.FACTOR
    try:
        gptq.FACTOR = np.float64
        np.testing.assert_array_equal(u, gptq._inverse_factor(h))
    finally:
        gptq.FACTOR = gptq_f64


def test_lazy_batches_round_as_column_by_column_updates(model_and_text, monkeypatch):
    """Updating the columns beyond a batch once per batch is the same arithmetic as
    updating them after every ggml block: the same output error (and nearly every
    byte the same: sums in another order round differently in the last bit), in
    float64 updates, where the last bit is too small to move a rounding."""
    from ewq.evaluate.data import load_text
    from ewq.quant import gptq

    monkeypatch.setattr(gptq, "WORK", np.float64)
    src, text = model_and_text
    _, moments = compute_moments(src, load_text(text), ctx=64, chunks=4)
    with GGUFSource(src) as s:
        info = next(t for t in s.index.tensors if t.name == "blk.0.ffn_down.weight")
    w = ggml.tensor_values(info)
    h = moments.of(info.name)
    qtype = int(gguf.GGMLQuantizationType["Q4_0"])  # blocks of 32: 8 per batch
    lazy = gptq.rounded(w, h, qtype)
    monkeypatch.setattr(gptq, "BATCH", 32)
    eager = gptq.rounded(w, h, qtype)
    assert np.mean(lazy == eager) > 0.99
    errs = [
        _output_error(
            w, ggml.dequantize(q, qtype, w.size).reshape(w.shape), h.astype(np.float64)
        )
        for q in (lazy, eager)
    ]
    assert errs[0] == pytest.approx(errs[1], rel=1e-3)


def test_float32_updates_keep_float64s_output_error(model_and_text, monkeypatch):
    """The column updates in float32 (the default: half the memory and time of
    float64) round to within 2% of float64's output error, each below ggml's own
    rounding's, and on 2 threads to the bytes of 1."""
    from ewq.evaluate.data import load_text
    from ewq.quant import gptq

    src, text = model_and_text
    _, moments = compute_moments(src, load_text(text), ctx=64, chunks=8)
    with GGUFSource(src) as s:
        info = next(t for t in s.index.tensors if t.name == "blk.1.ffn_down.weight")
    w = ggml.tensor_values(info)
    h = moments.of(info.name).astype(np.float64)
    qtype = int(gguf.GGMLQuantizationType["Q4_0"])  # blocks of 32: many updates
    assert gptq.WORK is np.float32
    single = gptq.rounded(w, h, qtype)
    assert np.array_equal(single, gptq.rounded(w, h, qtype, threads=2))
    monkeypatch.setattr(gptq, "WORK", np.float64)
    wide = gptq.rounded(w, h, qtype)
    plain = ggml.quantize(w, qtype, imatrix=np.diag(h).astype(np.float32))
    err = {
        k: _output_error(w, ggml.dequantize(q, qtype, w.size).reshape(w.shape), h)
        for k, q in (("f32", single), ("f64", wide), ("ggml", plain))
    }
    assert err["f32"] == pytest.approx(err["f64"], rel=0.02)
    assert max(err["f32"], err["f64"]) < 0.95 * err["ggml"]


@given(
    sizes=st.lists(st.integers(1, 10**9), min_size=1, max_size=80),
    limit=st.integers(1, 4 * 10**9),
    period=st.sampled_from([1, 2, 6]),
)
def test_passes_hold_consecutive_blocks_within_the_limit(sizes, limit, period):
    """Every block in exactly one pass, in order; every pass after the first
    starts at a multiple of the period; a pass over the limit holds one period's
    blocks alone; no two neighbouring passes could have been one."""
    from ewq.calibration.moments import plan_passes

    blocks = dict(enumerate(sizes))
    p = plan_passes(blocks, limit, period)
    assert [b for group in p.passes for b in group] == sorted(blocks)
    for group, held in zip(p.passes, p.held, strict=True):
        assert held == sum(blocks[b] for b in group)
        assert held <= limit or len(group) <= period
        assert group[0] % period == 0
    for held, nxt in zip(p.held, p.passes[1:], strict=False):
        unit = [b for b in nxt if b // period == nxt[0] // period]
        assert held + sum(blocks[b] for b in unit) > limit


@pytest.mark.slow
@pytest.mark.parametrize(
    "when,signum",
    [
        ("importance matrix and second moments, pass 1/", 2),
        ("second moments, pass 2/", 15),
        ("GPTQ rounding: ", 2),
        ("GPTQ rounding: ", 15),
    ],
    ids=[
        "first pass-SIGINT",
        "second pass-SIGTERM",
        "rounding-SIGINT",
        "rounding-SIGTERM",
    ],
)
def test_a_signal_ends_gptq_at_every_stage_and_leaves_nothing(tmp_path, when, signum):
    """SIGINT or SIGTERM inside the passes over the calibration text (llama.cpp
    computing, the callback collecting) or while GPTQ rounds (numpy and LAPACK):
    128 + the signal within two seconds, no traceback, nothing left beside the
    inputs. The stage lines (stderr is a pipe) say when each stage is under way."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from models import byte_vocab_llama, shared_data
    from test_quantize import uniform_plan

    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=4, hidden=1024)
    text = tmp_path / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:16_000])
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(uniform_plan("4-bit", 4)))
    before = sorted(p.name for p in tmp_path.iterdir())
    cmd = [sys.executable, "-m", "ewq", "quantize", str(src), "--plan", str(plan)]
    cmd += ["--calibration", str(text), "--memory-limit", "40MiB"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "o.gguf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    while when.encode() not in seen:
        line = proc.stderr.readline()
        assert line, (seen + proc.communicate()[1]).decode()
        seen += line
    time.sleep(0.1)  # into the stage
    assert proc.poll() is None, (seen + proc.communicate()[1]).decode()
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    err = (seen + err).decode()
    assert proc.returncode == 128 + signum, err
    assert took < 2.0, (took, err)
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert signal.Signals(signum).name in ("SIGINT", "SIGTERM")


def test_the_default_token_cap_grows_with_the_widest_input():
    """--calibration-tokens: the measured floor for narrow models, 4 tokens per
    column of the widest weight input beyond it (X^T X of an input n wide needs n
    tokens for full rank); 0 is the whole text, a number is taken as given."""
    from types import SimpleNamespace as NS

    from ewq.calibration.text import token_cap
    from ewq.config import CALIBRATION_TOKENS_PER_WIDTH, DEFAULT_CALIBRATION_TOKENS

    def index(*shapes):
        return NS(
            tensors=[NS(name=f"blk.0.w{k}", shape=s) for k, s in enumerate(shapes)]
        )

    narrow = index((1536, 576), (576, 1536))
    wide = index((11008, 4096), (4096, 11008), (32000, 4096))
    assert token_cap(None, narrow) == DEFAULT_CALIBRATION_TOKENS
    assert token_cap(None, wide) == CALIBRATION_TOKENS_PER_WIDTH * 11008 > 8192
    assert token_cap(0, wide) is None and token_cap(100, wide) == 100


def test_weights_gptq_writes_are_copied_by_llama_cpp_not_quantized(
    model_and_text, tmp_path, monkeypatch
):
    """llama.cpp reads a source where every weight GPTQ rounds afterwards is
    already in its target type, a hole: it copies those (zeros) and quantizes the
    rest, and GPTQ writes them; the file is the one written when llama.cpp
    quantized every weight first, byte for byte, and no staged copy is left."""
    import ewq.api._quantize as quantize_mod

    src, text = model_and_text
    plan = _q3k_plan(src)
    a, b = tmp_path / "staged" / "a.gguf", tmp_path / "whole" / "b.gguf"
    a.parent.mkdir()
    b.parent.mkdir()
    r = api.quantize(src, plan, a, calibration=text, calibration_ctx=64)
    assert r.rounding["tensors"] == 14

    @contextlib.contextmanager
    def unstaged(index, targets, run, folder):
        yield Path(index.files[0]), set()

    monkeypatch.setattr(quantize_mod, "staged", unstaged)
    api.quantize(src, plan, b, calibration=text, calibration_ctx=64)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["a.gguf", "a.gguf.ewq.json"]


def test_a_weight_gptq_leaves_unwritten_is_never_committed(
    model_and_text, tmp_path, monkeypatch
):
    """Should the rounding skip a weight llama.cpp copied from a hole, the file
    (zeros there) is not written: one line, nothing beside the inputs."""
    import ewq.quant.gptq as gptq_mod
    from ewq.errors import EwqError

    src, text = model_and_text
    real = gptq_mod.patch

    def skips_one(path, values, moments, progress=None, threads=1):
        return real(path, values, moments, progress, threads)[1:]

    monkeypatch.setattr(gptq_mod, "patch", skips_one)
    out = tmp_path / "o" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(EwqError, match="GPTQ rounding did not write blk"):
        api.quantize(src, _q3k_plan(src), out, calibration=text, calibration_ctx=64)
    assert list(out.parent.iterdir()) == []


def test_quantize_after_the_plans_pass_runs_no_pass_of_its_own(
    model_and_text, tmp_path, fresh_cache, monkeypatch
):
    """A small model's importance-matrix pass (what ewq plan --calibration runs)
    also caches every block's second moments; a later quantize on the same text
    and windows runs no pass, says so, and writes the bytes a quantize from an
    empty cache writes."""
    from ewq.calibration.text import token_cap
    from ewq.sources import open_source

    src, text = model_and_text
    plan = _q3k_plan(src)
    cap = token_cap(None, open_source(str(src)).index)
    api.imatrix(src, text, ctx=64, tokens=cap)
    assert list((fresh_cache / "moments").glob("*.npz"))
    a = tmp_path / "a.gguf"
    r = api.quantize(src, plan, a, calibration=text, calibration_ctx=64)
    assert r.rounding["passes"] == 0 and r.rounding["tensors"] == 14
    assert "reused" in r.rounding
    b = tmp_path / "b.gguf"
    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "empty"))
    fresh = api.quantize(src, plan, b, calibration=text, calibration_ctx=64)
    assert fresh.rounding["passes"] == 1
    assert a.read_bytes() == b.read_bytes()


def test_one_command_plans_and_writes_as_the_two_do(
    model_and_text, tmp_path, monkeypatch, capsys
):
    """`ewq quantize SOURCE --bpw B --calibration T --out X`: the plan `ewq plan`
    makes (written beside the output with its importance matrix) and the model
    `ewq quantize --plan` writes from it, every tensor byte for byte (the metadata
    names other files); the rounding is GPTQ's."""
    from test_cli import run

    src, text = model_and_text
    calib = ["--calibration", str(text), "--calibration-ctx", "64"]
    calib += ["--criterion", "error", "--no-select", "--no-anchor"]
    one = tmp_path / "one.gguf"
    code, _, err = run(
        monkeypatch, capsys, "quantize", str(src), "--bpw", "4.5", *calib,
        "--out", str(one),
    )  # fmt: skip
    assert code == 0, err
    plan = tmp_path / "one.gguf.plan.json"
    beside = tmp_path / "one.gguf.plan.imatrix.gguf"
    assert plan.exists() and beside.exists()
    assert (tmp_path / "one.gguf.ewq.json").exists()
    two_plan = tmp_path / "two.json"
    code, _, err = run(
        monkeypatch, capsys, "plan", str(src), "--bpw", "4.5", *calib,
        "--json", str(two_plan),
    )  # fmt: skip
    assert code == 0, err
    types = [
        {t["name"]: t["type"] for t in json.loads(p.read_text())["tensors"]}
        for p in (plan, two_plan)
    ]
    assert types[0] == types[1] and len(set(types[0].values())) > 1
    two = tmp_path / "two.gguf"
    code, _, err = run(
        monkeypatch, capsys, "quantize", str(src), "--plan", str(two_plan),
        "--calibration", str(text), "--calibration-ctx", "64", "--out", str(two),
    )  # fmt: skip
    assert code == 0, err
    tensors = [
        {t.name: _raw(t) for t in GGUFSource(p).index.tensors} for p in (one, two)
    ]
    assert tensors[0] == tensors[1]
    record = json.loads((tmp_path / "one.gguf.ewq.json").read_text())
    assert record["rounding"]["method"] == "gptq"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--plan", "{plan}", "--bpw", "4"], "--bpw is for making a plan"),
        (["--plan", "{plan}", "--memory", "1GB"], "--memory is for making a plan"),
        (["--plan", "{plan}", "--probes", "8"], "--probes is for making a plan"),
        ([], "give --memory (one machine), --cluster FILE or --bpw BITS"),
    ],
)
def test_one_command_refuses_mixed_or_missing_budgets(
    model_and_text, tmp_path, monkeypatch, capsys, args, message
):
    from test_cli import run

    src, _ = model_and_text
    plan = tmp_path / "p.json"
    plan.write_text("{}")
    argv = [a.replace("{plan}", str(plan)) for a in args]
    out = tmp_path / "q.gguf"
    code, _, err = run(
        monkeypatch, capsys, "quantize", str(src), *argv, "--out", str(out)
    )
    assert code == 2 and message in " ".join(err.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_one_command_never_replaces_a_file_beside_the_output(
    model_and_text, tmp_path, monkeypatch, capsys
):
    """OUT.plan.json is the plan's: a file there that ewq did not write stays, and
    nothing is written."""
    from test_cli import run

    src, _ = model_and_text
    foreign = tmp_path / "q.gguf.plan.json"
    foreign.write_text("mine")
    out = tmp_path / "q.gguf"
    code, _, err = run(
        monkeypatch, capsys, "quantize", str(src), "--bpw", "4", "--out", str(out)
    )
    assert code != 0 and "q.gguf.plan.json" in err
    assert foreign.read_text() == "mine" and not out.exists()


def _raw(t) -> bytes:
    with open(t.file, "rb") as fh:
        fh.seek(t.offset)
        return fh.read(t.nbytes)
