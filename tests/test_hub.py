"""Hub sources against a local server standing in for the hub (HF_ENDPOINT)."""

from __future__ import annotations

import os
import socket

import pytest
from hubserver import FakeHub

from ewq.api import inspect
from ewq.errors import HubUnavailableError
from ewq.sources import open_source
from ewq.sources.hub import is_hub_id


@pytest.fixture
def hub(small_llama, sharded_llama, monkeypatch, tmp_path):
    repos = {"tiny/llama": small_llama, "tiny/sharded": sharded_llama}
    # huggingface_hub reads HF_HOME at import; point its cache at tmp_path directly
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with FakeHub(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def weight_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_is_hub_id():
    assert is_hub_id("Qwen/Qwen2.5-7B") and is_hub_id("hf://meta-llama/Llama-3.1-8B")
    assert (
        not is_hub_id("model") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    )


@pytest.mark.parametrize("repo", ["tiny/llama", "tiny/sharded"])
def test_metadata_only_reads_headers_not_weights(hub, repo, small_llama, sharded_llama):
    local = small_llama if repo == "tiny/llama" else sharded_llama
    with open_source(repo) as remote, open_source(local) as here:
        assert remote.index.metadata_only
        assert remote.index.config["model_type"] == "llama"
        assert [(t.name, t.dtype, t.shape, t.nbytes) for t in remote.index.tensors] == [
            (t.name, t.dtype, t.shape, t.nbytes) for t in here.index.tensors
        ]
    served = sum(n for f, n in hub.sent.items() if f.endswith(".safetensors"))
    # headers only: one range request of at most 100 kB per file
    assert served <= 100_001 * len(here.index.files)
    if (
        repo == "tiny/llama"
    ):  # 3 MB of weights, of which the client read one 100 kB range
        assert served < 0.05 * weight_bytes(local)


def test_metadata_only_refuses_to_stream(hub):
    with (
        open_source("tiny/llama") as src,
        pytest.raises(Exception, match="opened for metadata only"),
    ):
        next(src.iter_tensors())


def test_inspect_hub_id_gives_the_same_blocks(hub, small_llama):
    remote, local = inspect("tiny/llama"), inspect(small_llama)
    assert [b.num_parameters for b in remote.layout.blocks] == [
        b.num_parameters for b in local.layout.blocks
    ]


def test_full_download_then_reads_as_folder(hub, tiny_models):
    with open_source("tiny/sharded", download=True) as src:
        assert not src.index.metadata_only
        names = [info.name for info, _ in src.iter_tensors()]
    assert len(names) == len(inspect(tiny_models["llama"]).index.tensors)
    # the second open is served from the cache: no new weight bytes
    before = sum(hub.sent.values())
    with open_source("tiny/sharded", download=True):
        pass
    assert sum(n for f, n in hub.sent.items() if f.endswith(".safetensors")) <= before


def test_unknown_repo(hub):
    with pytest.raises(
        HubUnavailableError, match="'tiny/absent' not found at http://127.0.0.1"
    ):
        open_source("tiny/absent")


def test_offline_is_a_clear_error(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(
        HubUnavailableError, match=r"cannot reach the Hugging Face hub .*\(offline\?\)"
    ):
        open_source("some/model")


def test_analyze_hub_id(hub, small_llama):
    from ewq import analyze

    with pytest.raises(
        Exception, match="metadata only; the analysis reads every weight"
    ):
        analyze("tiny/llama")  # headers alone are not enough
    remote = analyze("tiny/llama", download=True)
    local = analyze(small_llama)
    assert [b.entropy for b in remote.profile.blocks] == [
        b.entropy for b in local.profile.blocks
    ]


def test_features_of_a_hub_id_read_headers_only(hub, small_llama):
    from ewq import features

    remote = features("tiny/llama")
    local = features(small_llama)
    assert remote.method == "headers"
    assert [b.num_parameters for b in remote.blocks] == [
        b.num_parameters for b in local.blocks
    ]
    served = sum(n for f, n in hub.sent.items() if f.endswith(".safetensors"))
    assert served < 0.05 * weight_bytes(small_llama)  # one header range, no weights


def test_fast_plan_reads_metadata_only(hub):
    from ewq import api
    from ewq.planning import Machine

    planned = api.plan("tiny/llama", [Machine("m", 10**9)], method="fast")
    assert planned.analysis is None and planned.result.fits
    assert planned.index.metadata_only


def test_a_stalled_hub_ends_in_one_line(monkeypatch, capsys):
    """A server that accepts connections and never answers: the command ends by
    itself (4 read timeouts) with one error line; it used to wait forever."""
    import socket
    import threading
    import time

    from test_cli import run

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(32)
    held = []

    def accept() -> None:
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
    monkeypatch.setenv("EWQ_HUB_TIMEOUT", "1")
    started = time.monotonic()
    try:
        code, _, err = run(monkeypatch, capsys, "inspect", "owner/stalled")
    finally:
        srv.close()
        for c in held:
            c.close()
    assert code == 1 and "did not answer within 4 s" in err
    assert time.monotonic() - started < 20
    assert len([ln for ln in err.splitlines() if ln.startswith("ewq: error:")]) == 1


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[1, 2]", "not a JSON object"),
        ('{"architectures": "LlamaForCausalLM"}', "architectures must be a list"),
        ('{"vocab_size": Infinity}', "not valid JSON"),
    ],
)
def test_a_hub_config_of_the_wrong_type(
    small_llama, tmp_path, monkeypatch, capsys, config, message
):
    import shutil

    from test_cli import run

    repo = tmp_path / "repo"
    shutil.copytree(small_llama, repo)
    (repo / "config.json").write_text(config)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with FakeHub({"bad/config": repo}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        code, _, err = run(monkeypatch, capsys, "inspect", "bad/config")
    assert code == 1 and message in err and "Traceback" not in err


# GGUF repositories: the default model as one file, beside a second model (to choose
# with --file), and as llama.cpp's split files written by gguf-py.


@pytest.fixture(scope="module")
def gguf_repos(tmp_path_factory):
    import shutil

    from models import f16_gguf, split_gguf

    from ewq.sources import default_model_path

    root = tmp_path_factory.mktemp("gguf-repos")
    single = root / "single"
    single.mkdir()
    os.symlink(default_model_path(), single / "SmolLM2-135M-Q4_1.gguf")
    multi = root / "multi"
    multi.mkdir()
    os.symlink(default_model_path(), multi / "SmolLM2-135M-Q4_1.gguf")
    f16_gguf(multi / "SmolLM2-135M-F16.gguf")
    (multi / "README.md").write_text("two quantizations\n")
    split = split_gguf(default_model_path(), root / "split", 100)
    shutil.copy(single / "SmolLM2-135M-Q4_1.gguf", root / "plain.gguf")
    wide = root / "wide"  # rows of 1.5 KB: sampled rows are far apart
    wide.mkdir()
    f16_gguf(wide / "wide-F16.gguf", n_blocks=1, hidden=768)
    return {
        "gguf/single": single,
        "gguf/multi": multi,
        "gguf/split": split.parent,
        "gguf/wide": wide,
    }


@pytest.fixture
def ghub(gguf_repos, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with FakeHub(gguf_repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def rows(index):
    return [(t.name, t.dtype, t.shape, t.nbytes) for t in index.tensors]


@pytest.mark.parametrize("repo", ["gguf/single", "gguf/split"])
def test_a_hub_gguf_is_indexed_from_its_header_alone(ghub, repo):
    """Metadata-only: the same tensors and keys as the local file, from range reads
    of the headers (counted by the server), not the 92 MB of weights."""
    with open_source(repo) as remote, open_source("default") as here:
        assert remote.index.metadata_only and remote.index.container == "gguf"
        assert rows(remote.index) == rows(here.index)
        keys = {
            k: v for k, v in remote.index.config.items() if not k.startswith("split.")
        }
        assert keys == dict(here.index.config)
    served = sum(ghub.sent.values())
    weights = here.index.nbytes
    files = 3 if repo == "gguf/split" else 1
    # the header of the 49,152-token vocabulary is 2.3 MB: two or three reads
    assert 0 < served <= 4 * 2**20 * files and served < 0.05 * weights, served


def test_inspect_features_and_a_fast_plan_of_a_hub_gguf_read_headers_only(
    ghub, monkeypatch, capsys
):
    from test_cli import run

    for args in (
        ("inspect", "gguf/split"),
        ("features", "gguf/single"),
        ("plan", "gguf/split", "--method", "fast", "--memory", "300MB"),
        ("plan", "gguf/single", "--method", "fast", "--memory", "300MB"),
    ):
        code, stdout, err = run(monkeypatch, capsys, *args)
        assert code == 0, (args, err)
    assert "blk" not in err
    assert sum(ghub.sent.values()) <= 4 * 4 * 2**20  # 4 commands, headers only


def test_a_repository_with_several_gguf_models_needs_a_choice(
    ghub, monkeypatch, capsys
):
    from test_cli import run

    code, _, err = run(monkeypatch, capsys, "inspect", "gguf/multi")
    assert code != 0 and err.count("\n") == 1
    assert "2 GGUF models" in err and "--file" in err
    for choice in (("--file", "F16"), ("--file", "SmolLM2-135M-F16.gguf")):
        code, stdout, err = run(monkeypatch, capsys, "inspect", "gguf/multi", *choice)
        assert code == 0, err
        assert "2 file" not in stdout
    with open_source("gguf/multi:Q4_1") as src:
        assert src.index.files == ("SmolLM2-135M-Q4_1.gguf",)
    code, _, err = run(monkeypatch, capsys, "inspect", "gguf/multi", "--file", "Q8_0")
    assert code != 0 and "no GGUF file matching 'Q8_0'" in err


def test_a_split_hub_gguf_is_downloaded_and_quantized(
    ghub, tmp_path, monkeypatch, capsys
):
    """Quantizing reads every weight: the splits are downloaded into the hub cache,
    and llama.cpp (which opens the first split and finds the others) quantizes them."""
    from models import plan_file
    from test_cli import run

    plan = plan_file(tmp_path / "plan.json", "8-bit", n_blocks=30)
    out = tmp_path / "q.gguf"
    code, _, err = run(
        monkeypatch, capsys, "quantize", "gguf/split", "--plan", str(plan),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    split_bytes = sum(p.stat().st_size for p in ghub.repos["gguf/split"].iterdir())
    assert sum(ghub.sent.values()) >= split_bytes
    with open_source(out) as q:
        assert q.index.config["ewq.source"] == "gguf/split"
        types = {t.dtype for t in q.index.tensors if t.name.startswith("blk.")}
        assert "Q8_0" in types


def test_a_hub_checkpoint_quantized_to_hf_carries_a_model_card(hub, tmp_path):
    """The HF output's README.md: hub front matter naming the hub id as its base
    model (read back by huggingface_hub's own ModelCard parser), the revision the
    hub served, ewq's version and the plan's precisions; the source's card is not
    copied."""
    from hubserver import COMMIT
    from huggingface_hub import ModelCard
    from test_quantize import uniform_plan

    from ewq import __version__, api

    doc = uniform_plan("8-bit", 2)
    doc["blocks"][1]["precision"] = "4-bit"
    out = tmp_path / "out"
    api.quantize("tiny/llama", doc, out, format="hf")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny/llama"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers"
    assert "ewq" in card.data.tags
    assert f"ewq {__version__}" in card.text and COMMIT in card.text
    assert "1 8-bit" in card.text and "1 4-bit" in card.text
    assert "out.ewq.json" in card.text


def test_a_server_that_ignores_ranges_still_gives_the_right_header(ghub):
    """A mirror that answers a range request with the whole file (200): the header
    is read from the body's start, not mistaken for the range asked for."""
    ghub.ranges = False
    try:
        with open_source("gguf/split") as remote, open_source("default") as here:
            assert rows(remote.index) == rows(here.index)
    finally:
        ghub.ranges = True


@pytest.mark.parametrize("repo", ["gguf/single", "gguf/split", "gguf/wide"])
def test_a_sampled_error_pass_over_a_hub_gguf_fetches_only_its_rows(
    ghub, gguf_repos, repo, monkeypatch
):
    """ewq plan --sample over a hub GGUF: the same estimates (same seed, same rows)
    as over the local file, from range requests the server counts: the headers and
    the sampled rows; where rows are wide enough to lie apart (1.5 KB; SmolLM2's
    are 360 bytes, 11% of them sampled: their gaps are fetched too), a small part
    of the file. The header is fetched once (the index reads it into the mirror
    the sampled pass reads), and a second pass fetches nothing."""
    from ewq import api
    from ewq.sampling import Sampling

    local = next(gguf_repos[repo].glob("*.gguf")) if repo == "gguf/wide" else "default"
    if repo == "gguf/wide":
        # the mirror fetches the bytes between two sampled rows when they are closer
        # than 64 KiB (cheaper than another request); this small file's sampled rows
        # lie 15 KB apart, a 70B model's megabytes: as there, each row its own range
        from ewq.sources import ranged

        monkeypatch.setattr(ranged, "_GAP", 4096)
    sample = Sampling(fraction=0.01)
    here = api.sensitivity(str(local), "error", sample=sample)
    remote = api.sensitivity(repo, "error", sample=sample)
    assert remote.damage == here.damage
    served = sum(ghub.sent.values())
    with open_source(str(local)) as src:
        size = src.index.nbytes
    print(f"{repo}: served {served / 1e6:.2f} MB of {size / 1e6:.2f} MB")
    # the wide file: 9% of its rows, its header once (1 MiB; read twice, the
    # index's and the mirror's, the wide file served 3.1 MB, 0.28) and short gaps
    assert served < (0.25 if repo == "gguf/wide" else 1.0) * size
    ghub.sent.clear()
    with open_source(repo) as src:  # the index again, as the next run opens it
        assert src.index.container == "gguf"
    again = api.sensitivity(repo, "error", sample=sample)
    assert again.details["cached"] and sum(ghub.sent.values()) == 0


def test_a_sampled_error_pass_over_hub_safetensors_matches_the_local_one(
    hub, small_llama
):
    from ewq import api
    from ewq.sampling import Sampling

    sample = Sampling(fraction=0.01)
    here = api.sensitivity(str(small_llama), "error", sample=sample)
    remote = api.sensitivity("tiny/llama", "error", sample=sample)
    assert remote.damage == here.damage
    assert sum(hub.sent.values()) < weight_bytes(small_llama)


def test_a_sampled_plan_of_a_hub_gguf_downloads_a_part(ghub, gguf_repos, monkeypatch):
    """`ewq plan ORG/NAME --memory M --sample F`: the entropy analysis and the error
    criterion both read through the range mirror; the server serves less than the
    file, and the plan fits."""
    from ewq import api
    from ewq.planning import Machine

    size = next(gguf_repos["gguf/wide"].glob("*.gguf")).stat().st_size

    def refuse(*a, **k):
        raise AssertionError("the plan downloaded the model")

    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    p = api.plan("gguf/wide", [Machine("m", int(size * 0.5))], context=0, sample=0.05)
    assert p.result.fits
    served = sum(ghub.sent.values())
    print(f"served {served / 1e6:.2f} MB of {size / 1e6:.2f} MB")
    assert served < 0.6 * size
