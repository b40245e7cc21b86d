"""The sparse mirror's bookkeeping (ewq.sources.ranged): which bytes a read still
needs, checked against a byte-by-byte model of the file."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ewq.sources import ranged

SIZE = 400

spans = st.lists(
    st.tuples(st.integers(0, SIZE), st.integers(0, SIZE)).map(sorted).map(tuple),
    max_size=12,
)


def _file(tmp_path, held) -> ranged.RemoteFile:
    f = ranged.RemoteFile("http://x/f", SIZE, tmp_path / "f", {}, "http://x")
    f._have = ranged._merged([list(h) for h in held if h[0] < h[1]])
    return f


def _bytes(intervals) -> set[int]:
    return {i for a, b in intervals for i in range(a, b)}


@given(held=spans, asked=spans)
def test_missing_is_what_is_asked_and_not_held(tmp_path_factory, held, asked):
    f = _file(tmp_path_factory.mktemp("m"), held)
    want = _bytes(asked) - _bytes(f._have)
    gap = ranged._GAP
    try:
        ranged._GAP = 1  # no merging across gaps: exactly the missing runs
        exact = f._missing(list(asked))
    finally:
        ranged._GAP = gap
    assert _bytes(exact) == want
    assert all(a < b for a, b in exact)
    assert all(x[1] < y[0] for x, y in zip(exact, exact[1:], strict=False))
    # with the real gap: the same bytes and perhaps the held or unasked ones
    # between them, every range still starting and ending on a byte it needs
    merged = f._missing(list(asked))
    assert want <= _bytes(merged)
    assert all(a in want and b - 1 in want for a, b in merged)
    assert len(merged) <= len(exact)
