"""Calibration text sampled from the model itself (``--calibration self``).

Most users have no text that matches how they use their model. Text the model
samples from its own distribution calibrates quantization as well as real data and
often better (Williams, Chrysostomou and Aletras, "Self-calibration for Language
Model Quantization and Pruning", NAACL 2025, arXiv 2410.17170). Here llama.cpp
decodes many sequences at once (one sequence per slot of one context, a token per
slot per decode step, so that a step multiplies each weight by a batch of rows as a
prompt pass does), each token drawn from the model's full softmax at temperature 1
(Gumbel-max over the logits, seeded: the same seed, model and settings give the
same text):

* a model with a chat template (``tokenizer.chat_template``) starts each sequence
  from one of a short bundled list of varied user prompts (prompts.toml:
  instructions, code, questions, several languages), rendered by llama.cpp's own
  template code (``llama_chat_apply_template``); the sample is the reply;
* other models start from BOS (or nothing, where the vocabulary adds none) and the
  sample is what follows.

A sequence ends at an end-of-generation token or after ``length`` tokens; its slot
then starts the next one, until the samples hold ``tokens`` tokens. Samples are
joined as documents: a blank line between them (``stream``), or one per line with
their own line breaks made spaces (``lines``, for models trained on short
documents). Why by hand: llama-cpp-python's generator decodes one sequence at a
time, a token per step (on 2 cores about 30x slower per token than a batch).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import os
import time
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from ewq.calibration.text import CalibrationText
from ewq.errors import EwqError
from ewq.evaluate.windows import Documents
from ewq.types import Progress

__all__ = [
    "SELF",
    "SelfCalibration",
    "is_self",
    "own_text_file",
    "prompts",
    "sample_text",
    "self_calibration",
]


_LOW, _HIGH = np.float32(2.0**-25), np.float32(1 - 2.0**-24)


@cache
def prompts() -> tuple[str, ...]:
    """The bundled user prompts a chat model's samples answer."""
    doc = tomllib.loads(Path(__file__).with_name("prompts.toml").read_text("utf-8"))
    return tuple(doc["prompts"])


@dataclass(frozen=True)
class SelfCalibration:
    """How a model's own calibration text is sampled: ``tokens`` tokens in all, in
    sequences of at most ``length``, ``slots`` decoded at once, from ``seed``."""

    tokens: int = 8192
    length: int = 512
    slots: int = 32
    seed: int = 0
    documents: str = "stream"

    def key(self) -> dict:
        """What the text depends on besides the model (a cache key's part)."""
        return {
            "tokens": self.tokens,
            "length": self.length,
            "slots": self.slots,
            "seed": self.seed,
            "documents": str(Documents(self.documents).value),
            "prompts": hashlib.sha256("\n".join(prompts()).encode()).hexdigest()[:16],
            "temperature": 1.0,
        }


class _Slots:
    """One llama.cpp context decoding ``n`` sequences side by side."""

    def __init__(self, model, n: int, length: int, threads: int | None):
        import llama_cpp as lc

        self.lc, self.model, self.n = lc, model, n
        params = lc.llama_context_default_params()
        params.n_ctx = n * length
        params.n_batch = params.n_ubatch = max(n * length, 512)
        params.n_seq_max = n
        params.kv_unified = False  # each sequence attends to its own cells only
        params.flash_attn_type = 0
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        self.ctx = lc.llama_init_from_model(model.llm.model, params)
        if not self.ctx:
            raise EwqError("llama.cpp could not make a context to sample text in")
        self.batch = lc.llama_batch_init(params.n_batch, 0, n)
        self.mem = lc.llama_get_memory(self.ctx)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One decode of (slot, position, token, wants logits) items."""
        b = self.batch
        for i, (slot, pos, tok, out) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = slot
            b.logits[i] = 1 if out else 0
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise EwqError(f"llama.cpp could not decode while sampling (status {rc})")

    def logits(self, i: int, vocab: int) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(vocab,))

    def clear(self, slot: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, slot, -1, -1)

    def close(self) -> None:
        if self.ctx is not None:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.ctx = None


def _chat_prompt(model, text: str) -> list[int] | None:
    """``text`` as a user turn in the model's chat template, ready for the reply
    (llama.cpp's template code), as tokens; None without a template."""
    lc = model.llm_module
    tmpl = lc.llama_model_chat_template(model.llm.model, None)
    if not tmpl:
        return None
    msg = lc.llama_chat_message(role=b"user", content=text.encode("utf-8"))
    msgs = (lc.llama_chat_message * 1)(msg)
    size = 4 * len(text) + 1024
    buf = ctypes.create_string_buffer(size)
    n = lc.llama_chat_apply_template(tmpl, msgs, 1, True, buf, size)
    if n < 0:
        return None  # a template llama.cpp does not know
    if n > size:
        buf = ctypes.create_string_buffer(n + 1)
        n = lc.llama_chat_apply_template(tmpl, msgs, 1, True, buf, n + 1)
    rendered = buf.raw[:n].decode("utf-8", "replace")
    return list(
        model.llm.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)
    )


def sample_text(
    path: str | Path,
    how: SelfCalibration,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> CalibrationText:
    """Text sampled from the GGUF model at ``path`` as ``how`` says."""
    import llama_cpp as lc

    from ewq.evaluate.backends import LlamaCppModel

    if how.tokens < 1 or how.length < 2 or how.slots < 1:
        raise EwqError("self-calibration needs tokens >= 1, length >= 2, slots >= 1")
    model = LlamaCppModel(path, 64, threads=threads)
    model.llm_module = lc
    vocab_ptr = lc.llama_model_get_vocab(model.llm.model)
    vocab = model.vocab_size
    starts: list[list[int]] = []
    chat = _chat_prompt(model, prompts()[0]) is not None
    if chat:
        starts = [_chat_prompt(model, p) or [] for p in prompts()]
    else:
        starts = [[] if model.bos is None else [model.bos]]
    if not all(starts) and model.bos is None:
        # nothing to start from: sampling needs a first token to condition on
        eos = lc.llama_vocab_eos(vocab_ptr)
        if eos < 0:
            raise EwqError(
                f"{path}: no BOS, end-of-text token or chat template to sample "
                "calibration text from; give --calibration FILE, or plan without one (data-free)"
            )
        starts = [[int(eos)]]
    longest = max(len(s) for s in starts)
    length = max(how.length, longest + 2)
    rng = np.random.default_rng(how.seed)
    slots = _Slots(model, how.slots, length, threads)
    samples: list[list[int]] = []
    made = 0
    empty = 0
    started = time.perf_counter()

    def run(goal: int) -> None:
        """Sample until ``made`` reaches ``goal`` tokens, every slot started anew."""
        nonlocal made, empty
        state: list[dict] = [{} for _ in range(how.slots)]
        items: list[tuple[int, int, int, bool]] = []
        rows = [-1] * how.slots  # the batch row of each slot's logits
        turn = len(samples)

        def begin(slot: int) -> None:
            nonlocal turn
            prompt = starts[turn % len(starts)]
            turn += 1
            slots.clear(slot)
            state[slot] = {"pos": len(prompt), "out": []}
            for k, tok in enumerate(prompt):
                items.append((slot, k, tok, k == len(prompt) - 1))
            rows[slot] = len(items) - 1

        for slot in range(how.slots):
            begin(slot)
        while items:
            slots.decode(items)
            live = [s for s in range(how.slots) if rows[s] >= 0]
            logits = np.stack([slots.logits(rows[s], vocab) for s in live])
            # Gumbel-max: argmax(logits + G) is a draw from softmax(logits). Float32
            # uniforms kept inside (0, 1): G is then cut at 16.6, which only tokens
            # 16.6 nats below the best (p < 6e-8) could have needed
            u = rng.random(logits.shape, dtype=np.float32)
            np.clip(u, _LOW, _HIGH, out=u)
            picked = np.argmax(logits - np.log(-np.log(u)), axis=1)
            items.clear()
            rows[:] = [-1] * how.slots
            for slot, tok in zip(live, picked.tolist(), strict=True):
                st = state[slot]
                ended = bool(lc.llama_vocab_is_eog(vocab_ptr, tok))
                if not ended:
                    st["out"].append(tok)
                    made += 1
                if ended or st["pos"] + 1 >= length or made >= goal:
                    if st["out"]:
                        samples.append(st["out"])
                    else:
                        empty += 1
                        if empty > 4 * how.slots and not samples:
                            raise EwqError(
                                f"{path}: the model ends every sample at once (an "
                                "end-of-generation token first); give --calibration "
                                "FILE, or plan without one (data-free)"
                            )
                    if made < goal:
                        begin(slot)
                    continue
                items.append((slot, st["pos"], tok, True))
                rows[slot] = len(items) - 1
                st["pos"] += 1
            if progress is not None:
                left = (time.perf_counter() - started) / max(made, 1)
                left *= goal - min(made, goal)
                progress(
                    min(made, goal),
                    goal,
                    f"{len(samples)} samples, about {math.ceil(left)} s left",
                )

    slots = _Slots(model, how.slots, length, threads)
    try:
        run(how.tokens)
        # sampled tokens are not always how the tokenizer would spell their text
        # (the default model's 8,192 read back as about 5,400): sample more until
        # the text holds as many as asked, a few rounds at most
        for _ in range(3):
            text = _joined(model, samples, how.documents)
            have = len(model.tokenize(text))
            if have >= how.tokens or not have:
                break
            run(made + math.ceil((how.tokens - have) * made / have) + 1)
    finally:
        slots.close()
    text = _joined(model, samples, how.documents)
    if not text:
        raise EwqError(
            f"{path}: sampling gave no text; give --calibration FILE, or plan without one (data-free)"
        )
    name = f"self-calibration (seed {how.seed}, {made:,} tokens)"
    return CalibrationText(text + "\n", name, None)


def _joined(model, samples: list[list[int]], documents: str) -> str:
    """The samples as one text of documents (module docstring)."""
    texts = [_detokenize(model, s) for s in samples]
    if Documents(documents) is Documents.LINES:
        return "\n".join(t for t in (" ".join(x.split()) for x in texts) if t)
    return "\n\n".join(t.strip() for t in texts if t.strip())


def _detokenize(model, tokens: list[int]) -> str:
    return model.llm.detokenize(tokens, special=False).decode("utf-8", "replace")


def self_calibration(
    source,
    index,
    layout,
    how: SelfCalibration,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> CalibrationText:
    """The model's own calibration text as ``how`` says, sampled from the GGUF the
    source is or converts to, cached by the model's content, the settings, this
    module's code and the llama.cpp build (``self/KEY.txt`` in ewq's cache)."""
    from ewq.cache import cache_dir, code_digest, key, runtime_id
    from ewq.fileio import atomic_write_text
    from ewq.quant.convert import as_gguf
    from ewq.stages import skipped, stage

    doc = {
        "kind": "self-calibration",
        **how.key(),
        "code": code_digest(__name__),
        "runtime": runtime_id(),
    }
    stored = cache_dir() / "self" / f"self-calibration-{key(doc, index.files)}.txt"
    name = f"self-calibration (seed {how.seed}, {how.tokens:,} tokens)"
    if stored.is_file():
        text = stored.read_text(encoding="utf-8")
        skipped("sampling calibration text from the model", "reused from the cache")
        return CalibrationText(text, name, stored)
    size = f"{how.tokens:,} tokens, {how.slots} sequences at once, seed {how.seed}"
    with stage("sampling calibration text from the model", size):
        with as_gguf(source, index, layout) as (g_index, _):
            made = sample_text(
                g_index.files[0], how, threads=threads, progress=progress
            )
    stored.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, made.text)
    return CalibrationText(made.text, name, stored)


#: the KV cache the sampling context may hold: 32 sequences of 512 tokens of a
#: Llama-2-7B would take 8.6 GB
KV_BUDGET = 1 << 30


def fitting_slots(config, how: SelfCalibration, budget: int = KV_BUDGET) -> int:
    """As many of ``how.slots`` sequences as an F16 KV cache of ``how.length``
    tokens each keeps within ``budget`` bytes (at least 1), from the GGUF's own
    block count, width and head counts (llama.cpp's n_embd_k_gqa)."""
    arch = str(config.get("general.architecture", ""))

    def num(key: str, default: int = 0) -> int:
        v = config.get(f"{arch}.{key}", default)
        if isinstance(v, (list, tuple)):  # per-layer arrays: the widest
            v = max(v, default=default)
        return int(v or default)

    width, heads = num("embedding_length"), num("attention.head_count", 1)
    kv_heads = num("attention.head_count_kv", heads)
    k_len = num("attention.key_length", width // max(heads, 1))
    v_len = num("attention.value_length", k_len)
    per_token = 2 * num("block_count") * kv_heads * (k_len + v_len)
    if per_token <= 0:
        return how.slots
    return max(1, min(how.slots, budget // (per_token * how.length)))


#: ``--calibration self``: the model's own text
SELF = "self"


def is_self(calibration) -> bool:
    """Does a --calibration value ask for the model's own text?"""
    return calibration is not None and str(calibration) == SELF


def own_text_file(
    source,
    *,
    tokens: int | None,
    documents: str,
    revision: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """The file in ewq's cache holding ``source``'s own calibration text: as many
    tokens as a calibration pass reads (``tokens``: --calibration-tokens, as
    ewq.calibration.text.token_cap takes it), cut into ``documents``."""
    from ewq.arch import resolve
    from ewq.calibration.text import token_cap
    from ewq.config import DEFAULT_CALIBRATION_TOKENS
    from ewq.sources import open_source

    with open_source(source, download=True, revision=revision) as src:
        index = src.index
    layout = resolve(index)
    cap = token_cap(tokens, index) or DEFAULT_CALIBRATION_TOKENS
    how = SelfCalibration(tokens=cap, documents=str(Documents(documents).value))
    how = dataclasses.replace(how, slots=fitting_slots(index.config, how))
    made = self_calibration(
        source, index, layout, how, threads=threads, progress=progress
    )
    assert made.path is not None
    return made.path
