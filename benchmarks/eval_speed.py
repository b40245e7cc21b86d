"""Speed of `ewq eval` against the bare llama.cpp forward passes it needs, in one run.

* kld: `api.evaluate(default, "kld", quantized=Q, limit=8)` (8 windows of 512 tokens
  of WikiText-2, the raw and the quantized model) against evaluating the same token
  windows with both models and nothing else (llama-cpp-python's ``eval``, logits of
  every position kept, as the comparison needs them). Also the numpy log-softmax
  route the kernels replaced, on the same logits.
* MMLU cloze: 20 questions' four answers scored with the question's KV cache reused
  against evaluating question + answer from scratch, on the same model.

Measure alone (llama.cpp's threads spin).

    .venv/bin/python benchmarks/eval_speed.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def main() -> None:
    import numpy as np
    from models import shared_data

    from ewq import api
    from ewq.evaluate import tasks
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.data import load_mmlu
    from ewq.evaluate.metrics import kl_per_position, log_softmax
    from ewq.sources import default_model_path

    text_path = shared_data() / "wikitext-2" / "valid.txt"
    text = text_path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        plan = {
            "schema_version": 1,
            "num_blocks": 30,
            "blocks": [{"exec_index": i, "precision": "4-bit"} for i in range(2, 32)],
        }
        q = Path(tmp) / "q4.gguf"
        api.quantize("default", plan, q)

        start = time.perf_counter()
        api.evaluate("default", "kld", data=text_path, quantized=q, limit=8)
        ewq_s = time.perf_counter() - start

        ref, quant = LlamaCppModel(default_model_path(), 512), LlamaCppModel(q, 512)
        tokens = ref.tokenize(text)
        size = 512 - (ref.bos is not None)
        seqs = [
            ([ref.bos] if ref.bos is not None else []) + tokens[a:b]
            for a, b, _ in tasks.windows(len(tokens), size, size, 8)
        ]
        start = time.perf_counter()
        for m in (ref, quant):
            for s in seqs:
                m.llm.reset()
                m.llm.eval(s)
        bare_s = time.perf_counter() - start
        x, y = ref.logits(seqs[0]), quant.logits(seqs[0])
        start = time.perf_counter()
        kl_per_position(log_softmax(x), log_softmax(y))
        numpy_window_s = time.perf_counter() - start
        n_tok = sum(len(s) for s in seqs)
        print(
            f"kld, 8 windows x 512 tokens, two models: ewq {ewq_s:.1f} s, bare forward "
            f"passes {bare_s:.1f} s ({2 * n_tok / bare_s:.0f} tokens/s): "
            f"{ewq_s / bare_s:.2f}x; the numpy log-softmax route would add "
            f"{numpy_window_s * len(seqs):.1f} s"
        )

        questions = load_mmlu(shared_data() / "mmlu" / "mmlu_val_zero_shot.jsonl")[:20]
        shared = scratch = 0.0
        for qn in questions:
            base = ([ref.bos] if ref.bos is not None else []) + ref.tokenize(
                f"Question: {qn.question.strip()}\nAnswer:"
            )
            conts = [ref.tokenize(" " + c) for c in qn.choices]
            t = time.perf_counter()
            ref.continuations(base, conts)
            shared += time.perf_counter() - t
            t = time.perf_counter()
            for c in conts:
                ref.logprobs(base + c, slice(len(base) - 1, len(base) + len(c) - 1))
            scratch += time.perf_counter() - t
        print(
            f"MMLU cloze, 20 questions: stem once {shared:.1f} s, from scratch "
            f"{scratch:.1f} s ({scratch / shared:.1f}x)"
        )
        del np


if __name__ == "__main__":
    main()
