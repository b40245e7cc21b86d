"""EWQ analysis: block entropies on every source and architecture, the decision rule,
and `ewq analyze` end to end, bad input included."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import plan_file
from test_cli import run

from ewq import api
from ewq.analysis import Variant, block_entropy, decide
from ewq.analysis.entropy import entropy, entropy_reference
from ewq.analysis.scan import counts_as_matrix, scan
from ewq.arch import resolve
from ewq.errors import InvalidParameterError
from ewq.sources import open_source
from ewq.types import BlockKind, Precision, Role

# ---------------------------------------------------------------- block entropies


def reference_blocks(source) -> dict[int, float]:
    """Block entropies the slow way: whole tensors, float64 definition, per matrix."""
    out = {}
    with open_source(source) as src:
        layout = resolve(src.index)
        for block in layout.blocks:
            pairs = []
            for info, key in zip(block.tensors, block.keys, strict=True):
                if not counts_as_matrix(info, key):
                    continue
                array = src.read(info)
                for m in array.reshape(-1, *array.shape[-2:]):
                    pairs.append((m.size, entropy_reference(m)))
            out[block.exec_index] = block_entropy(pairs)
    return out


def test_every_family_and_format(tiny_models, tiny_ggufs):
    for name, path in [*tiny_models.items(), *tiny_ggufs.items()]:
        result = api.analyze(path, workers=2)
        ref = reference_blocks(path)
        blocks = result.profile.blocks
        assert len(result.profile.transformer) == result.layout.num_blocks, name
        for b in blocks:
            if ref[b.exec_index] is None:
                assert b.entropy is None, (name, b.exec_index)
            else:
                assert b.entropy == pytest.approx(ref[b.exec_index], rel=1e-9), name
        assert set(result.decision.precision) == {
            b.exec_index for b in result.profile.transformer
        }
        assert sorted(result.decision.priority) == sorted(result.decision.precision)


def test_rule_counts_weight_matrices_only(tiny_models):
    result = api.analyze(tiny_models["qwen2"])  # q/k/v biases and norms present
    for block in result.layout.transformer_blocks:
        counted = sum(
            t.num_elements
            for t, k in zip(block.tensors, block.keys, strict=True)
            if len(t.shape) >= 2 and k.kind.value == "weight" and not k.role.is_norm
        )
        b = result.profile.blocks[block.exec_index - 1]
        assert b.matrix_parameters == counted < b.num_parameters


def test_gguf_expert_stacks_count_per_expert(tiny_ggufs):
    with open_source(tiny_ggufs["deepseek2"]) as src:
        layout = resolve(src.index)
        infos = [
            t for t in src.index.tensors if counts_as_matrix(t, layout.keys[t.name])
        ]
        result = scan(src, infos)
        stack = next(t for t in infos if t.name == "blk.1.ffn_up_exps.weight")
        per_expert = result[stack.name]
        assert len(per_expert) == stack.shape[0] == 4
        array = src.read(stack)
        for e, h in enumerate(per_expert):
            assert h == pytest.approx(entropy_reference(array[e]), rel=1e-9)


def test_sharded_equals_single_file(tiny_models, sharded_llama):
    one = api.analyze(tiny_models["llama"]).profile.blocks
    two = api.analyze(sharded_llama).profile.blocks
    assert [b.entropy for b in one] == [b.entropy for b in two]


def test_threads_and_pieces_do_not_change_results(small_llama):
    with open_source(small_llama) as src:
        layout = resolve(src.index)
        infos = [
            t for t in src.index.tensors if counts_as_matrix(t, layout.keys[t.name])
        ]
        serial = scan(src, infos, workers=1)
        parallel = scan(src, infos, workers=2)
        tiny_pieces = scan(src, infos, workers=2, segment_bytes=4096)
        assert serial == parallel
        for info in infos:
            hs = serial[info.name]
            assert tiny_pieces[info.name] == pytest.approx(hs, rel=1e-12)
            assert hs[0] == pytest.approx(entropy(src.read(info)), rel=1e-12)


@pytest.mark.parametrize("fmt", ["llama", "gguf"])
def test_eps_variant_matches_kernel(fmt, tiny_models, tiny_ggufs):
    path = tiny_models["llama"] if fmt == "llama" else tiny_ggufs["llama"]
    with open_source(path) as src:
        layout = resolve(src.index)
        infos = [
            t for t in src.index.tensors if counts_as_matrix(t, layout.keys[t.name])
        ]
        result = scan(src, infos, eps=0.01, workers=2)
        for info in infos:
            assert result[info.name][0] == pytest.approx(
                entropy_reference(src.read(info), 0.01), rel=1e-9
            )


def test_progress_reports_every_byte(tiny_models):
    seen = []
    api.analyze(tiny_models["llama"], progress=lambda d, t, n: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


def test_default_model_blocks_are_distinct():
    result = api.analyze("default")
    hs = [b.entropy for b in result.profile.transformer]
    assert len(hs) == 30 and len(set(hs)) == 30
    # every block entropy sits just below ln(n) of its matrices (H ~ ln n - Var/2)
    assert all(13.3 < h < 13.4 for h in hs)
    emb, head = (result.profile.block(k) for k in (BlockKind.EMBEDDING, BlockKind.HEAD))
    # against gguf-py's own reader and dequantizer and the textbook formula in
    # float64 (H = logsumexp(w) - sum softmax(w) w), not a number ewq once printed
    import gguf
    from scipy.special import logsumexp, softmax

    from ewq.sources import default_model_path

    reader = gguf.GGUFReader(default_model_path())
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
    want = float(logsumexp(w) - softmax(w) @ w)
    assert emb.entropy == pytest.approx(want, rel=1e-9)
    assert head.entropy is None and head.num_parameters == 576  # tied: norm only
    d = result.decision
    counts = {p: list(d.precision.values()).count(p) for p in Precision}
    assert counts[Precision.RAW] + counts[Precision.Q8] + counts[Precision.Q4] == 30
    assert d.priority[0] == 30 - 1  # block 28 (exec_index 29) stands out lowest


# ---------------------------------------------------------------- the decision


def test_decision_by_hand():
    entropies = {2: 1.0, 3: 2.0, 4: 3.0, 5: 4.0, 6: 10.0}
    # mean 4, population std sqrt((9 + 4 + 1 + 0 + 36) / 5) = sqrt(10)
    d = decide(entropies, alpha=0.5)
    assert d.mean == 4.0 and d.std == pytest.approx(math.sqrt(10))
    assert d.threshold == pytest.approx(4 - 0.5 * math.sqrt(10))  # 2.419
    assert [d.precision[i].value for i in range(2, 7)] == [
        "4-bit",
        "4-bit",
        "8-bit",
        "raw",  # H == mean stays raw
        "raw",
    ]
    assert d.priority == (2, 3, 4, 5, 6) and d.rank(6) == 5
    only8 = decide(entropies, alpha=0.5, variant=Variant.MIXED_8)
    assert [only8.precision[i].value for i in range(2, 7)] == [
        "8-bit",
        "8-bit",
        "8-bit",
        "raw",
        "raw",
    ]
    edge = decide(entropies, alpha=0.5, aggressive=Precision.Q3, moderate=Precision.Q4)
    assert edge.precision[2] is Precision.Q3 and edge.precision[4] is Precision.Q4


def test_ties_are_ordered_by_exec_index():
    d = decide({5: 1.0, 3: 1.0, 4: 2.0})
    assert d.priority == (3, 5, 4)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha(alpha):
    with pytest.raises(InvalidParameterError, match="alpha must be a number > 0"):
        decide({2: 1.0, 3: 2.0}, alpha=alpha)


entropy_maps = st.dictionaries(
    st.integers(2, 200),
    st.floats(0, 20, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(entropy_maps, st.floats(0.05, 4))
def test_decision_is_monotone_in_entropy(entropies, alpha):
    d = decide(entropies, alpha=alpha)
    by_h = sorted(entropies, key=lambda i: (entropies[i], i))
    assert list(d.priority) == by_h
    ranks = [d.precision[i].rank for i in by_h]
    assert ranks == sorted(ranks)  # lower entropy never gets more bits
    assert all(
        (d.precision[i] is Precision.RAW) == (entropies[i] >= d.mean) for i in entropies
    )


@settings(max_examples=200, deadline=None)
@given(entropy_maps, st.floats(0.05, 4), st.floats(0.05, 4))
def test_larger_alpha_never_adds_4bit_blocks(entropies, a, b):
    lo, hi = sorted((a, b))
    n4 = [
        sum(p is Precision.Q4 for p in decide(entropies, alpha=x).precision.values())
        for x in (lo, hi)
    ]
    assert n4[1] <= n4[0]


# ---------------------------------------------------------------- the command


def analyze_cmd(monkeypatch, capsys, tmp_path, *args):
    js, png = tmp_path / "a.json", tmp_path / "a.png"
    code, out, err = run(
        monkeypatch, capsys, "analyze", *args, "--json", str(js), "--plot", str(png)
    )
    return code, out, err, js, png


def test_analyze_default(monkeypatch, capsys, tmp_path):
    code, out, err, js, png = analyze_cmd(monkeypatch, capsys, tmp_path, "default")
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert {
        "schema_version",
        "source",
        "alpha",
        "eps",
        "mean",
        "std",
        "threshold",
        "blocks",
    } <= doc.keys()
    assert doc["alpha"] == 1.25 and doc["eps"] == 0.0 and doc["source"] == "default"
    assert [b["exec_index"] for b in doc["blocks"]] == list(range(2, 32))
    assert sorted(b["priority"] for b in doc["blocks"]) == list(range(1, 31))
    for b in doc["blocks"]:
        assert set(b) == {
            "exec_index",
            "num_parameters",
            "entropy",
            "decision",
            "priority",
        }
        assert b["decision"] in ("raw", "8-bit", "4-bit")
        assert b["num_parameters"] == 3_540_096
        want = (
            "raw"
            if b["entropy"] >= doc["mean"]
            else "4-bit"
            if b["entropy"] < doc["threshold"]
            else "8-bit"
        )
        assert b["decision"] == want
    assert doc["threshold"] == pytest.approx(doc["mean"] - 1.25 * doc["std"])
    assert doc["embedding"]["exec_index"] == 1 and doc["head"]["exec_index"] == 32
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exec_index" in out and "threshold" in out


def test_analyze_variant_and_alpha(monkeypatch, capsys, tmp_path, tiny_models):
    code, _, err, js, _ = analyze_cmd(
        monkeypatch,
        capsys,
        tmp_path,
        str(tiny_models["mixtral"]),
        "--variant",
        "8bit",
        "--alpha",
        "0.5",
        "--eps",
        "0.01",
    )
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert (doc["variant"], doc["alpha"], doc["eps"]) == ("8bit", 0.5, 0.01)
    assert {b["decision"] for b in doc["blocks"]} <= {"raw", "8-bit"}


def bad_analyze(monkeypatch, capsys, tmp_path, *args) -> str:
    code, _, err, js, png = analyze_cmd(monkeypatch, capsys, tmp_path, *args)
    assert code == 1, err
    assert not js.exists() and not png.exists()
    assert not list(tmp_path.glob(".a.*"))
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ewq: error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_bad_non_finite(monkeypatch, capsys, tmp_path, tiny_models, model_copy, value):
    from safetensors.numpy import load_file, save_file

    folder = model_copy(tiny_models["llama"])
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float(value)
    save_file(state, folder / "model.safetensors")
    line = bad_analyze(monkeypatch, capsys, tmp_path, str(folder))
    assert "tensor 'model.layers.1.mlp.up_proj.weight' holds NaN or Inf" in line


def test_bad_non_finite_bf16(monkeypatch, capsys, tmp_path, tiny_models, model_copy):
    import torch
    from safetensors.torch import load_file, save_file

    folder = model_copy(tiny_models["llama"])
    state = {
        k: v.to(torch.bfloat16)
        for k, v in load_file(folder / "model.safetensors").items()
    }
    state["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(state, folder / "model.safetensors")
    line = bad_analyze(monkeypatch, capsys, tmp_path, str(folder))
    assert "'model.layers.0.self_attn.o_proj.weight' holds NaN or Inf" in line


def test_bad_no_blocks(monkeypatch, capsys, tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "noblocks"
    folder.mkdir()
    save_file(
        {"weird.thing": np.ones((4, 4), np.float32)}, folder / "model.safetensors"
    )
    (folder / "config.json").write_text('{"model_type": "mystery"}')
    assert "no transformer blocks" in bad_analyze(
        monkeypatch, capsys, tmp_path, str(folder)
    )


@pytest.mark.parametrize("alpha", ["0", "-0.5", "nan"])
def test_bad_alpha_cli(monkeypatch, capsys, tmp_path, alpha):
    line = bad_analyze(monkeypatch, capsys, tmp_path, "default", f"--alpha={alpha}")
    # refused by the option's own bound (ewq.config), before any weight is read
    assert "alpha: Input should be" in line
    assert "greater than 0" in line or "finite number" in line


def test_bad_eps_cli(monkeypatch, capsys, tmp_path):
    line = bad_analyze(monkeypatch, capsys, tmp_path, "default", "--eps=-1")
    assert "eps must be a number >= 0" in line


def test_embedding_role_is_reported_apart(tiny_models):
    result = api.analyze(tiny_models["gpt2"])  # token and position embeddings
    emb = result.profile.block(BlockKind.EMBEDDING)
    keys = result.layout.block(1).keys
    assert {k.role for k in keys} >= {Role.EMBED, Role.POS_EMBED}
    assert emb.matrix_parameters == result.layout.block(1).num_parameters


def test_bf16_pieces_merge_exactly(small_llama, model_copy):
    import torch
    from safetensors.torch import load_file, save_file

    folder = model_copy(small_llama)
    state = load_file(folder / "model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16) for k, v in state.items()},
        folder / "model.safetensors",
    )
    with open_source(folder) as src:
        layout = resolve(src.index)
        infos = [
            t for t in src.index.tensors if counts_as_matrix(t, layout.keys[t.name])
        ]
        assert {t.dtype for t in infos} == {"BF16"}
        whole = scan(src, infos, workers=1)
        pieces = scan(src, infos, workers=2, segment_bytes=1000)  # odd piece size
        assert pieces == whole  # integer histograms: bit-identical
        for info in infos[:4]:
            assert whole[info.name][0] == pytest.approx(
                entropy_reference(src.read(info)), rel=1e-9
            )


def test_bad_nan_in_a_norm_weight(
    monkeypatch, capsys, tmp_path, tiny_models, model_copy
):
    """Norm weights do not count for the entropy, but a NaN there breaks the model:
    analyze (and so plan) refuses it, and so does quantize --format hf, which used
    to write NaN scales and exit 0."""
    from safetensors.numpy import load_file, save_file

    folder = model_copy(tiny_models["llama"])
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.input_layernorm.weight"][1] = float("nan")
    save_file(state, folder / "model.safetensors")
    line = bad_analyze(monkeypatch, capsys, tmp_path, str(folder))
    assert "'model.layers.0.input_layernorm.weight' holds 1 NaN" in line
    plan = plan_file(tmp_path / "plan.json", "4-bit")
    out = tmp_path / "q"
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(folder),
        "--plan",
        str(plan),
        "--out",
        str(out),
        "--format",
        "hf",
    )
    assert code == 1 and "holds 1 NaN" in err and not out.exists()


def test_a_tensor_name_cannot_break_the_error_line(monkeypatch, capsys, tmp_path):
    """Names come from the file: a newline or an escape sequence in one is shown
    escaped, on the one error line, and never reaches the terminal raw."""
    from safetensors.numpy import save_file

    folder = tmp_path / "evil"
    folder.mkdir()
    name = "model.layers.0.mlp.up_proj.weight\n\x1b[2J\x1b]0;owned\x07"
    w = np.zeros((4, 4), np.float32)
    w[0, 0] = float("nan")
    save_file({name: w}, folder / "model.safetensors")
    code, _, err = run(
        monkeypatch, capsys, "analyze", str(folder / "model.safetensors")
    )
    assert code == 1
    assert "\x1b" not in err and "\x07" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # stage lines (stderr is not a terminal), warnings, then the error
    assert all(ln.startswith(("[ewq] ", "ewq: ")) for ln in lines)
    errors = [ln for ln in lines if ln.startswith("ewq: error: ")]
    assert len(errors) == 1 and "\\n\\x1b[2J" in errors[0]
