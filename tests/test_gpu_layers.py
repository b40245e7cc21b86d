"""--gpu-layers reaches every llama.cpp pass (only the CPU build runs here: the
setting is checked in llama.cpp's own model parameters, not its effect)."""

from __future__ import annotations

import llama_cpp
import pytest
from models import byte_vocab_llama, shared_data
from test_cli import run

from ewq.evaluate.backends import LlamaCppModel, gpu_layers, offload


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    text = root / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:3000])
    return byte_vocab_llama(root / "m.gguf"), text


@pytest.fixture
def loads(monkeypatch):
    """The n_gpu_layers of every llama.cpp model loaded."""
    seen: list[int] = []
    real = llama_cpp.Llama

    def llama(*args, **kw):
        model = real(*args, **kw)
        seen.append(int(model.model_params.n_gpu_layers))
        return model

    monkeypatch.setattr(llama_cpp, "Llama", llama)
    return seen


def test_the_default_is_all_layers_where_llama_cpp_has_a_gpu(model_and_text):
    src, _ = model_and_text
    want = -1 if llama_cpp.llama_supports_gpu_offload() else 0
    assert gpu_layers() == want
    with offload(5):
        assert LlamaCppModel(src, 64).llm.model_params.n_gpu_layers == 5
        with offload(None):  # a nested call without the option keeps the caller's
            assert gpu_layers() == 5
    assert gpu_layers() == want


@pytest.mark.parametrize("command", ["eval", "imatrix", "quantize"])
def test_the_option_reaches_each_pass(
    command, model_and_text, loads, monkeypatch, capsys, tmp_path, fresh_cache
):
    from ewq.api import inspect

    src, text = model_and_text
    if command == "eval":
        argv = ["eval", str(src), "--task", "perplexity", "--data", str(text)]
        argv += ["--limit", "1", "--ctx", "64"]
    elif command == "imatrix":
        argv = ["imatrix", str(src), "--calibration", str(text), "--ctx", "64"]
        argv += ["--out", str(tmp_path / "m.imatrix.gguf")]
    else:
        import json

        layout = inspect(src).layout
        plan = tmp_path / "p.json"
        plan.write_text(
            json.dumps(
                {
                    "schema_version": 1,
                    "blocks": [
                        {"exec_index": b.exec_index, "precision": "4-bit"}
                        for b in layout.transformer_blocks
                    ],
                }
            )
        )
        argv = ["quantize", str(src), "--plan", str(plan), "--out"]
        argv += [str(tmp_path / "q.gguf"), "--calibration", str(text)]
        argv += ["--calibration-ctx", "64"]
    code, _, err = run(monkeypatch, capsys, *argv, "--gpu-layers", "3")
    assert code == 0, err
    assert loads and set(loads) == {3}


@pytest.mark.parametrize("threads", [None, 1])
def test_a_calibration_pass_runs_on_every_core_unless_told(
    threads, model_and_text, monkeypatch
):
    """llama.h's default context runs 4 threads on any machine (on 2 cores they
    spin against each other): the importance-matrix and second-moment passes ask for
    the machine's cores, or the threads given."""
    import os

    from ewq.calibration.collect import compute_moments
    from ewq.evaluate.data import load_text

    src, text = model_and_text
    seen: list[tuple[int, int]] = []
    real = llama_cpp.llama_init_from_model

    def init(model, params):
        seen.append((params.n_threads, params.n_threads_batch))
        return real(model, params)

    monkeypatch.setattr(llama_cpp, "llama_init_from_model", init)
    compute_moments(src, load_text(text), ctx=64, chunks=1, threads=threads)
    want = threads or os.cpu_count()
    assert seen == [(want, want)]


def test_a_calibration_pass_multiplies_moments_on_one_blas_thread(
    model_and_text, monkeypatch
):
    """BLAS's idle threads spin and take llama.cpp's cores: while a pass computes,
    every BLAS library loaded (numpy's and scipy's own) is limited to one thread
    at each second-moment product, and the limit is lifted after it."""
    import os

    import threadpoolctl

    from ewq.calibration import collect
    from ewq.evaluate.data import load_text

    def blas() -> dict[str, int]:
        return {
            i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
        }

    src, text = model_and_text
    before, seen = blas(), []
    real = collect._Collector._moments

    def moments(self, *args):
        out = real(self, *args)  # a product made (scipy's BLAS loaded by then)
        seen.append(blas())
        return out

    monkeypatch.setattr(collect._Collector, "_moments", moments)
    monkeypatch.setattr(collect, "FLUSH_ROWS", 16)  # a product at every input
    collect.compute_moments(src, load_text(text), ctx=64, chunks=2)
    assert seen and all(set(libs.values()) == {1} for libs in seen)
    assert len(seen[-1]) >= 2  # numpy's BLAS and scipy's
    after = blas()
    assert {k: after[k] for k in before} == before
    if (os.cpu_count() or 1) > 1:
        assert max(after.values()) > 1  # the limit was a change
