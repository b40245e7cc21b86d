"""Passes over the calibration text that run a slice of the model from the residual
stream the pass before saved (ewq.calibration.slices, ewq/arch/graphs.toml): the
second moments are those one pass over the whole model gives, bit for bit, on
each architecture the table lists; llama.cpp itself computes both."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from models import byte_vocab_llama, shared_data

from ewq.calibration.collect import compute_moments
from ewq.calibration.moments import MomentPasses
from ewq.calibration.slices import SliceSource, block_of
from ewq.calibration.text import calibration_text
from ewq.sources import open_source

pytest.importorskip("llama_cpp")

CTX, TOKENS = 64, 256


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:6000])
    return path


def _passes(src: Path, text: Path, limit: int, tmp: Path) -> MomentPasses:
    index = open_source(str(src)).index
    return MomentPasses(
        str(src),
        index,
        calibration_text(text),
        ctx=CTX,
        documents="stream",
        threads=None,
        limit=limit,
        tokens=TOKENS,
        workdir=tmp,
    )


def _block_bytes(hidden: int) -> int:
    # per block: q/k/v's, attn_output's and gate/up's inputs (hidden columns),
    # ffn_down's (2 x hidden), float32, with the rows held before a product
    cols = [hidden] * 3 + [2 * hidden]
    return sum(4 * c * c + 4 * 512 * c for c in cols)


@pytest.mark.parametrize(
    "kw,limit_blocks,groups",
    [
        (dict(n_blocks=4), 1, [[0], [1], [2], [3]]),
        (dict(n_blocks=4, per_layer_heads=True), 2, [[0, 1], [2, 3]]),
        # Gemma-2 scales its input by sqrt(256) = 16 even from embeddings
        (dict(n_blocks=4, arch="gemma2", window=16), 1, [[0, 1], [2, 3]]),
        # Gemma-3's sliding-window pattern repeats every 6 blocks
        (
            dict(n_blocks=12, arch="gemma3", window=16),
            1,
            [list(range(6)), list(range(6, 12))],
        ),
    ],
    ids=["llama", "llama-per-layer-array", "gemma2", "gemma3"],
)
def test_slices_give_the_whole_models_second_moments(
    text, tmp_path, kw, limit_blocks, groups
):
    """The first pass runs the whole model (the importance matrix needs it); each
    later pass its group's blocks alone (the weights llama.cpp multiplied in it
    are its group's: no block before or after it was computed); every second
    moment is the one-pass value bit for bit."""
    src = byte_vocab_llama(tmp_path / "m.gguf", **kw)
    _, whole = compute_moments(src, calibration_text(text).text, ctx=CTX, tokens=TOKENS)
    run = _passes(src, text, limit_blocks * _block_bytes(256), tmp_path)
    assert run.sliced and [list(p) for p in run.plan.passes] == groups
    imatrix, first = run.first()
    got = [first, *run.rest()]
    assert imatrix is not None and len(imatrix.entries) == len(whole.names())
    assert {block_of(n) for n in first.groups} == set(range(kw["n_blocks"]))
    for group, moments in zip(groups, got, strict=True):
        if moments is not first:
            assert {block_of(n) for n in moments.groups} == set(group)
        for name in moments.names():
            assert np.array_equal(moments.of(name), whole.of(name)), name
    assert sorted(n for m in got for n in m.names()) == sorted(whole.names())
    record = run.record()
    assert record["passes_from_stream"] is True
    assert record["stream_bytes"] == TOKENS * 256 * 4
    assert not list(tmp_path.glob(".ewq-slice-*"))  # every slice removed


def test_a_slice_across_the_window_pattern_would_be_wrong(text, tmp_path, monkeypatch):
    """What the table's period is for: Gemma-3's blocks 0-4 attend within a
    sliding window and block 5 to everything (il % 6); sliced at block 3, block 5
    becomes the slice's block 2, attends within the window, and every second
    moment after its attention is another."""
    import ewq.calibration.moments as moments_mod
    from ewq.arch.graphs import GraphEntry

    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=6, arch="gemma3", window=16)
    _, whole = compute_moments(src, calibration_text(text).text, ctx=CTX, tokens=TOKENS)
    monkeypatch.setattr(moments_mod, "graph_entry", lambda arch: GraphEntry(arch))
    run = _passes(src, text, 3 * _block_bytes(256), tmp_path)
    assert [list(p) for p in run.plan.passes] == [[0, 1, 2], [3, 4, 5]]
    run.first()
    (later,) = run.rest()
    differ = [n for n in later.names() if not np.array_equal(later.of(n), whole.of(n))]
    assert {block_of(n) for n in differ} == {5}
    assert (
        len({later.groups[n] for n in differ}) == 3
    )  # attn_output's, gate/up's, down's


def test_a_slice_is_a_model_llama_cpp_loads(tmp_path):
    """Its blocks renumbered from 0, the block count and per-block arrays cut to
    them, every other key kept; the embedding and output matrix left as holes
    (zeros when read), the blocks' bytes copied."""
    from ewq.evaluate.backends import LlamaCppModel

    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=4, per_layer_heads=True)
    index = open_source(str(src)).index
    out = SliceSource(index).write_slice([1, 2], tmp_path / "s.gguf")
    r = gguf.GGUFReader(out)
    assert r.fields["llama.block_count"].contents() == 2
    assert r.fields["llama.attention.head_count_kv"].contents() == [2, 2]
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<unk>", "<s>", "</s>"]
    by = {t.name: t for t in r.tensors}
    assert {block_of(n) for n in by if block_of(n) is not None} == {0, 1}
    orig = {t.name: t for t in gguf.GGUFReader(src).tensors}
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        moved = name.replace(f"blk.{block_of(name)}.", f"blk.{block_of(name) + 1}.")
        assert np.array_equal(by[name].data, orig[moved].data)
    assert not by["token_embd.weight"].data.any() and not by["output.weight"].data.any()
    assert np.array_equal(
        by["output_norm.weight"].data, orig["output_norm.weight"].data
    )
    import llama_cpp as lc

    model = LlamaCppModel(out, CTX)
    assert lc.llama_model_n_layer(model.llm.model) == 2


def test_a_copy_with_nothing_changed_is_the_source_byte_for_byte(tmp_path):
    """The copier writes GGUF as the bundled model's own writer did: every key,
    tensor info, padding and byte of data the same."""
    from ewq.quant.sparse import GGUFCopy
    from ewq.sources import default_model_path

    src = default_model_path()
    out = GGUFCopy(open_source(str(src)).index).write(tmp_path / "copy.gguf")
    assert out.read_bytes() == src.read_bytes()


def test_a_full_disk_while_copying_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch
):
    import errno

    import ewq.quant.sparse as sparse
    from ewq.errors import EwqError

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=2)
    monkeypatch.setattr(sparse, "_copy", full)
    out = tmp_path / "w" / "s.gguf"
    out.parent.mkdir()
    with pytest.raises(EwqError, match="No space left on device"):
        SliceSource(open_source(str(src)).index).write_slice([1], out)
    assert list(out.parent.iterdir()) == []
