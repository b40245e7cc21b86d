"""Do text windows batched into one llama.cpp decode run faster on this CPU?

`ewq eval` and `ewq bench` evaluate one window per ``llama_decode``. llama.cpp can
put several sequences in one batch (``n_seq_max``, one ``seq_id`` per window, a
unified KV cache), which on a GPU fills the device. This script measures, on the
default model and in one run, 8 windows of 256 tokens of WikiText-2 with the logits
of every position:

* one window per decode (what ewq does; the baseline);
* 2 and 4 windows per decode (``n_ubatch`` = the whole batch, so each is one graph).

It prints tokens/s and each ratio to the baseline, and checks the logits agree.

Measure alone (llama.cpp's threads spin).

    .venv/bin/python benchmarks/batch_windows.py
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

CTX, WINDOWS = 256, 8


class Runner:
    """A llama.cpp context for ``per`` windows per decode, through the C API."""

    def __init__(self, path: str, per: int, threads: int):
        import llama_cpp as lc

        self.lc, self.per = lc, per
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx = CTX * per
        cp.n_batch = cp.n_ubatch = CTX * per
        cp.n_seq_max = per
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(CTX * per, 0, per)

    def run(self, seqs: list[list[int]]) -> list[np.ndarray]:
        lc, out = self.lc, []
        for g in range(0, len(seqs), self.per):
            group = seqs[g : g + self.per]
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
            b, n = self.batch, 0
            for s, seq in enumerate(group):
                for i, tok in enumerate(seq):
                    b.token[n], b.pos[n], b.n_seq_id[n] = tok, i, 1
                    b.seq_id[n][0], b.logits[n] = s, 1
                    n += 1
            b.n_tokens = n
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            ptr = lc.llama_get_logits(self.ctx)
            flat = np.ctypeslib.as_array(
                ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                shape=(n, self.vocab),
            )
            at = 0
            for seq in group:
                out.append(flat[at : at + len(seq)].copy())
                at += len(seq)
        return out

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def main() -> None:
    import os

    from models import shared_data

    from ewq.evaluate import tasks
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.sources import default_model_path

    path = str(default_model_path())
    text = (shared_data() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    tok = LlamaCppModel(path, CTX)
    tokens = tok.tokenize(text[:200_000])
    size = CTX - (tok.bos is not None)
    seqs = [
        ([tok.bos] if tok.bos is not None else []) + tokens[a:b]
        for a, b, _ in tasks.windows(len(tokens), size, size, WINDOWS)
    ]
    del tok
    n_tok = sum(map(len, seqs))
    threads = os.cpu_count() or 1
    results, base = {}, None
    for per in (1, 2, 4):
        r = Runner(path, per, threads)
        r.run(seqs[:per])  # warm
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            logits = r.run(seqs)
            best = min(best, time.perf_counter() - start)
        r.close()
        results[per] = logits
        rate = n_tok / best
        base = base or rate
        diff = max(
            float(np.abs(a - b).max()) for a, b in zip(results[1], logits, strict=True)
        )
        print(
            f"{per} window(s) per decode: {rate:6.1f} tokens/s, "
            f"{rate / base:.2f}x one per decode; largest logit difference {diff:.2e}"
        )


if __name__ == "__main__":
    main()
