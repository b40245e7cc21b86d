"""The calibrated ``kl`` criterion: per tensor and type, the KL divergence of the
next-token distributions from the unquantized model's, predicted as

    KL(t, type) = k_t * g(type) * E(t, type)

* E: the tensor's imatrix-weighted relative squared error at that type (error.py),
  what llama.cpp's quantizer minimises, known exactly for every type.
* k_t: the tensor's sensitivity, measured: that tensor alone is stored at a probe
  type (its candidate nearest 4.25 bits per weight) by ggml's quantizer with the
  importance matrix, the model run by llama.cpp on windows of the calibration text
  (probe.py: one loaded working copy, the tensor's bytes swapped in place), and its
  mean KL divided by E at the probe type (the way ExLlamaV2/V3 measure layers, per
  tensor). At most ``probes`` tensors are measured, a pass each: the first and last
  of each role (attn_q, ffn_down, ...) and then those that halve the widest gaps in
  depth; the others' k_t are interpolated over depth between measured tensors of
  their role (log-linear), so that the passes stay the same from a 135M to a 70B
  model (benchmarks/probe_budget.py measures what that costs in plan quality).
* g: a factor per type, measured on a few tensors (``type_probes``, among those the
  source stores as floats; 1 for every type where there are none): per type, one
  model with those tensors at that type, written by llama.cpp's quantizer and run as
  written; g is its KL over the sum of k_t E. KL does not fall as fast as E at high
  precision (measured on IgLM: 4.5x at Q8_0, 2.1x at Q6_K, about 1 from Q5_K down),
  which one probe per tensor cannot see, and a swapped probe runs float weights
  while llama.cpp multiplies a quantized tensor by activations rounded to 8 bits
  (on the byte Llama's ffn_down at IQ4_XS: 4.5% more KL as written), which the
  factor at the probe type puts back. With ``type_probes`` None (or more than the
  model's float tensors) every type of every float tensor is written on its own,
  and each such (tensor, type) pair's KL is used as it is; with 0 none is written
  and a float tensor takes the data-free table's factors (prior.toml, measured on
  IgLM), which spares a whole model written per type on a large float source.

A plan's predicted KL is the sum over its tensors (first order: small perturbations
of different tensors add up in KL; benchmarks/damage_model.py measures how well,
against measured KL of random mixed plans).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ewq.arch import ModelLayout
from ewq.calibration.moments import memory_limit
from ewq.config import DEFAULT_PROBES
from ewq.errors import EwqError
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.metrics import Distribution
from ewq.evaluate.windows import readable, text_windows
from ewq.formats import FLOAT_TYPES, GGUF, Encoding
from ewq.imatrix import Imatrix
from ewq.planfile import plan_from_doc
from ewq.quant.gguf import quantize_gguf
from ewq.quant.sparse import block_of
from ewq.quant.targets import plan_targets
from ewq.sensitivity import Sensitivity, tensor_candidates
from ewq.sensitivity.prior import factor as prior_factor
from ewq.sensitivity.probe import Probes
from ewq.types import Container, ModelIndex, Precision

__all__ = [
    "PROBE_BITS",
    "Calibration",
    "chosen",
    "interpolated",
    "kl_sensitivity",
    "probe_type",
]

PROBE_BITS = 4.25  # the probe type: each tensor's candidate nearest this


def probe_type(info, encs: list[Encoding], errors: Mapping[str, float]) -> str | None:
    """The candidate nearest PROBE_BITS bits per weight (ties: the smaller error)."""
    best = None
    for e in encs[1:]:
        if not e.quantizable or errors.get(e.type, 0.0) <= 0:
            continue
        bits = 8.0 * e.nbytes / info.num_elements
        k = (abs(bits - PROBE_BITS), errors[e.type])
        if best is None or k < best[0]:
            best = (k, e.type)
    return None if best is None else best[1]


def _plan(layout: ModelLayout, tensors: dict[str, str]):
    n = layout.num_blocks
    return plan_from_doc(
        {
            "schema_version": 2,
            "num_blocks": n,
            "blocks": [
                {"exec_index": b.exec_index, "precision": Precision.RAW.value}
                for b in layout.transformer_blocks
            ],
            "tensors": [{"name": k, "type": v} for k, v in tensors.items()],
        }
    )


def _sampled(cands: dict, count: int | None) -> list[str]:
    """The tensors probed at every type: ``count`` of them (all: None), the largest
    of those with the most candidates, spread over the depth of the model."""
    names = sorted(
        cands, key=lambda n: (-len(cands[n][2]), -cands[n][0].num_elements, n)
    )
    if count is None or count >= len(names):
        return names
    if count <= 0:
        return []
    widest = [n for n in names if len(cands[n][2]) == len(cands[names[0]][2])]
    by_block: dict[int, str] = {}
    for n in widest:
        by_block.setdefault(cands[n][1].exec_index, n)
    blocks = sorted(by_block)
    if len(blocks) >= count:
        step = len(blocks) / count
        return [by_block[blocks[int(i * step + step / 2)]] for i in range(count)]
    return widest[:count]


def chosen(cands: Mapping[str, tuple], probes: int | None) -> list[str]:
    """The tensors to measure, at most ``probes`` of them (all: None) but never
    fewer than the first and last of each role (what interpolation needs at its
    ends): those, then again and again the midpoint of the widest depth gap left
    between measured tensors of one role (the lowest role and depth on ties)."""
    names = sorted(cands)
    if probes is None or probes >= len(names):
        return names
    by_role: dict[str, list[tuple[int, str]]] = {}
    for n in names:
        key = cands[n][1]
        by_role.setdefault(key.role.value, []).append((key.exec_index, n))
    picked: dict[str, list[int]] = {}  # role -> positions in its depth order
    for role, items in sorted(by_role.items()):
        items.sort()
        picked[role] = sorted({0, len(items) - 1})
    count = sum(len(v) for v in picked.values())
    while count < probes:
        best = None
        for role, pos in sorted(picked.items()):
            items = by_role[role]
            for a, b in zip(pos, pos[1:], strict=False):
                if b - a < 2:
                    continue
                gap = items[b][0] - items[a][0]
                if best is None or gap > best[0]:
                    best = (gap, role, (a + b) // 2)
        if best is None:
            break
        _, role, mid = best
        picked[role] = sorted([*picked[role], mid])
        count += 1
    return sorted(by_role[r][i][1] for r, pos in picked.items() for i in pos)


def interpolated(
    cands: Mapping[str, tuple], measured: Mapping[str, float]
) -> dict[str, float]:
    """Every tensor's sensitivity: measured where it was, else interpolated over depth
    (exec_index) between the nearest measured tensors of its role, in log space
    where both are positive (a sensitivity spans decades), the nearest one past the
    ends. A role with none measured is left out. Per tensor this is rough (on the
    default model a median factor 3.6 from the measured value at 32 probes, Spearman
    0.93), but the plans held (benchmarks/probe_budget.py: KL within 1.01x)."""
    out: dict[str, float] = {}
    by_role: dict[str, list[tuple[int, float]]] = {}
    for n, v in measured.items():
        if n in cands:
            key = cands[n][1]
            by_role.setdefault(key.role.value, []).append((key.exec_index, v))
    for points in by_role.values():
        points.sort()
    for n, (_info, key, _encs) in cands.items():
        if n in measured:
            out[n] = measured[n]
            continue
        points = by_role.get(key.role.value)
        if not points:
            continue
        x = key.exec_index
        lo = max((p for p in points if p[0] <= x), default=None)
        hi = min((p for p in points if p[0] >= x), default=None)
        if lo is None or hi is None or lo[0] == hi[0]:
            out[n] = (lo or hi)[1]
            continue
        f = (x - lo[0]) / (hi[0] - lo[0])
        if lo[1] > 0 and hi[1] > 0:
            out[n] = math.exp((1 - f) * math.log(lo[1]) + f * math.log(hi[1]))
        else:
            out[n] = (1 - f) * lo[1] + f * hi[1]
    return out


class Calibration:
    """The unquantized model's logits on the calibration windows (computed once), and
    the mean KL of any per-tensor plan from them: the plan written by llama.cpp's
    quantizer (with the importance matrix), run by llama.cpp. A context manager: the
    written files live in a temporary folder until it closes."""

    def __init__(
        self,
        index: ModelIndex,
        layout: ModelLayout,
        text: str,
        *,
        tokens: int,
        ctx: int,
        documents: str,
    ):
        if index.container != Container.GGUF:
            raise EwqError("plans are measured as GGUF files through llama.cpp")
        self.index, self.layout, self.ctx = index, layout, ctx
        self.path = Path(index.files[0])
        ref = LlamaCppModel(self.path, ctx)
        self.seqs = text_windows(
            ref.tokenize, ref.bos, text, ctx, documents, max_tokens=tokens
        )
        if not self.seqs:
            raise EwqError("the calibration text is too short for one window")
        readable(self.seqs, ref.unknown, "calibration text")
        self.tokens = int(sum(len(s) for s in self.seqs))
        self.targets = [Distribution(ref.logits(s, copy=False)) for s in self.seqs]
        del ref
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Calibration:
        self._tmp = tempfile.TemporaryDirectory(prefix="ewq-kl-")
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kl(self, types: Mapping[str, str], imatrix: Imatrix | None) -> float:
        """Mean KL of the model with ``types`` (tensor -> type; the rest as it is)."""
        assert self._tmp is not None, "use Calibration as a context manager"
        out = Path(self._tmp.name) / "probe.gguf"
        plan = _plan(self.layout, dict(types))
        targets = plan_targets(GGUF, self.index, self.layout, plan)
        quantize_gguf(self.path, targets, out, imatrix=imatrix)
        model = LlamaCppModel(out, self.ctx)
        kls = []
        for target, s in zip(self.targets, self.seqs, strict=True):
            kls.append(target.kl(model.logits(s, copy=False)))
        del model
        return max(0.0, float(np.concatenate(kls).mean()))


def kl_sensitivity(
    index: ModelIndex,
    layout: ModelLayout,
    text: str,
    errors: Mapping[str, Mapping[str, float]],
    *,
    imatrix: Imatrix | None,
    tokens: int = 1024,
    ctx: int = 256,
    documents: str = "stream",
    type_probes: int | None = 4,
    probes: int | None = DEFAULT_PROBES,
    progress: Callable[[int, int, str], None] | None = None,
) -> Sensitivity:
    """Measure the ``kl`` criterion for every tensor of a GGUF model, on windows of
    ``ctx`` tokens of ``text`` holding ``tokens`` tokens in all; ``errors`` are the
    imatrix-weighted relative errors (error.relative_errors with ``imatrix``).
    ``probes`` tensors are measured (all: None), the others interpolated."""
    started = time.perf_counter()
    cands = tensor_candidates(GGUF, layout, imatrix)
    swaps, files, sampled = _probes(cands, errors, type_probes, probes)
    window = {"tokens": tokens, "ctx": ctx, "documents": documents}
    copy = _copied(cands, [n for n, _ in swaps])
    swapped, written, bench = _measure(
        index, layout, text, swaps, files, imatrix, window, progress, copy
    )
    measured = {n: swapped[n, t] / errors[n][t] for n, t in swaps}
    probed = {n: c for n, c in cands.items() if _probe_of(cands, errors, n)}
    slope = interpolated(probed, measured)
    median_slope = statistics.median(measured.values()) if measured else 0.0
    factor = _type_factors(written, slope, errors)
    floats = {n for n, c in cands.items() if c[0].dtype in FLOAT_TYPES}

    def g(name: str, type_name: str) -> float:
        """The type's measured factor; for a float tensor where none was measured
        (--type-probes 0 spares a model written per type, which costs most on a
        large float source), the data-free table's (measured on IgLM, prior.toml);
        1 for a quantized source's tensors (see _probes)."""
        if type_name in factor:
            return factor[type_name]
        return prior_factor(type_name) if name in floats else 1.0

    single = {(names[0], t): v for (names, t), v in written.items() if len(names) == 1}
    damage = {
        name: {
            e.type: single.get(
                (name, e.type),
                slope.get(name, median_slope)
                * g(name, e.type)
                * errors.get(name, {}).get(e.type, 0.0),
            )
            for e in encs[1:]
        }
        for name, (_info, _key, encs) in cands.items()
    }
    return Sensitivity(
        "kl",
        damage,
        time.perf_counter() - started,
        {
            "windows": len(bench.seqs),
            "ctx": ctx,
            "documents": str(documents),
            "tokens": bench.tokens,
            "probes": len(swaps) + len(files),
            "probes_swapped": len(swaps),
            "tensors_measured": len(measured),
            "tensors_interpolated": len(slope) - len(measured),
            "measured_tensors": sorted(measured),
            "type_probes": sampled,
            "probe_starts": {str(k): v for k, v in bench.runs.items()},
            "type_files": len(files),
            "type_factors": {t: round(v, 4) for t, v in sorted(factor.items())},
            "median_sensitivity": median_slope,
        },
    )


def _probe_of(cands, errors, name: str) -> str | None:
    info, _, encs = cands[name]
    return probe_type(info, encs, errors.get(name, {}))


def _probes(cands, errors, type_probes: int | None, probes: int | None):
    """What is measured: one type swapped into each chosen tensor (its sensitivity),
    and each type written into a few float tensors at once (the types' factors).
    ``type_probes`` None or more than there are float tensors: every type of every
    float tensor written on its own."""
    types = {n: _probe_of(cands, errors, n) for n in cands}
    probed = {n: c for n, c in cands.items() if types[n]}
    swaps = [(n, types[n]) for n in chosen(probed, probes)]
    # type factors are measured on tensors the source stores as floats only: against
    # a quantized source the written model's KL adds the change of llama.cpp's
    # kernels (SmolLM2's Q4_1 ffn_down written as Q5_1, the same values: 0.004 nats),
    # which does not add up over tensors (every tensor as Q8_0: 0.0057), and the
    # factors fitted from it broke the ranking of plans (Spearman 0.08 against 0.997
    # without them, benchmarks/damage_model.py)
    floats = {n: c for n, c in probed.items() if c[0].dtype in FLOAT_TYPES}
    sampled = _sampled(floats, type_probes)
    files: list[tuple[tuple[str, ...], str]] = []
    all_types = sorted({e.type for n in sampled for e in cands[n][2][1:]})
    for type_name in all_types:
        names = [n for n in sampled if errors.get(n, {}).get(type_name, 0) > 0]
        if type_probes is None or type_probes >= len(floats):
            files += [((n,), type_name) for n in names]
        elif names:
            # one file per type, the sampled tensors together: the files do not
            # grow with the sampled tensors either (a file is a whole model written)
            files.append((tuple(names), type_name))
    return swaps, files, sampled


def _type_factors(
    written: Mapping[tuple[tuple[str, ...], str], float],
    slope: Mapping[str, float],
    errors: Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    """Per type, the written models' KL over what the swapped slopes predict for
    them (a type's kernel costs more or less than its error says): the median over
    the files of that type."""
    ratios: dict[str, list[float]] = {}
    for (names, type_name), kl in written.items():
        predicted = math.fsum(slope.get(n, 0.0) * errors[n][type_name] for n in names)
        if predicted > 0:
            ratios.setdefault(type_name, []).append(kl / predicted)
    return {t: statistics.median(v) for t, v in ratios.items()}


def _copied(cands, probed: list[str]) -> list[str]:
    """The tensors the probes' working copy stores as F32: every candidate where all
    of them fit in the memory the second moments may take (a quarter of what is
    available, ewq.calibration.moments), else the probed ones only. llama.cpp runs
    a quantized source's matrices (SmolLM2's Q4_1) at about half the speed of F32
    ones: on the default model 32 probes took 7.2 s each over a copy otherwise Q4_1,
    211 took 3.0 s each over an all-F32 copy (benchmarks/probe_budget.py); a 7B
    model's all-F32 copy (28 GB) is what must not be made."""
    whole = sum(4 * c[0].num_elements for c in cands.values())
    return sorted(cands) if whole <= memory_limit(None) else sorted(set(probed))


def _depth(name: str) -> int:
    """The tensor's block (-1 outside the blocks)."""
    k = block_of(name)
    return -1 if k is None else k


def _measure(index, layout, text, swaps, files, imatrix, window, progress, copy):
    """The KL of each swap (one tensor's values replaced in memory) and of each
    file (the model written with its tensors at a type), in that order."""
    total = len(swaps) + len(files)

    def step(k: int, what: str) -> None:
        if progress is not None:
            progress(k, total, what)

    # in depth order: each slice a probe starts from is written once
    swaps = sorted(swaps, key=lambda s: (_depth(s[0]), s[0]))
    probed = [n for n, _ in swaps]
    bench = Probes(index, layout, copy, text, imatrix=imatrix, probed=probed, **window)
    swapped: dict[tuple[str, str], float] = {}
    with bench:
        for k, (name, type_name) in enumerate(swaps):
            swapped[name, type_name] = bench.kl({name: type_name})
            step(k + 1, f"{name} as {type_name}")
    written: dict[tuple[tuple[str, ...], str], float] = {}
    if not files:  # (the source's own logits would be computed for nothing)
        return swapped, written, bench
    with Calibration(index, layout, text, **window) as calib:
        for k, (names, type_name) in enumerate(files):
            written[names, type_name] = calib.kl(
                dict.fromkeys(names, type_name), imatrix
            )
            what = names[0] if len(names) == 1 else f"{len(names)} tensors"
            step(len(swaps) + k + 1, f"{what} as {type_name}, written")
    return swapped, written, bench
