"""Probes by swapping a tensor's bytes in a model llama.cpp has loaded, checked
against llama.cpp running the model as its quantizer writes it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from models import byte_vocab_llama, shared_data

from ewq import api
from ewq.errors import EwqError
from ewq.evaluate.metrics import kl_logits, logsumexp_rows
from ewq.quant import ggml
from ewq.sensitivity.kl import Calibration
from ewq.sensitivity.probe import Probes
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
        gap = np.concatenate(
            [
                kl_logits(p, lp, r, logsumexp_rows(r))
                for p, lp, r in zip(c.reference, c.lse, probes.reference, strict=True)
            ]
        ).mean()
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
