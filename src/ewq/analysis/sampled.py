"""Sampled EWQ: each matrix's entropy estimated from a random sample of its rows,
with a confidence interval, and the EWQ decision taken from the estimates.

Why it works: with S = sum_i exp(w_i - c) and T = sum_i exp(w_i - c)(w_i - c) (any
shift c), a matrix's softmax entropy is exactly H = log S - T / S. S and T are sums
over elements, so a simple random sample of the matrix's row blocks (the units)
estimates both without bias: S^ = (U / k) sum_sampled s_u, likewise T^, for U units
and k sampled. H^ = log S^ - T^ / S^ is then consistent, and its variance follows by
the delta method from the covariance of (s_u, t_u) across the sampled units, with the
finite-population correction (1 - k / U):

    Var H^ ~ g' C g,   g = (1/S + T/S^2, -1/S),   C = U^2 (1 - k/U) cov(s, t) / k

A block's entropy is the parameter-weighted mean of its matrices' (docs/method.md 2), so
its variance is sum_k (n_k/N)^2 Var H^_k (matrices are sampled independently). A
matrix with fewer than ``min_units`` units is read whole (exact, variance 0).

Units: ``b`` consecutive rows, b = min(unit_bytes / row bytes, R / 256) (at least
1), so that a matrix has hundreds of units to choose from and a unit is one read of
up to 64 KiB (one HTTP range request through the hub). Rows of quantized GGUF
tensors hold whole quant blocks; they are dequantized as read.

The sample is deterministic and grows by adding units: each matrix's units come in
one fixed random order (ewq.sampling.row_order, the engine the sampled error
criterion uses, seeded by the seed and the tensor's name and matrix index), and a
sample of k units is the first k of that order.

The EWQ decision from estimates (:func:`sampled_decision`): a block whose interval
holds a decision boundary (the threshold T or the mean) cannot be decided by its
sample; its matrices are sampled again at four times the share, up to every unit,
and the blocks still undecided are reported, with the pairs of blocks whose order
(the quantization priority) the intervals leave open.
Only the exact entropy (eps = 0) is estimated: eps > 0 needs the full log-sum-exp
before any element's term.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ewq.analysis._units import RUN_ELEMENTS, block_stats, run_stats, runs, unit_shape
from ewq.analysis.decision import Decision, decide
from ewq.analysis.quantized import supported
from ewq.analysis.scan import FAST, counts_as_matrix, default_workers, matrices_of
from ewq.arch import ModelLayout
from ewq.errors import FormatError, InvalidParameterError
from ewq.sampling import row_order
from ewq.sources import TensorSource
from ewq.sources.base import check_finite
from ewq.types import BlockKind, TensorInfo

__all__ = [
    "Z",
    "BlockEstimate",
    "MatrixEstimate",
    "SampledDecision",
    "SampledProfile",
    "open_pairs",
    "sample_profile",
    "sampled_decision",
    "undecided",
]

Z = 2.576  # half-width of the stated intervals in standard errors (99%, normal)
MIN_UNITS = 8


@dataclass(frozen=True)
class MatrixEstimate:
    entropy: float
    variance: float  # of the estimate; 0 when the matrix was read whole
    units: int
    units_read: int
    bytes_read: int


@dataclass(frozen=True)
class BlockEstimate:
    exec_index: int
    kind: BlockKind
    num_parameters: int
    matrix_parameters: int
    entropy: float | None
    stderr: float
    bytes_read: int
    bytes_total: int

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.entropy is None:
            return None
        return self.entropy - Z * self.stderr, self.entropy + Z * self.stderr


@dataclass(frozen=True)
class SampledProfile:
    blocks: tuple[BlockEstimate, ...]
    fraction: float
    seed: int
    bytes_read: int
    bytes_total: int

    @property
    def transformer(self) -> tuple[BlockEstimate, ...]:
        return tuple(b for b in self.blocks if b.kind is BlockKind.TRANSFORMER)


def estimate(
    stats: Sequence[tuple[float, float, float]], units: int
) -> tuple[float, float]:
    """H^ and its delta-method variance from the units read (see the module text)."""
    k = len(stats)
    c = max(m for m, _, _ in stats)
    s = np.array([su * math.exp(m - c) for m, su, _ in stats])
    t = np.array([(tu + (m - c) * su) * math.exp(m - c) for m, su, tu in stats])
    big_s, big_t = units / k * s.sum(), units / k * t.sum()
    h = math.log(big_s) - big_t / big_s
    if k >= units or k < 2:
        return h, 0.0
    cov = np.cov(np.vstack([s, t]), ddof=1) * units**2 * (1 - k / units) / k
    g = np.array([1 / big_s + big_t / big_s**2, -1 / big_s])
    return h, max(0.0, float(g @ cov @ g))


def sample_matrix(
    src: TensorSource,
    info: TensorInfo,
    matrix: int,
    fraction: float,
    seed: int,
    *,
    read: Callable[[Callable[[], np.ndarray]], np.ndarray] | None = None,
    pool: ThreadPoolExecutor | None = None,
    seen: dict[int, tuple[float, float, float]] | None = None,
) -> MatrixEstimate:
    """Estimate one matrix (``matrix``-th of a stacked tensor) from a sample of its
    units: ``fraction`` of them, at least ``MIN_UNITS``, all of them when fewer.
    ``seen`` holds the statistics of units read before (by unit number); only the
    others are read, and the new ones are added to it."""
    rows, cols, b, n_units = unit_shape(info, src.granule(info))
    k = min(n_units, max(MIN_UNITS, math.ceil(fraction * n_units)))
    order = row_order(f"{info.name}#{matrix}", n_units, seed)
    chosen = np.sort(order[:k]) if k < n_units else np.arange(n_units)
    seen = {} if seen is None else seen
    base = matrix * rows * cols

    qtype = src.block_type(info)
    qtype = qtype if qtype is not None and supported(qtype) and FAST else None

    def one(run: tuple[int, int]) -> list[tuple[float, float, float]]:
        first, stop = run
        start, end = base + first * b * cols, base + min(rows, stop * b) * cols
        if qtype is not None:  # the sums straight from the quant blocks, as scan's
            found = block_stats(qtype, src.read_blocks(info, start, end), b * cols)
            if found is not None:
                return found
        values = src.read_range(info, start, end).reshape(-1)
        check_finite(info, values)
        return run_stats(values, b * cols)

    todo = runs(
        [u for u in chosen.tolist() if u not in seen],
        max(1, RUN_ELEMENTS // (b * cols)),
    )
    done = pool.map(one, todo) if pool is not None else map(one, todo)
    for (first, stop), part in zip(todo, done, strict=True):
        seen.update(zip(range(first, stop), part, strict=True))
    h, var = estimate([seen[u] for u in chosen.tolist()], n_units)
    row_bytes = info.nbytes / (matrices_of(info) * rows)
    read_rows = sum(min(rows, (u + 1) * b) - u * b for u in chosen)
    return MatrixEstimate(h, var, n_units, k, round(read_rows * row_bytes))


def sample_profile(
    src: TensorSource,
    layout: ModelLayout,
    *,
    fraction: float,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    refine: Mapping[int, float] | None = None,
    memo: dict | None = None,
) -> SampledProfile:
    """Every block's entropy estimated from ``fraction`` of each matrix's units.

    ``refine`` maps exec_index -> a larger fraction for that block's matrices;
    ``memo`` keeps each matrix's estimate by (tensor, matrix, fraction) and the
    statistics of the units it read, so a second call (a refinement round) reads
    only the units a larger share adds.
    """
    if not (0 < fraction <= 1):
        raise InvalidParameterError(
            f"the sample must be a fraction in (0, 1], got {fraction}"
        )
    if layout.num_blocks == 0:
        raise FormatError(f"{src.index.source}: no transformer blocks to analyse")
    refine = refine or {}
    jobs = []
    for block in layout.blocks:
        for t, key in zip(block.tensors, block.keys, strict=True):
            if counts_as_matrix(t, key):
                jobs.append((block.exec_index, t))
    total = sum(t.nbytes for _, t in jobs)
    est: dict[int, list[tuple[int, MatrixEstimate]]] = {}
    done = 0
    with ThreadPoolExecutor(workers or default_workers() * 4) as pool:
        for i, t in jobs:
            f = max(fraction, refine.get(i, 0.0))
            n_mat = matrices_of(t)
            for m in range(n_mat):
                k = (t.name, m, f, seed)
                e = memo.get(k) if memo is not None else None
                if e is None:
                    seen = (
                        memo.setdefault((t.name, m, seed), {})
                        if memo is not None
                        else None
                    )
                    e = sample_matrix(src, t, m, f, seed, pool=pool, seen=seen)
                    if memo is not None:
                        memo[k] = e
                est.setdefault(i, []).append((t.num_elements // n_mat, e))
            done += t.nbytes
            if progress is not None:
                progress(done, total, t.name)
    blocks = [
        _block(src, block, est.get(block.exec_index, [])) for block in layout.blocks
    ]
    return SampledProfile(
        tuple(blocks),
        fraction,
        seed,
        sum(b.bytes_read for b in blocks),
        total,
    )


def _block(src: TensorSource, block, parts) -> BlockEstimate:
    """A block's entropy from its matrices' estimates (``parts``: per matrix its
    parameters and estimate), weighed by parameters, with its variance."""
    n = sum(k for k, _ in parts)
    if not parts or n == 0:
        if block.kind is BlockKind.TRANSFORMER:
            raise FormatError(
                f"{src.index.source}: transformer block {block.exec_index} holds no "
                "float weight matrix to analyse"
            )
        h, var = None, 0.0
    else:
        h = math.fsum(k / n * e.entropy for k, e in parts)
        var = math.fsum((k / n) ** 2 * e.variance for k, e in parts)
    counted = [
        t
        for t, k in zip(block.tensors, block.keys, strict=True)
        if counts_as_matrix(t, k)
    ]
    return BlockEstimate(
        block.exec_index,
        block.kind,
        block.num_parameters,
        n,
        h,
        math.sqrt(var),
        sum(e.bytes_read for _, e in parts),
        sum(t.nbytes for t in counted),
    )


def undecided(blocks: Sequence[BlockEstimate], decision: Decision) -> tuple[int, ...]:
    """Transformer blocks whose interval holds a boundary of the decision (the
    threshold or the mean): their sample cannot tell which side they are on."""
    out = []
    for b in blocks:
        iv = b.interval
        if b.kind is not BlockKind.TRANSFORMER or iv is None or b.stderr == 0:
            continue
        if any(iv[0] <= x <= iv[1] for x in (decision.threshold, decision.mean)):
            out.append(b.exec_index)
    return tuple(out)


def open_pairs(
    blocks: Sequence[BlockEstimate], decision: Decision
) -> tuple[tuple[int, int], ...]:
    """Blocks next to each other in the quantization priority whose intervals
    overlap: the sample cannot order them."""
    by = {b.exec_index: b for b in blocks}
    pairs = []
    for a, b in zip(decision.priority, decision.priority[1:], strict=False):
        ia, ib = by[a].interval, by[b].interval
        if ia is not None and ib is not None and ia[1] >= ib[0]:
            pairs.append((a, b))
    return tuple(pairs)


@dataclass(frozen=True)
class SampledDecision:
    profile: SampledProfile
    decision: Decision
    undecided: tuple[int, ...]  # blocks whose side of a boundary the sample leaves open
    open_pairs: tuple[tuple[int, int], ...]
    rounds: int


def sampled_decision(
    src: TensorSource,
    layout: ModelLayout,
    *,
    fraction: float,
    alpha: float,
    variant,
    seed: int = 0,
    rounds: int = 3,
    workers: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> SampledDecision:
    """EWQ's decision from sampled entropies: blocks left undecided are sampled
    again at 4x their share, ``rounds`` times at most (or until read whole)."""
    refine: dict[int, float] = {}
    memo: dict = {}
    for done in range(rounds + 1):
        prof = sample_profile(
            src,
            layout,
            fraction=fraction,
            seed=seed,
            workers=workers,
            progress=progress,
            refine=refine,
            memo=memo,
        )
        h = {b.exec_index: b.entropy for b in prof.transformer}
        d = decide(h, alpha=alpha, variant=variant)
        # one block (or equal ones) has nothing to tell apart: it is at the mean
        left = undecided(prof.blocks, d) if len(h) > 1 else ()
        if not left or done == rounds:
            break
        for i in left:
            refine[i] = min(1.0, 4 * max(fraction, refine.get(i, 0.0)))
    return SampledDecision(prof, d, left, open_pairs(prof.blocks, d), done)
