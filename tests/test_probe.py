"""Probes by swapping a tensor's bytes in a model llama.cpp has loaded, checked
against llama.cpp running the model as its quantizer writes it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import byte_vocab_llama, shared_data

from ewq import api
from ewq.errors import EwqError
from ewq.quant import ggml
from ewq.sensitivity.kl import Calibration
from ewq.sensitivity.probe import Probes, probe_starts
from ewq.sources.gguf import GGUFSource

pytest.importorskip("llama_cpp")

NAMES = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.1.ffn_up.weight"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    src = byte_vocab_llama(d / "m.gguf")
    text = (shared_data() / "wikitext-2" / "valid.txt").read_text()[:4000]
    (d / "t.txt").write_text(text)
    m = api.imatrix(src, d / "t.txt", ctx=64, chunks=4)
    return src, text, m


def _layout(src):
    a = api.analyze(src)
    return a.index, a.layout


@pytest.mark.parametrize(
    "name,type_name",
    [("blk.0.attn_q.weight", "Q4_K"), ("blk.1.ffn_up.weight", "Q2_K")],
)
def test_a_swapped_probe_is_what_llama_cpp_measures_written(setup, name, type_name):
    """The same KL (within the 8-bit activation rounding llama.cpp adds to a
    quantized tensor's product, a few percent) as the model written by llama.cpp's
    quantizer with that tensor at that type, on the same windows; and the swapped
    bytes are put back (no change: no KL)."""
    src, text, m = setup
    index, layout = _layout(src)
    with Probes(
        index, layout, NAMES, text, tokens=128, ctx=64, documents="stream", imatrix=m
    ) as probes:
        swapped = probes.kl({name: type_name})
        assert probes.kl({}) < 1e-9
        again = probes.kl({name: type_name})
    with Calibration(
        index, layout, text, tokens=128, ctx=64, documents="stream"
    ) as calib:
        written = calib.kl({name: type_name}, m)
    assert swapped == again > 1e-6
    assert swapped == pytest.approx(written, rel=0.1)


def test_a_quantized_source_is_probed_from_its_decoded_values(setup, tmp_path):
    """A Q8_0 source: the working copy holds ggml's decoding of each tensor, and the
    probes' reference is within llama.cpp's activation rounding of the source's."""
    src, text, m = setup
    plan = {
        "schema_version": 2,
        "num_blocks": 2,
        "blocks": [{"exec_index": i, "precision": "raw"} for i in range(2, 4)],
        "tensors": [{"name": n, "type": "Q8_0"} for n in NAMES],
    }
    q8 = tmp_path / "q8.gguf"
    api.quantize(src, plan, q8)
    index, layout = _layout(q8)
    infos = {i.name: i for i in GGUFSource(q8).index.tensors}
    with Probes(
        index, layout, NAMES, text, tokens=128, ctx=64, documents="stream", imatrix=m
    ) as probes:
        for n in NAMES:
            i = infos[n]
            raw = np.fromfile(q8, np.uint8, count=i.nbytes, offset=i.offset)
            decoded = ggml.dequantize(
                raw, int(gguf.GGMLQuantizationType.Q8_0), i.num_elements
            )
            np.testing.assert_array_equal(probes.values(n).ravel(), decoded)
        assert probes.kl({NAMES[1]: "Q4_K"}) > 1e-6
    with Calibration(index, layout, text, tokens=128, ctx=64, documents="stream") as c:
        gap = c.targets[0].kl(probes.first).mean()
    assert 0 <= gap < 1e-3


def test_a_tensor_not_in_the_copy_is_one_line(setup):
    src, text, m = setup
    index, layout = _layout(src)
    with Probes(
        index, layout, NAMES[:1], text, tokens=64, ctx=64, documents="stream", imatrix=m
    ) as probes:
        work = Path(probes.model.name)
        with pytest.raises(EwqError, match="not one the probes can change"):
            probes.kl({"blk.1.ffn_up.weight": "Q4_K"})
    assert not work.parent.exists()  # the working copy goes with the context


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_blocks=4),
        # Gemma-2 scales its input by sqrt(n_embd) even from embeddings, and ties
        # its output to the token embedding (a slice keeps that one whole)
        dict(n_blocks=4, arch="gemma2"),
        # Gemma-3's sliding-window pattern repeats every 6 blocks: slices start at 0, 6
        dict(n_blocks=8, arch="gemma3", window=16),
    ],
    ids=["llama", "gemma2", "gemma3"],
)
def test_probes_from_the_stream_measure_what_the_whole_model_does(setup, tmp_path, kw):
    """A probe of a deep tensor runs a slice of the working copy from the residual
    stream the reference pass copied out (llama.cpp computes both): the same KL,
    bit for bit, as the probe over the whole model, and no fallback to it."""
    _, text, _ = setup
    src = byte_vocab_llama(tmp_path / "m.gguf", **kw)
    m = api.imatrix(src, _text(tmp_path, text), ctx=64, chunks=4)
    index, layout = _layout(src)
    n = kw["n_blocks"]
    names = [f"blk.{b}.{r}.weight" for b in range(n) for r in ("attn_v", "ffn_down")]
    window = dict(tokens=128, ctx=64, documents="stream", imatrix=m)
    got, starts, runs = {}, {}, {}
    for slices in (True, False):
        with Probes(index, layout, names, text, slices=slices, **window) as probes:
            got[slices] = {x: probes.kl({x: "Q3_K"}) for x in names}
            starts[slices], runs[slices], work = probes.starts, probes.runs, probes.work
        assert work is not None and not work.exists()
    assert starts[False] == [0]
    starts, runs = starts[True], runs[True]
    assert got[True] == got[False]
    assert min(got[True].values()) > 1e-6
    period = 6 if kw.get("arch") == "gemma3" else 1
    assert len(starts) > 1 and all(s % period == 0 for s in starts)
    deep = [x for x in names if int(x.split(".")[1]) >= starts[1]]
    assert sum(v for s, v in runs.items() if s > 0) == len(deep) > 0


def _text(tmp: Path, text: str) -> Path:
    path = tmp / "t.txt"
    path.write_text(text)
    return path


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.sets(st.integers(0, 200), max_size=60),
    period=st.integers(1, 8),
    most=st.integers(2, 12),
)
def test_probe_starts_cover_every_block_from_an_aligned_start(blocks, period, most):
    starts = probe_starts(blocks, period, most)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert len(starts) <= most
    assert all(s % period == 0 for s in starts)
    # every start is a period some probed block is in (none wasted)
    assert set(starts[1:]) <= {b // period * period for b in blocks}
    if len({0} | {b // period * period for b in blocks}) <= most:
        # each probed block's own period start is a start
        assert all(b // period * period in starts for b in blocks)


def test_a_slice_that_computes_other_logits_is_not_used(setup, tmp_path, monkeypatch):
    """Were a slice's logits not the whole model's (here: Gemma-2's input scale
    forgotten), the probes say so and run the whole working copy instead."""
    from ewq.arch.graphs import GraphEntry

    _, text, m = setup
    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=4, arch="gemma2")
    m = api.imatrix(src, _text(tmp_path, text), ctx=64, chunks=4)
    index, layout = _layout(src)
    names = ["blk.3.ffn_down.weight"]
    window = dict(tokens=128, ctx=64, documents="stream", imatrix=m)
    with Probes(index, layout, names, text, slices=False, **window) as probes:
        whole = probes.kl({names[0]: "Q3_K"})
    monkeypatch.setattr(GraphEntry, "input_scale", lambda self, n: 1.0)
    with Probes(index, layout, names, text, **window) as probes:
        assert probes.starts == [0, 2]
        got = probes.kl({names[0]: "Q3_K"})
        assert probes.starts == [0] and probes.runs[0] == 1
    assert got == whole
