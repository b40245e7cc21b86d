"""Architecture map: every family's tiny model maps every tensor to its block and role."""

from __future__ import annotations

import logging

import gguf
import pytest

from ewq.arch import load_tables, resolve
from ewq.arch.registry import compiled, generic_table, template_of
from ewq.errors import UnknownArchitectureError
from ewq.sources import open_source
from ewq.types import BlockKind, ModelIndex, ParamKind, Role, TensorInfo

R = Role
LLAMA_BLOCK = {
    R.ATTN_NORM,
    R.ATTN_Q,
    R.ATTN_K,
    R.ATTN_V,
    R.ATTN_O,
    R.FFN_NORM,
    R.MLP_GATE,
    R.MLP_UP,
    R.MLP_DOWN,
}
MLA = {
    R.ATTN_NORM,
    R.ATTN_Q_A,
    R.ATTN_Q_A_NORM,
    R.ATTN_Q_B,
    R.ATTN_KV_A,
    R.ATTN_KV_A_NORM,
    R.ATTN_KV_B,
    R.ATTN_O,
    R.FFN_NORM,
}
MOE_SHARED = {
    R.MOE_ROUTER,
    R.MOE_EXPERT_GATE,
    R.MOE_EXPERT_UP,
    R.MOE_EXPERT_DOWN,
    R.MOE_SHARED_GATE,
    R.MOE_SHARED_UP,
    R.MOE_SHARED_DOWN,
}

BERT_BLOCK = {
    R.ATTN_Q,
    R.ATTN_K,
    R.ATTN_V,
    R.ATTN_O,
    R.ATTN_POST_NORM,
    R.MLP_UP,
    R.MLP_DOWN,
    R.FFN_POST_NORM,
}

# family -> (table, transformer blocks, roles of the first block, roles of the head)
EXPECTED = {
    "llama": ("llama", 2, LLAMA_BLOCK, {R.FINAL_NORM, R.LM_HEAD}),
    "mistral": ("llama", 2, LLAMA_BLOCK, {R.FINAL_NORM, R.LM_HEAD}),
    "qwen2": ("qwen2", 2, LLAMA_BLOCK, {R.FINAL_NORM, R.LM_HEAD}),
    "qwen3": (
        "qwen3",
        2,
        LLAMA_BLOCK | {R.ATTN_Q_NORM, R.ATTN_K_NORM},
        {R.FINAL_NORM, R.LM_HEAD},
    ),
    "gemma": ("gemma", 2, LLAMA_BLOCK, {R.FINAL_NORM}),
    "gemma2": (
        "gemma2",
        2,
        LLAMA_BLOCK | {R.ATTN_POST_NORM, R.FFN_POST_NORM},
        {R.FINAL_NORM},
    ),
    "gemma3": (
        "gemma3",
        2,
        LLAMA_BLOCK | {R.ATTN_POST_NORM, R.FFN_POST_NORM, R.ATTN_Q_NORM, R.ATTN_K_NORM},
        {R.FINAL_NORM},
    ),
    "phi3": (
        "phi3",
        2,
        {R.ATTN_NORM, R.ATTN_QKV, R.ATTN_O, R.FFN_NORM, R.MLP_GATE_UP, R.MLP_DOWN},
        {R.FINAL_NORM, R.LM_HEAD},
    ),
    "stablelm": ("stablelm", 2, LLAMA_BLOCK, {R.FINAL_NORM, R.LM_HEAD}),
    "mixtral": (
        "mixtral",
        2,
        {
            R.ATTN_NORM,
            R.ATTN_Q,
            R.ATTN_K,
            R.ATTN_V,
            R.ATTN_O,
            R.FFN_NORM,
            R.MOE_ROUTER,
            R.MOE_EXPERT_GATE,
            R.MOE_EXPERT_UP,
            R.MOE_EXPERT_DOWN,
        },
        {R.FINAL_NORM, R.LM_HEAD},
    ),
    "qwen2_moe": (
        "qwen_moe",
        2,
        (LLAMA_BLOCK - {R.MLP_GATE, R.MLP_UP, R.MLP_DOWN})
        | MOE_SHARED
        | {R.MOE_SHARED_ROUTER},
        {R.FINAL_NORM, R.LM_HEAD},
    ),
    "qwen3_moe": (
        "qwen_moe",
        2,
        (LLAMA_BLOCK - {R.MLP_GATE, R.MLP_UP, R.MLP_DOWN})
        | {R.ATTN_Q_NORM, R.ATTN_K_NORM, R.MOE_ROUTER}
        | {R.MOE_EXPERT_GATE, R.MOE_EXPERT_UP, R.MOE_EXPERT_DOWN},
        {R.FINAL_NORM, R.LM_HEAD},
    ),
    "deepseek_v2": (
        "deepseek_v2",
        3,
        MLA | {R.MLP_GATE, R.MLP_UP, R.MLP_DOWN},
        {R.FINAL_NORM, R.LM_HEAD},
    ),
    "gpt2": (
        "gpt2",
        2,
        {R.ATTN_NORM, R.ATTN_QKV, R.ATTN_O, R.FFN_NORM, R.MLP_UP, R.MLP_DOWN},
        {R.FINAL_NORM},
    ),
    "bert": (
        "bert",
        2,
        BERT_BLOCK,
        {R.POOLER},
    ),
}


def roles(block) -> set[Role]:
    return {k.role for k in block.keys}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_fixture_maps_every_tensor(family, tiny_models, caplog):
    table, n, first_roles, head_roles = EXPECTED[family]
    with caplog.at_level(logging.WARNING), open_source(tiny_models[family]) as src:
        layout = resolve(src.index)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert layout.table == table
    assert layout.num_blocks == n
    assert [b.exec_index for b in layout.blocks] == list(range(1, n + 3))
    assert [b.kind for b in layout.blocks] == (
        [BlockKind.EMBEDDING] + [BlockKind.TRANSFORMER] * n + [BlockKind.HEAD]
    )
    assert not layout.unassigned
    assert all(k.role is not Role.OTHER for k in layout.keys.values())
    assert R.EMBED in roles(layout.blocks[0])
    assert roles(layout.blocks[1]) == first_roles
    assert roles(layout.blocks[-1]) == head_roles
    # the block number in the name decides the exec_index
    for name, key in layout.keys.items():
        _, numbers = template_of(name)
        if key.block_kind is BlockKind.TRANSFORMER:
            assert key.exec_index == numbers[0] + 2
    assert sum(b.num_parameters for b in layout.blocks) == src.index.num_parameters


def test_qwen2_biases_are_bias_kind(tiny_models):
    with open_source(tiny_models["qwen2"]) as src:
        layout = resolve(src.index)
    key = layout.keys["model.layers.1.self_attn.q_proj.bias"]
    assert (key.exec_index, key.role, key.kind) == (3, R.ATTN_Q, ParamKind.BIAS)


def test_deepseek_moe_after_dense_first_layer(tiny_models):
    with open_source(tiny_models["deepseek_v2"]) as src:
        layout = resolve(src.index)
    assert roles(layout.blocks[2]) == MLA | MOE_SHARED
    experts = [k for k in layout.blocks[2].keys if k.role is R.MOE_EXPERT_GATE]
    assert len(experts) == 4  # one gate_proj per routed expert


def test_mixtral_experts_in_their_block(tiny_models):
    with open_source(tiny_models["mixtral"]) as src:
        layout = resolve(src.index)
    key = layout.keys["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert (key.exec_index, key.role) == (3, R.MOE_EXPERT_DOWN)


@pytest.mark.parametrize(
    ("arch", "n", "first_roles", "head_roles"),
    [
        ("llama", 2, LLAMA_BLOCK, {R.FINAL_NORM, R.LM_HEAD}),
        (
            "gemma2",
            2,
            LLAMA_BLOCK | {R.ATTN_POST_NORM, R.FFN_POST_NORM},
            {R.FINAL_NORM},
        ),
        (
            "deepseek2",
            3,
            MLA | {R.MLP_GATE, R.MLP_UP, R.MLP_DOWN},
            {R.FINAL_NORM, R.LM_HEAD},
        ),
        (
            "bert",
            2,
            BERT_BLOCK,
            set(),
        ),
    ],
)
def test_gguf_names(arch, n, first_roles, head_roles, tiny_ggufs):
    with open_source(tiny_ggufs[arch]) as src:
        layout = resolve(src.index)
    assert (layout.architecture, layout.table, layout.num_blocks) == (arch, "gguf", n)
    assert not layout.unassigned
    assert roles(layout.blocks[1]) == first_roles
    assert roles(layout.blocks[-1]) == head_roles
    if arch == "deepseek2":
        assert roles(layout.blocks[2]) == MLA | MOE_SHARED
    if arch == "bert":
        assert roles(layout.blocks[0]) == {
            R.EMBED,
            R.POS_EMBED,
            R.TYPE_EMBED,
            R.EMBED_NORM,
        }


def test_every_shipped_table_loads_and_compiles():
    tables = load_tables()
    assert {
        "llama",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "stablelm",
        "mixtral",
        "deepseek_v2",
        "gpt2",
        "bert",
        "gguf",
        "qwen_moe",
    } <= tables.keys()
    for name in tables:
        assert compiled(name).lookup
    assert generic_table().keywords


def test_every_family_table_is_checked_by_a_tiny_model():
    """A family table no fixture model resolves to is untested; GGUF's names are
    checked by the tiny GGUF files (test_gguf_names)."""
    covered = {table for table, *_ in EXPECTED.values()}
    assert set(load_tables()) - {"gguf"} <= covered


def test_a_child_table_adds_to_its_parents_entry():
    """Qwen2 gives Llama's q_proj a bias shape and keeps its role; Phi-3 drops a
    weight shape its parent declares."""
    q = compiled("qwen2").table.tensors["layers.{N}.self_attn.q_proj"]
    assert q.role is R.ATTN_Q and q.weight and q.bias
    assert compiled("phi3").table.tensors["layers.{N}.self_attn.q_proj"].weight is False
    assert compiled("gemma3").table.shapes.defaults["tie_word_embeddings"] == "True"


def test_gguf_table_uses_llama_cpp_names():
    """Every template of our GGUF table is a name gguf-py (llama.cpp) defines."""
    known = {v.replace("{bid}", "{N}") for v in gguf.TENSOR_NAMES.values()}
    for template in compiled("gguf").table.tensors:
        assert template in known, template


def _index(names: list[str], config: dict | None = None) -> ModelIndex:
    tensors = tuple(
        TensorInfo(n, "F32", (4, 4), 64, "x.safetensors", i * 64)
        for i, n in enumerate(names)
    )
    return ModelIndex("mem", "safetensors", ("x.safetensors",), tensors, config or {})


def test_unknown_architecture_falls_back_with_warning(caplog):
    names = [
        "transformer.tok_embeddings.weight",
        "transformer.blocks.0.attn.qkv.weight",
        "transformer.blocks.0.ffn.fc1.weight",
        "transformer.blocks.1.attn.qkv.weight",
        "transformer.blocks.1.ffn.fc1.weight",
        "transformer.final_ln.weight",
    ]
    with caplog.at_level(logging.WARNING):
        layout = resolve(_index(names, {"architectures": ["NovelForCausalLM"]}))
    assert "unknown architecture 'NovelForCausalLM'" in caplog.text
    assert layout.table == "generic" and layout.num_blocks == 2
    assert layout.keys["transformer.tok_embeddings.weight"].exec_index == 1
    assert layout.keys["transformer.blocks.1.attn.qkv.weight"].exec_index == 3
    assert layout.keys["transformer.blocks.1.attn.qkv.weight"].role is R.ATTN_QKV
    assert layout.keys["transformer.final_ln.weight"].exec_index == 4


def test_no_block_structure_is_an_error():
    with pytest.raises(
        UnknownArchitectureError, match="no transformer blocks found in 2 tensor"
    ):
        resolve(_index(["encoder.weight", "decoder.weight"], {"model_type": "mystery"}))


def test_names_outside_the_table_are_placed_with_a_warning(caplog):
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.rotary.inv_freq",
        "model.norm.weight",
        "vision_tower.layers.0.fc.weight",
    ]
    with caplog.at_level(logging.WARNING):
        layout = resolve(_index(names, {"architectures": ["LlamaForCausalLM"]}))
    assert "2 tensors" in caplog.text
    assert layout.keys["model.layers.0.self_attn.rotary.inv_freq"].exec_index == 2
    assert [t.name for t in layout.unassigned] == ["vision_tower.layers.0.fc.weight"]
