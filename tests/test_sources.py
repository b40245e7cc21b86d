"""Model sources: indexes before reads, file-order streaming, and every bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ewq.errors import FormatError, NonFiniteTensorError, SourceNotFoundError
from ewq.sources import default_model_path, open_source
from ewq.sources.gguf import GGUFSource


def raw_safetensors(
    path: Path, header: dict, data: bytes = b"", n: int | None = None
) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if n is None else n) + body + data)
    return path


def test_single_file_index_and_stream(tiny_models):
    folder = tiny_models["llama"]
    with open_source(folder) as src:
        index = src.index
        assert (
            index.container == "safetensors" and index.config["model_type"] == "llama"
        )
        offsets = [t.offset for t in index.tensors]
        assert offsets == sorted(offsets)  # file order
        seen = list(src.iter_tensors())
    assert [i.name for i, _ in seen] == [t.name for t in index.tensors]
    for info, array in seen:
        assert array.shape == info.shape and array.dtype == np.float32


def test_sharded_folder_matches_single(tiny_models, sharded_llama):
    with open_source(tiny_models["llama"]) as one, open_source(sharded_llama) as two:
        assert len(two.index.files) == 2
        a = {i.name: x for i, x in one.iter_tensors()}
        b = {i.name: x for i, x in two.iter_tensors()}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_dtypes_f32_f16_bf16(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    bf = x.astype(ml_dtypes.bfloat16)
    header = {
        "a": {"dtype": "F32", "shape": [8, 16], "data_offsets": [0, 512]},
        "b": {"dtype": "F16", "shape": [8, 16], "data_offsets": [512, 768]},
        "c": {"dtype": "BF16", "shape": [8, 16], "data_offsets": [768, 1024]},
    }
    data = x.tobytes() + x.astype(np.float16).tobytes() + bf.tobytes()
    path = raw_safetensors(tmp_path / "m.safetensors", header, data)
    with open_source(path) as src:
        got = {i.name: a for i, a in src.iter_tensors()}
    np.testing.assert_array_equal(got["a"], x)
    np.testing.assert_array_equal(got["b"], x.astype(np.float16))
    assert got["c"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["c"].view(np.uint16), bf.view(np.uint16))


def test_gguf_dequantizes_as_it_reads(tiny_ggufs):
    with open_source(tiny_ggufs["llama"]) as src:
        index = src.index
        assert (
            index.container == "gguf"
            and index.config["general.architecture"] == "llama"
        )
        dtypes = {t.dtype for t in index.tensors}
        assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"} <= dtypes
        for info, array in src.iter_tensors():
            assert array.shape == info.shape
            assert array.dtype == {"F16": np.float16, "BF16": ml_dtypes.bfloat16}.get(
                info.dtype, np.float32
            )


def test_default_model():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open_source("default") as src:
        assert src.index.source == "default" and len(src.index.tensors) == 272
        info, array = next(src.iter_tensors())
    assert info.name == "token_embd.weight" and array.shape == (49152, 576)


# ---- bad input ------------------------------------------------------------------


def test_missing_path():
    with pytest.raises(SourceNotFoundError, match="no such file or folder: ./nope"):
        open_source("./nope")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceNotFoundError, match="no safetensors weights"):
        open_source(tmp_path)


def test_missing_shard_named(sharded_llama, model_copy):
    folder = model_copy(sharded_llama)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        SourceNotFoundError,
        match=r"shard 'model-00002-of-00002.safetensors' \(holding '",
    ):
        open_source(folder)


def test_tensor_promised_by_index_but_absent(sharded_llama, model_copy):
    folder = model_copy(sharded_llama)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = (
        "model-00001-of-00002.safetensors"
    )
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        FormatError,
        match="tensor 'model.layers.9.mlp.up_proj.weight' is promised in shard "
        "'model-00001-of-00002.safetensors'",
    ):
        open_source(folder)


def test_unknown_dtype(tmp_path):
    path = raw_safetensors(
        tmp_path / "m.safetensors",
        {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}},
        b"xx",
    )
    with pytest.raises(
        FormatError, match=r"m.safetensors: tensor 'w' has unknown dtype 'Q9'"
    ):
        open_source(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json!" + b"\0" * 8)
    with pytest.raises(FormatError, match="m.safetensors: corrupt safetensors header"):
        open_source(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(FormatError, match="truncated safetensors file"):
        open_source(path)


def test_header_longer_than_file(tmp_path):
    path = raw_safetensors(tmp_path / "m.safetensors", {}, n=10_000)
    with pytest.raises(
        FormatError, match="header length 10000 is longer than the file"
    ):
        open_source(path)


def test_data_past_end_of_file(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    path = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 8)
    with pytest.raises(
        FormatError, match="tensor 'w' ends at byte .* past the end of the file"
    ):
        open_source(path)


def test_overlapping_offsets(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    path = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 24)
    with pytest.raises(FormatError, match="tensors 'a' and 'b' overlap"):
        open_source(path)


def test_shape_disagrees_with_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}
    path = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 16)
    with pytest.raises(FormatError, match="spans 16 bytes but its shape"):
        open_source(path)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_reported_when_read(tmp_path, dtype, bad):
    x = np.zeros((4, 4), np.float32)
    x[2, 3] = bad
    path = tmp_path / "m.safetensors"
    if dtype is ml_dtypes.bfloat16:
        header = {
            "ok": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
            "w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [4, 36]},
        }
        raw_safetensors(
            path, header, np.zeros(2, dtype).tobytes() + x.astype(dtype).tobytes()
        )
    else:
        save_file({"ok": np.zeros(2, dtype), "w": x.astype(dtype)}, path)
    with open_source(path) as src:  # the index opens fine: nothing is read yet
        stream = src.iter_tensors()
        assert next(stream)[0].name == "ok"
        with pytest.raises(
            NonFiniteTensorError,
            match=r"m.safetensors: tensor 'w' holds \d NaN and \d Inf",
        ):
            next(stream)


def test_non_finite_in_gguf(tmp_path):
    from models import Q, write_gguf

    x = np.ones((4, 32), np.float32)
    x[0, 0] = np.nan
    path = write_gguf(
        tmp_path / "m.gguf", "llama", 1, {"blk.0.attn_q.weight": (x, Q.Q8_0)}
    )
    with (
        open_source(path) as src,
        pytest.raises(NonFiniteTensorError, match="blk.0.attn_q.weight"),
    ):
        list(src.iter_tensors())


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(FormatError, match="m.gguf: not a readable GGUF file"):
        GGUFSource(path)


def test_truncated_gguf(tiny_ggufs, tmp_path):
    data = tiny_ggufs["llama"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="cut.gguf"):
        open_source(path)


def test_a_shard_index_cannot_reach_outside_its_folder(tmp_path, sharded_llama):
    """A shard named '../x', an absolute path, or a link out of the folder is refused
    before any byte of it is read."""
    import json
    import shutil

    from ewq.errors import FormatError
    from ewq.sources import open_source

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    folder = tmp_path / "m"
    shutil.copytree(sharded_llama, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(folder / first, outside / first)
    for shard in (f"../elsewhere/{first}", str(outside / first), "/etc/passwd"):
        doc = {
            **index,
            "weight_map": {
                k: (shard if v == first else v) for k, v in index["weight_map"].items()
            },
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
        with pytest.raises(FormatError, match="nothing outside was read"):
            open_source(folder)
    (folder / first).symlink_to(outside / first)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="links outside"):
        open_source(folder)


def test_headers_cannot_make_ewq_allocate_without_bound(tmp_path, monkeypatch, capsys):
    """A block numbered 10^12 in a tensor name, or 10^6 layers in config.json, is
    refused in one line instead of allocating per block."""
    import json

    import numpy as np
    import psutil
    from models import tiny_llama_config
    from safetensors.numpy import save_file
    from test_cli import run

    w = np.zeros((4, 4), np.float32)
    f = tmp_path / "huge.safetensors"
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": w,
            "model.layers.1000000000000.mlp.up_proj.weight": w,
        },
        f,
    )
    before = psutil.Process().memory_info().rss
    code, _, err = run(monkeypatch, capsys, "inspect", str(f))
    assert code == 1 and "numbered 0..N-1" in err
    assert psutil.Process().memory_info().rss - before < 200 * 2**20
    cfg = tmp_path / "config.json"
    doc = tiny_llama_config(num_hidden_layers=1_000_000)
    cfg.write_text(json.dumps(doc))
    code, _, err = run(monkeypatch, capsys, "features", str(cfg))
    assert code == 1 and "declares 1000000 layers" in err


def test_gguf_block_count_that_disagrees_is_refused_before_llama_cpp(
    tmp_path, monkeypatch, capsys
):
    """llama.cpp aborts the process (SIGABRT) on such a file: ewq refuses it first."""

    from models import f16_gguf, plan_file
    from test_cli import run

    bad = f16_gguf(tmp_path / "bad.gguf", block_count=0)
    plan = plan_file(tmp_path / "plan.json", "8-bit")
    out = tmp_path / "o.gguf"
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(bad),
        "--plan",
        str(plan),
        "--out",
        str(out),
    )
    assert code == 1 and "block_count = 0" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "plan.json"]


def test_llama_cpp_split_files_are_one_model(tmp_path):
    """gguf-py's split writer (llama.cpp's PREFIX-0000i-of-0000N.gguf): any split,
    or the folder, opens the whole model with every tensor readable as in the single
    file, llama.cpp loads it from the first split, and a missing split is one line."""
    import numpy as np
    from models import split_gguf

    from ewq.sources import default_model_path
    from ewq.sources.gguf import GGUFSource

    first = split_gguf(default_model_path(), tmp_path / "split", 100)
    files = sorted(p.name for p in first.parent.iterdir())
    assert files == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with open_source("default") as one:
        for spec in (first, first.parent / files[1], first.parent):
            with open_source(spec) as split:
                assert split.index.files[0] == str(first)
                assert [(t.name, t.shape, t.dtype) for t in split.index.tensors] == [
                    (t.name, t.shape, t.dtype) for t in one.index.tensors
                ]
        with GGUFSource(first) as split:
            by_name = {t.name: t for t in split.index.tensors}
            for t in one.index.tensors[::40]:
                assert np.array_equal(split.read(by_name[t.name]), one.read(t))
    import llama_cpp

    llm = llama_cpp.Llama(str(first), n_ctx=32, verbose=False)
    assert llm.n_vocab() == 49152
    (first.parent / files[2]).unlink()
    with pytest.raises(SourceNotFoundError, match="missing model-00003-of-00003"):
        open_source(first)


def test_mapped_ranges_are_the_bytes_read_and_a_truncated_file_is_one_error(tmp_path):
    """map_range (the page cache read in place, what the analysis uses) gives the
    same values as read_range for bf16, f16 and f32 safetensors and a GGUF's F32
    tensors; a file cut short after opening is a FormatError, not a SIGBUS."""
    import ml_dtypes

    from ewq.sources.gguf import GGUFSource

    rng = np.random.default_rng(3)
    tensors = {
        "a": rng.standard_normal((64, 96)).astype(ml_dtypes.bfloat16),
        "b": rng.standard_normal((3, 4097)).astype(np.float16),
        "c": rng.standard_normal(5000).astype(np.float32),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with open_source(path) as src:
        for info in src.index.tensors:
            for a, b in (
                (0, info.num_elements),
                (7, info.num_elements - 3),
                (100, 101),
            ):
                mapped = src.map_range(info, a, b)
                assert not mapped.flags.writeable
                assert mapped.dtype == src.read_range(info, a, b).dtype
                assert np.array_equal(
                    mapped.view(np.uint8), src.read_range(info, a, b).view(np.uint8)
                )
        last = max(src.index.tensors, key=lambda t: t.offset)
        with open(path, "r+b") as fh:
            fh.truncate(last.offset + 8)
        with pytest.raises(FormatError, match="truncated"):
            src.map_range(last, 0, last.num_elements)
    with GGUFSource(default_model_path()) as g:
        norm = next(t for t in g.index.tensors if t.dtype == "F32")
        assert np.array_equal(
            g.map_range(norm, 0, norm.num_elements),
            g.read_range(norm, 0, norm.num_elements),
        )
        quant = next(t for t in g.index.tensors if t.dtype == "Q4_1")
        assert g.map_range(quant, 0, quant.shape[-1]) is None


def test_the_analysis_is_the_same_mapped_or_copied(monkeypatch, tiny_models):
    from ewq import api
    from ewq.analysis import scan

    mapped = api.analyze(tiny_models["llama"]).profile
    monkeypatch.setattr(scan, "MAP", False)
    copied = api.analyze(tiny_models["llama"]).profile
    assert [b.entropy for b in mapped.blocks] == [b.entropy for b in copied.blocks]
