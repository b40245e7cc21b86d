"""`ewq serve` and `ewq worker`: bad input is one line and a non-zero exit, before any
worker is contacted."""

from __future__ import annotations

import json

import pytest
from test_cli import run

from ewq.serve.rpc import RpcError, split_endpoint


def test_serve_refuses_a_plan_without_a_llama_cpp_placement(
    tmp_path, monkeypatch, capsys
):
    plan = tmp_path / "plan.json"  # hand-written: blocks, no placement of the planner
    plan.write_text(
        json.dumps(
            {
                "schema_version": 2,
                "num_blocks": 30,
                "blocks": [{"exec_index": i, "precision": "raw"} for i in range(2, 32)],
            }
        )
    )
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code, _, err = run(
        monkeypatch, capsys, "serve", str(plan), "--model", str(model), "--prompt", "x"
    )
    assert code == 1
    assert err.startswith("ewq: error: the plan cannot run on llama.cpp")
    assert len(err.strip().splitlines()) == 1


def test_serve_needs_the_model_file(tmp_path, monkeypatch, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "blocks": []}))
    code, _, err = run(
        monkeypatch, capsys, "serve", str(plan), "--model", str(tmp_path / "no.gguf")
    )
    assert code == 1 and "no such model file" in err


def test_serve_refuses_a_plan_for_an_hf_output(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.yaml").write_text(
        "machines:\n  - {name: a, memory: 60MB}\n  - {name: b, memory: 200MB}\n"
    )
    plan = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        "default",
        "--cluster",
        str(tmp_path / "c.yaml"),
        "--context",
        "512",
        "--format",
        "hf",
        "--json",
        str(plan),
    )
    assert code == 0, err
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code, _, err = run(
        monkeypatch, capsys, "serve", str(plan), "--model", str(model), "--prompt", "x"
    )
    assert code == 1 and "llama.cpp serves GGUF files" in err


@pytest.mark.parametrize("bad", ["host", "host:", ":80", "host:0", "host:70000", "h:x"])
def test_endpoints_are_host_and_port(bad):
    with pytest.raises(RpcError, match="is not host:port"):
        split_endpoint(bad)


def test_worker_refuses_an_unknown_host(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "worker", "--host", "no.such.host.invalid")
    assert code == 1 and err.startswith("ewq: error: cannot resolve")
