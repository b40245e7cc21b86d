"""Runtimes that give next-token log-probabilities: llama.cpp for GGUF files,
transformers for Hugging Face folders. Both sides of a comparison see the same
token ids (checked by the tasks)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

import numpy as np

from ewq.errors import EwqError
from ewq.evaluate.metrics import log_softmax

__all__ = [
    "gpu_layers",
    "offload",
    "LanguageModel",
    "LlamaCppEncoder",
    "LlamaCppModel",
    "TransformersEncoder",
    "TransformersModel",
    "open_model",
]


class LanguageModel(Protocol):
    name: str
    vocab_size: int
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def logprobs(self, tokens: list[int], rows: slice | None = None) -> np.ndarray:
        """(len(tokens), vocab) log-probabilities of the token after each position
        (only the positions in ``rows``, when given)."""
        ...

    def logits(self, tokens: list[int], copy: bool = True) -> np.ndarray:
        """(len(tokens), vocab) raw float32 logits: with
        ewq.evaluate.metrics.logsumexp_rows, log-probabilities without a float64
        matrix. A copy the caller owns; with ``copy=False`` possibly the runtime's
        own buffer, valid until the model's next evaluation (no 50 MB copy per
        256-token window)."""
        ...


#: layers llama.cpp offloads to a GPU in this call (None: the default)
_GPU_LAYERS: ContextVar[int | None] = ContextVar("ewq_gpu_layers", default=None)


@contextlib.contextmanager
def offload(layers: int | None) -> Iterator[None]:
    """Every llama.cpp model loaded inside offloads ``layers`` layers to the GPU
    (-1: all; None: as the caller's context says, else :func:`gpu_layers`'s
    default). The API's calls set it from their config (--gpu-layers), so that
    every pass they run (importance matrix, second moments, kl criterion,
    evaluation) takes it."""
    if layers is None:
        yield
        return
    token = _GPU_LAYERS.set(layers)
    try:
        yield
    finally:
        _GPU_LAYERS.reset(token)


def gpu_layers() -> int:
    """The layers a model loaded now offloads: as :func:`offload` says, else all
    where llama.cpp was built with a GPU backend (CUDA, Metal, Vulkan), else none."""
    layers = _GPU_LAYERS.get()
    if layers is not None:
        return layers
    try:
        import llama_cpp
    except ImportError:
        return 0
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


def _silent(level: int, text: bytes, user: object) -> None:
    pass


_SILENT = None  # the ctypes callback, created once and kept alive (C keeps a pointer)


@contextlib.contextmanager
def _quiet_llama(llama_cpp):
    """Silence llama.cpp's own log lines (some escape verbose=False) while loading."""
    global _SILENT
    from llama_cpp import _logger

    if _SILENT is None:
        _SILENT = llama_cpp.llama_log_callback(_silent)
    llama_cpp.llama_log_set(_SILENT, None)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, None)


class LlamaCppModel:
    """A GGUF model run by llama.cpp (llama-cpp-python), its layers on a GPU as
    :func:`gpu_layers` says."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise EwqError(
                "evaluating a GGUF model needs llama-cpp-python (pip install "
                "llama-cpp-python==0.3.36; scripts/setup.sh installs it)"
            ) from None
        self.name = str(path)
        self.n_ctx = n_ctx
        try:
            with _quiet_llama(llama_cpp):
                self.llm = llama_cpp.Llama(
                    str(path),
                    n_ctx=n_ctx,
                    n_batch=n_ctx,
                    logits_all=True,
                    verbose=False,
                    n_threads=threads,
                    n_gpu_layers=gpu_layers(),
                )
        except (ValueError, RuntimeError) as exc:
            raise EwqError(f"{path}: llama.cpp cannot load it ({exc})") from None
        self.vocab_size = self.llm.n_vocab()
        # llama.cpp's rule (llama-perplexity, llama-imatrix): a window starts with
        # BOS only where the vocabulary says it adds one
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        bos = self.llm.token_bos()
        adds = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = bos if bos >= 0 and adds else None
        self._vocab = vocab

    @property
    def unknown(self) -> frozenset[int]:
        """The token ids that stand for text the vocabulary cannot spell: the GGUF's
        ``tokenizer.ggml.unknown_token_id`` (llama.cpp's converter marks WordPiece's
        [UNK] a control token) and the tokens llama.cpp marks UNKNOWN."""
        if not hasattr(self, "_unknown"):
            import llama_cpp

            flag = llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
            ids = {
                t
                for t in range(self.vocab_size)
                if llama_cpp.llama_vocab_get_attr(self._vocab, t) & flag
            }
            unk = self.llm.metadata.get("tokenizer.ggml.unknown_token_id")
            if unk is not None and str(unk).isdigit():
                ids.add(int(unk))
            self._unknown = frozenset(ids)
        return self._unknown

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special``: with the special tokens the
        vocabulary adds to a prompt (BOS; WordPiece: CLS and SEP), as llama.cpp's
        tools tokenize a whole input file."""
        return list(
            self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)
        )

    def _scores(self, tokens: list[int]) -> np.ndarray:
        """llama.cpp's logits of every position: a view of its buffer, valid until
        the next evaluation."""
        if len(tokens) > self.n_ctx:
            raise EwqError(
                f"{len(tokens)} tokens exceed the context of {self.n_ctx} (raise --ctx)"
            )
        self.llm.reset()
        self.llm.eval(tokens)
        return np.asarray(self.llm.scores[: len(tokens)])

    def logprobs(self, tokens: list[int], rows: slice | None = None) -> np.ndarray:
        scores = self._scores(tokens)
        return log_softmax(scores if rows is None else scores[rows])

    def logits(self, tokens: list[int], copy: bool = True) -> np.ndarray:
        scores = self._scores(tokens)
        return np.array(scores, dtype=np.float32) if copy else scores

    def continuations(
        self, base: list[int], conts: list[list[int]]
    ) -> list[np.ndarray]:
        """For each continuation, the log-probabilities of its tokens after ``base``
        (rows: its positions, from the last of ``base``). ``base`` is evaluated once;
        each continuation reuses its KV cache (llama-cpp-python's ``eval`` drops the
        cells after ``n_tokens`` first)."""
        scores = self._scores(base)
        last = log_softmax(scores[len(base) - 1 : len(base)])
        out = []
        for cont in conts:
            if len(base) + len(cont) > self.n_ctx:
                raise EwqError(
                    f"{len(base) + len(cont)} tokens exceed the context of {self.n_ctx}"
                )
            self.llm.n_tokens = len(base)
            self.llm.eval(cont)
            rows = np.asarray(self.llm.scores[len(base) : len(base) + len(cont) - 1])
            out.append(np.concatenate([last, log_softmax(rows)]) if len(rows) else last)
        return out


class TransformersModel:
    """A Hugging Face causal LM (or a GGUF file loaded by transformers), on the CPU."""

    def __init__(self, path: str | Path, gguf_file: str | None = None):
        try:
            import torch
            import transformers
        except ImportError:
            raise EwqError(
                "evaluating a Hugging Face model needs torch and transformers"
            ) from None
        self.torch = torch
        self.name = str(path) if gguf_file is None else f"{path}/{gguf_file}"
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        transformers.utils.logging.disable_progress_bar()
        with contextlib.redirect_stderr(io.StringIO()):
            self.tok = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, **kwargs
            ).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.bos = self.tok.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def logits(self, tokens: list[int], copy: bool = True) -> np.ndarray:
        with self.torch.no_grad():
            ids = self.torch.tensor([tokens])
            logits = self.model(ids).logits[0].float().numpy()
        return np.ascontiguousarray(logits[:, : self.vocab_size], dtype=np.float32)

    def logprobs(self, tokens: list[int], rows: slice | None = None) -> np.ndarray:
        logits = self.logits(tokens)
        return log_softmax(logits if rows is None else logits[rows])


def open_model(path: str | Path, n_ctx: int = 512) -> LanguageModel:
    """llama.cpp for a GGUF file, transformers for a model folder."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as fh:
            if fh.read(4) == b"GGUF":
                return LlamaCppModel(p, n_ctx)
        raise EwqError(f"{p}: not a GGUF file (give a GGUF file or a model folder)")
    if p.is_dir() and (p / "config.json").is_file():
        return TransformersModel(p)
    raise EwqError(f"no model at {p} (a GGUF file or a Hugging Face folder)")


class LlamaCppEncoder:
    """A GGUF encoder (BERT) run by llama.cpp: mean-pooled sentence embeddings, as
    sentence-transformers pools them."""

    def __init__(self, path: str | Path, max_tokens: int = 128):
        try:
            import llama_cpp
        except ImportError:
            raise EwqError("evaluating a GGUF encoder needs llama-cpp-python") from None
        self.name = str(path)
        try:
            with _quiet_llama(llama_cpp):
                self.llm = llama_cpp.Llama(
                    str(path),
                    embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                    n_ctx=max(512, max_tokens),
                    n_batch=max(512, max_tokens),
                    n_ubatch=max(512, max_tokens),
                    n_gpu_layers=gpu_layers(),
                    verbose=False,
                )
        except (ValueError, RuntimeError) as exc:
            raise EwqError(f"{path}: llama.cpp cannot load it ({exc})") from None
        self.vocab_size = self.llm.n_vocab()

    def embed(self, sentences: list[str]) -> np.ndarray:
        return np.asarray(
            [self.llm.embed(s, truncate=True) for s in sentences], dtype=np.float64
        )


class TransformersEncoder:
    """A Hugging Face encoder (BERT, sentence-transformers): mean-pooled embeddings."""

    def __init__(self, path: str | Path, max_tokens: int = 128):
        try:
            import torch
            import transformers
        except ImportError:
            raise EwqError(
                "evaluating an encoder needs torch and transformers"
            ) from None
        self.torch, self.name, self.max_tokens = torch, str(path), max_tokens
        transformers.utils.logging.disable_progress_bar()
        with contextlib.redirect_stderr(io.StringIO()):
            self.tok = transformers.AutoTokenizer.from_pretrained(path)
            self.model = transformers.AutoModel.from_pretrained(
                path, dtype=torch.float32
            ).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            self.max_tokens = min(max_tokens, limit)

    def embed(self, sentences: list[str]) -> np.ndarray:
        """Mean-pooled last hidden states, one row per sentence (as sentence-transformers)."""
        torch = self.torch
        batch = self.tok(
            sentences,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (
            ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
            .numpy()
            .astype(np.float64)
        )
