"""IgLM, the one real fp32 decoder on the registries, prepared for measurement
(../shared/docs/MODELS.md): never a default, never shipped (JHU academic licence,
non-commercial: measurement only).

``prepare(root)`` makes, once per folder (later calls only check):

* ``IgLM/``: a Hugging Face folder built from the ``iglm==0.1.0`` wheel: its GPT-2
  (4 blocks, width 512, 12.9M parameters, fp32) as ``model.safetensors`` without
  the ``attn.bias``/``attn.masked_bias`` buffers and without the tied
  ``lm_head.weight``; its 33-token WordPiece vocabulary (``BertTokenizer``, case
  kept, the chain and species tags as added tokens so that they stay whole); no
  BOS is added (IgLM's sequences start with their chain tag).
* ``IgLM-F32.gguf``: that folder converted by llama.cpp's converter through ewq
  (ewq.quant.convert; the vocabulary as llama.cpp's WordPiece, ewq's added rule).
* ``eval.txt`` and ``calibration.txt``: sequences sampled from the fp32 model with
  transformers (512 each, seeds 1 and 2, temperature 1), one per line, each its chain and
  species tags and residues, cut to ``LINE_TOKENS`` tokens, so that one window of
  that many tokens holds one sequence from its start (the model was trained on
  single sequences; windows across sequences measure a confused model).

Run as a script it prints the paths: ``python benchmarks/iglm.py ROOT``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "iglm==0.1.0"
LINE_TOKENS = 64
CHAINS = ("[HEAVY]", "[LIGHT]")
SPECIES = ("[HUMAN]", "[MOUSE]", "[CAMEL]", "[RAT]", "[RABBIT]", "[RHESUS]")


def _wheel(root: Path) -> Path:
    models = root / "wheel" / "iglm" / "trained_models"
    if (models / "IgLM" / "pytorch_model.bin").is_file():
        return models
    dl = root / "download"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", dl],
        check=True,
    )
    (whl,) = dl.glob("iglm-*.whl")
    with zipfile.ZipFile(whl) as z:
        z.extractall(root / "wheel")
    return models


def _hf_folder(models: Path, out: Path) -> Path:
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((models / "IgLM" / "config.json").read_text())
    vocab = (models / "vocab.txt").read_text().split()
    ids = {t: i for i, t in enumerate(vocab)}
    # its config names GPT-2's token 50256 as BOS/EOS, outside a 33-token vocabulary
    cfg |= {
        "bos_token_id": ids["[CLS]"],
        "eos_token_id": ids["[SEP]"],
        "pad_token_id": ids["[PAD]"],
        "tie_word_embeddings": True,
    }
    cfg.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = torch.load(models / "IgLM" / "pytorch_model.bin", map_location="cpu")
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    kept = {
        k: v.contiguous()
        for k, v in state.items()
        if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"
    }
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(
        str(out / "vocab.txt"), do_lower_case=False, tokenize_chinese_chars=False
    )
    tok.add_tokens(
        [t for t in vocab if t.startswith("[") and t not in tok.all_special_tokens]
    )
    tok.save_pretrained(out)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf |= {"add_bos_token": False, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return out


def _sample(folder: Path, n: int, seed: int) -> list[str]:
    """``n`` sequences from the fp32 model: a chain and a species tag, then residues
    until the model ends the sequence (a special token) or the line is full."""
    import torch
    import transformers

    tok = transformers.BertTokenizer.from_pretrained(folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    vocab = tok.get_vocab()
    residues = [i for t, i in vocab.items() if len(t) == 1 and t.isalpha()]
    allowed = torch.full((len(vocab),), float("-inf"))
    allowed[residues] = 0.0
    enders = [vocab[t] for t in ("[CLS]", "[SEP]", "[MASK]")]
    allowed[enders] = 0.0
    g = torch.Generator().manual_seed(seed)
    lines = []
    with torch.no_grad():
        while len(lines) < n:
            c = CHAINS[int(torch.randint(len(CHAINS), (1,), generator=g))]
            s = SPECIES[int(torch.randint(len(SPECIES), (1,), generator=g))]
            ids = [vocab[c], vocab[s]]
            past = None
            step = torch.tensor([ids])
            while len(ids) < LINE_TOKENS:
                outp = model(step, past_key_values=past, use_cache=True)
                past = outp.past_key_values
                probs = torch.softmax(outp.logits[0, -1] + allowed, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=g))
                if nxt in enders:
                    break
                ids.append(nxt)
                step = torch.tensor([[nxt]])
            if len(ids) >= 12:  # a real sequence, not an early stop
                lines.append(" ".join(tok.convert_ids_to_tokens(ids)))
    return lines


def prepare(root: str | Path) -> dict[str, Path]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = _hf_folder(_wheel(root), root / "IgLM")
    out = {"hf": folder}
    for name, n, seed in (("eval", 512, 1), ("calibration", 512, 2)):
        path = root / f"{name}.txt"
        if not path.is_file():
            path.write_text("\n".join(_sample(folder, n, seed)) + "\n")
        out[name] = path
    gguf = root / "IgLM-F32.gguf"
    if not gguf.is_file():
        from ewq.quant.convert import convert

        convert(folder, gguf, "f32")
    out["gguf"] = gguf
    return out


if __name__ == "__main__":
    for k, v in prepare(sys.argv[1] if len(sys.argv) > 1 else "iglm-work").items():
        print(f"{k}\t{v}")
