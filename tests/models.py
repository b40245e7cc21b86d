"""Tiny random models for tests and benchmarks: every family of the architecture map.

HF families are built with transformers' own classes (so tensor names are exactly
what transformers saves) and written as safetensors; GGUF fixtures are written with
gguf-py's GGUFWriter using llama.cpp's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# family -> (config class, model class, config overrides); names resolved lazily so
# importing this module does not import transformers.
HF_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "mlp_only_layers": [1],
        },
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            "num_hidden_layers": 3,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4,
            "v_head_dim": 8,
        },
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    ),
    "bert": ("BertConfig", "BertModel", {}),
}


def build_hf(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random ``family`` model (config.json + model.safetensors) to ``folder``."""
    import torch
    import transformers

    config_name, model_name, extra = HF_FAMILIES[family]
    kwargs = {} if family == "gpt2" else dict(COMMON)
    if family == "gpt2":
        kwargs["vocab_size"] = 64
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(config)
    model.save_pretrained(folder)
    return folder


def shard_folder(src: Path, dst: Path, n_shards: int = 2) -> Path:
    """Rewrite ``src/model.safetensors`` as ``n_shards`` shards plus an index."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    per = -(-len(names) // n_shards)
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(part, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst


Q = gguf.GGMLQuantizationType


def write_gguf(
    path: Path,
    arch: str,
    n_blocks: int,
    tensors: dict[str, tuple[np.ndarray, Q]],
    hidden: int = 64,
) -> Path:
    """Write a GGUF file; each tensor is given as float32 data and a target type.

    Llama files carry the hyperparameters llama.cpp needs to load (and quantize) them.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(n_blocks)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    if arch == "llama":
        writer.add_head_count(4)
        writer.add_head_count_kv(4)
        writer.add_feed_forward_length(2 * hidden)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(hidden // 4)
    for name, (data, qtype) in tensors.items():
        data = np.ascontiguousarray(data, dtype=np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        elif qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype == Q.BF16:
            bits = (data.view(np.uint32) >> 16).astype(np.uint16)
            writer.add_tensor(name, bits, raw_shape=data.shape, raw_dtype=Q.BF16)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(arch: str, n_blocks: int = 2, hidden: int = 64, seed: int = 0) -> dict:
    """llama.cpp-named tensors of a tiny ``arch`` model ("llama", "gemma2", "deepseek2", "bert")."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, qtype: Q = Q.Q8_0) -> tuple[np.ndarray, Q]:
        return (rng.standard_normal(shape).astype(np.float32) * 0.02, qtype)

    def norm() -> tuple[np.ndarray, Q]:
        return (np.ones(hidden, np.float32), Q.F32)

    h, f = hidden, 2 * hidden
    t = {"token_embd.weight": w(128, h, qtype=Q.Q4_0)}
    if arch == "bert":
        t["position_embd.weight"] = w(64, h, qtype=Q.F16)
        t["token_types.weight"] = w(2, h, qtype=Q.F32)
        t["token_embd_norm.weight"] = norm()
    for b in range(n_blocks):
        p = f"blk.{b}."
        if arch == "deepseek2":
            t |= {
                p + "attn_norm.weight": norm(),
                p + "attn_q_a.weight": w(32, h),
                p + "attn_q_a_norm.weight": (np.ones(32, np.float32), Q.F32),
                p + "attn_q_b.weight": w(h, 32),
                p + "attn_kv_a_mqa.weight": w(64, h),
                p + "attn_kv_a_norm.weight": (np.ones(32, np.float32), Q.F32),
                p + "attn_kv_b.weight": w(h, 32),
                p + "attn_output.weight": w(h, h),
                p + "ffn_norm.weight": norm(),
            }
            if b == 0:  # dense first layer
                t |= {
                    p + "ffn_gate.weight": w(f, h),
                    p + "ffn_up.weight": w(f, h),
                    p + "ffn_down.weight": w(h, f),
                }
            else:
                t |= {
                    p + "ffn_gate_inp.weight": w(4, h, qtype=Q.F32),
                    p + "ffn_gate_exps.weight": w(4, 32, h),
                    p + "ffn_up_exps.weight": w(4, 32, h),
                    p + "ffn_down_exps.weight": w(4, h, 32),
                    p + "ffn_gate_shexp.weight": w(32, h),
                    p + "ffn_up_shexp.weight": w(32, h),
                    p + "ffn_down_shexp.weight": w(h, 32),
                }
            continue
        t |= {
            p + "attn_q.weight": w(h, h, qtype=Q.BF16),
            p + "attn_k.weight": w(h // 2, h, qtype=Q.F16),
            p + "attn_v.weight": w(h // 2, h),
            p + "attn_output.weight": w(h, h, qtype=Q.Q4_1),
            p + "ffn_up.weight": w(f, h),
            p + "ffn_down.weight": w(h, f),
        }
        if arch == "bert":
            t |= {
                p + "attn_output_norm.weight": norm(),
                p + "layer_output_norm.weight": norm(),
            }
        else:
            t |= {
                p + "attn_norm.weight": norm(),
                p + "ffn_norm.weight": norm(),
                p + "ffn_gate.weight": w(f, h),
            }
        if arch == "gemma2":
            t |= {
                p + "post_attention_norm.weight": norm(),
                p + "post_ffw_norm.weight": norm(),
            }
    if arch != "bert":
        t["output_norm.weight"] = norm()
    if arch in ("llama", "deepseek2"):
        t["output.weight"] = w(128, h, qtype=Q.Q8_0)
    return t


def shared_data() -> Path:
    """The workplace's evaluation data: ``../shared/data`` beside the repository.

    ``EWQ_SHARED_DATA`` overrides it; a clone elsewhere falls back to /work/shared.
    """
    import os

    env = os.environ.get("EWQ_SHARED_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[1]
    candidates += [p / "shared" / "data" for p in repo.parents]
    candidates.append(Path("/work/shared/data"))
    for c in candidates:
        if (c / "paper").is_dir():
            return c
    raise FileNotFoundError(
        "shared evaluation data not found: set EWQ_SHARED_DATA to the shared/data folder"
    )


def f16_gguf(path: Path, n_blocks: int = 2, hidden: int = 64, **kw) -> Path:
    """A float Llama GGUF (F16 matrices, F32 norms) llama.cpp can load and quantize."""
    t = gguf_tensors("llama", n_blocks, hidden=hidden)
    t = {k: (v[0], Q.F32 if v[1] == Q.F32 else Q.F16) for k, v in t.items()}
    return write_gguf(path, "llama", kw.get("block_count", n_blocks), t, hidden=hidden)


def plan_file(path: Path, precision: str, n_blocks: int = 2) -> Path:
    """A plan putting every transformer block at one precision."""
    import json

    blocks = [{"exec_index": i, "precision": precision} for i in range(2, n_blocks + 2)]
    path.write_text(json.dumps({"schema_version": 1, "blocks": blocks}))
    return path


def tiny_llama_config(**overrides) -> dict:
    """A Llama config.json as a dict: enough for features and FastEWQ plans."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 100,
    } | overrides


def split_gguf(src: Path, dst: Path, max_tensors: int) -> Path:
    """``src`` rewritten as llama.cpp's split files by gguf-py's own writer
    (``split_max_tensors``: its PREFIX-0000i-of-0000N.gguf names and split.* keys);
    returns the first file. Every key and tensor (bytes as they are) is kept."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    dst.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(dst / "model.gguf", arch, split_max_tensors=max_tensors)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture",):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:  # data as the reader shapes it: bytes for quant types
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    first = sorted(dst.glob("model-*.gguf"))[0]
    return first


def byte_vocab_llama(
    path: Path,
    n_blocks: int = 2,
    hidden: int = 256,
    seed: int = 7,
    *,
    arch: str = "llama",
    experts: int = 0,
    window: int | None = None,
    per_layer_heads: bool = False,
) -> Path:
    """A float model that llama.cpp tokenizes text for: a SentencePiece ('llama')
    vocabulary of the 256 byte tokens plus <unk>, <s> and </s> (every text is its
    UTF-8 bytes), random F32 weights of rows of 256 (every K-quant fits). ``arch``:
    "llama" (with ``experts``: Mixtral's routed experts, two used per token),
    "gemma2" or "gemma3" (their post-norms, Gemma-3's q/k norms, a tied output;
    ``window``: a sliding window, every layer but each 2nd/6th; ``per_layer_heads``:
    the key/value head count as an array, one entry per block). The same seed and
    settings give the same file byte for byte, so a file llama.cpp's own tools
    computed for it (tests/data) stays valid."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # unknown, control, byte
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    h, f = hidden, 2 * hidden
    gemma = arch.startswith("gemma")

    def w(*shape: int) -> tuple[np.ndarray, Q]:
        return (rng.standard_normal(shape).astype(np.float32) * 0.05, Q.F32)

    def norm(n: int = h) -> tuple[np.ndarray, Q]:
        return (np.ones(n, np.float32), Q.F32)

    t = {"token_embd.weight": w(vocab, h)}
    for b in range(n_blocks):
        p = f"blk.{b}."
        t |= {
            p + "attn_norm.weight": norm(),
            p + "attn_q.weight": w(h, h),
            p + "attn_k.weight": w(h // 2, h),
            p + "attn_v.weight": w(h // 2, h),
            p + "attn_output.weight": w(h, h),
            p + "ffn_norm.weight": norm(),
        }
        if experts:
            t |= {
                p + "ffn_gate_inp.weight": w(experts, h),
                p + "ffn_gate_exps.weight": w(experts, f, h),
                p + "ffn_up_exps.weight": w(experts, f, h),
                p + "ffn_down_exps.weight": w(experts, h, f),
            }
        else:
            t |= {
                p + "ffn_gate.weight": w(f, h),
                p + "ffn_up.weight": w(f, h),
                p + "ffn_down.weight": w(h, f),
            }
        if gemma:
            t |= {
                p + "post_attention_norm.weight": norm(),
                p + "post_ffw_norm.weight": norm(),
            }
        if arch == "gemma3":
            t |= {
                p + "attn_q_norm.weight": norm(h // 4),
                p + "attn_k_norm.weight": norm(h // 4),
            }
    t["output_norm.weight"] = norm()
    if not gemma:
        t["output.weight"] = w(vocab, h)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny byte {arch}")
    writer.add_block_count(n_blocks)
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_head_count(4)
    writer.add_head_count_kv([2] * n_blocks if per_layer_heads else 2)
    writer.add_feed_forward_length(f)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(h // 4)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
    if window is not None:
        writer.add_sliding_window(window)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    for name, (data, _) in t.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def wordpiece_gpt2(root: Path):
    """A tiny GPT-2 with a WordPiece vocabulary of IgLM's kind (case kept; residues,
    tags added whole), converted by llama.cpp's converter through ewq: the GGUF path
    and the Hugging Face tokenizer."""
    import json

    import transformers

    from ewq.quant.convert import convert

    folder = build_hf("gpt2", root / "g", vocab_size=40)
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]  # GPT-2's own configs carry both
    (folder / "config.json").write_text(json.dumps(config))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(
        "ACDEFGHIKLMNPQRSTVWY"
    )
    vocab += ["[HEAVY]", "[LIGHT]", "[HUMAN]", "[MOUSE]"]
    vocab += [f"[unused{i}]" for i in range(40 - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False)
    tok.add_tokens(["[HEAVY]", "[LIGHT]", "[HUMAN]", "[MOUSE]"])
    tok.save_pretrained(folder)
    out = root / "g.gguf"
    convert(folder, out, "f32")
    return out, tok
