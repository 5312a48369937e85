"""Lineage check on the published configs: which pairs can share a base model, and the one-line reason when not.

Every expected number is written here from the models' published ``config.json`` files (an independent
reference for what :func:`deltakit.lineage.text_architecture` reads from the copies in tests/data).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from deltakit.errors import IncompatibleError
from deltakit.families import get_family
from deltakit.lineage import (UNRELATED_COSINE, Comparison, TextArchitecture, check_lineage, compare,
                              text_architecture, unrelated_warning)

CONFIGS = Path(__file__).parent / "data" / "model-configs"
VL7 = "Qwen__Qwen2.5-VL-7B-Instruct"
R1Q = "deepseek-ai__DeepSeek-R1-Distill-Qwen-7B"
R1L = "deepseek-ai__DeepSeek-R1-Distill-Llama-8B"
Q3VL, Q3 = "Qwen__Qwen3-VL-8B-Instruct", "Qwen__Qwen3-8B"
Q3VLMOE, Q3MOE = "Qwen__Qwen3-VL-30B-A3B-Instruct", "Qwen__Qwen3-30B-A3B"
IVL = "OpenGVLab__InternVL3-8B-hf"
MLLAMA = "meta-llama__Llama-3.2-11B-Vision"
FAMILY = {VL7: "qwen2_5_vl", R1Q: "qwen2", R1L: "llama", Q3VL: "qwen3_vl", Q3: "qwen3", Q3VLMOE: "qwen3_vl_moe",
          Q3MOE: "qwen3_moe", IVL: "internvl", MLLAMA: "mllama"}

# Published values: hidden, paired layers, heads, kv heads, head_dim, intermediate, moe intermediate,
# experts, vocab, rope theta, attention bias, tied (None: the config does not say).
PUBLISHED = {
    VL7: (3584, 28, 28, 4, 128, 18944, None, None, 152064, 1_000_000, True, False),
    R1Q: (3584, 28, 28, 4, 128, 18944, None, None, 152064, 10_000, True, False),
    R1L: (4096, 32, 32, 8, 128, 14336, None, None, 128256, 500_000, False, False),
    Q3VL: (4096, 36, 32, 8, 128, 12288, None, None, 151936, 5_000_000, False, False),
    Q3: (4096, 36, 32, 8, 128, 12288, None, None, 151936, 1_000_000, False, False),
    Q3VLMOE: (2048, 48, 32, 4, 128, 6144, 768, 128, 151936, 5_000_000, False, False),
    Q3MOE: (2048, 48, 32, 4, 128, 6144, 768, 128, 151936, 1_000_000, False, False),
    IVL: (3584, 28, 28, 4, 128, 18944, None, None, 151674, 1_000_000, True, None),
    # 40 decoder layers, 8 of them cross-attention ([3, 8, ..., 38]): 32 pair with Llama-3.1-8B's
    MLLAMA: (4096, 32, 32, 8, 128, 14336, None, None, 128256, 500_000, False, False),
}
FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
          "moe_intermediate_size", "num_experts", "vocab_size", "rope_theta", "attention_bias", "tied")


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def _arch(name: str) -> TextArchitecture:
    return text_architecture(_config(name), get_family(FAMILY[name]))


def _check(a: str, b: str) -> list[str]:
    return check_lineage(_config(a), get_family(FAMILY[a]), _config(b), get_family(FAMILY[b]), "A", "B")


# -- reading configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_text_architecture_reads_the_published_values(name):
    arch = _arch(name)
    assert tuple(getattr(arch, f) for f in FIELDS) == PUBLISHED[name]
    assert arch.layer_types is None  # none of these files lists layer types


def test_mllama_counts_paired_layers_and_its_cross_layers():
    arch = _arch(MLLAMA)
    assert (arch.num_layers, arch.cross_layers) == (40 - 8, 8)
    assert _arch(R1L).cross_layers == 0


def test_qwen2_biases_follow_the_config_when_it_says():
    cfg = _config(R1Q)
    assert text_architecture(cfg, get_family("qwen2")).attention_bias is True  # no field: Qwen2 always has them
    assert text_architecture({**cfg, "attention_bias": False}, get_family("qwen2")).attention_bias is False
    llama = _config(R1L)
    unstated = {k: v for k, v in llama.items() if k != "attention_bias"}
    assert text_architecture(unstated, get_family("llama")).attention_bias is False
    assert text_architecture({**llama, "attention_bias": True}, get_family("llama")).attention_bias is True


def test_transformers5_forms_of_rope_theta_experts_and_layer_types():
    qwen35 = get_family("qwen3_5")
    types = ["linear_attention"] * 3 + ["full_attention"]
    cfg = {"model_type": "qwen3_5", "tie_word_embeddings": True,
           "text_config": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128, "vocab_size": 1000,
                           "layer_types": types, "rope_parameters": {"rope_theta": 10000000, "rope_type": "default",
                                                                     "partial_rotary_factor": 0.25}}}
    arch = text_architecture(cfg, qwen35)
    assert (arch.rope_theta, arch.layer_types, arch.tied, arch.head_dim) == (10000000, tuple(types), True, 32)
    gemma = {"hidden_size": 64, "num_attention_heads": 2, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}
    assert text_architecture(gemma, get_family("gemma3_text")).rope_theta == 1000000.0  # the full-attention theta
    assert text_architecture(gemma, get_family("gemma3_text")).head_dim == 32  # hidden / heads without head_dim
    assert text_architecture({"rope_scaling": {"rope_theta": 5.0}}, get_family("llama")).rope_theta == 5.0
    moe = {"num_local_experts": 8, "moe_intermediate_size": 16}
    assert text_architecture(moe, get_family("qwen3_moe")).num_experts == 8
    dense = text_architecture({"num_experts": 0, "moe_intermediate_size": 16}, get_family("qwen3"))
    assert (dense.num_experts, dense.moe_intermediate_size) == (None, None)
    # tie at the top level wins over text_config's (what governs an MLLM's own lm_head); text_config when alone
    both = {"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True, "hidden_size": 8}}
    assert text_architecture(both, qwen35).tied is False
    assert text_architecture({"text_config": {"tie_word_embeddings": True, "hidden_size": 8}}, qwen35).tied is True
    empty = text_architecture({}, get_family("llama"))
    assert (empty.hidden_size, empty.num_layers, empty.head_dim, empty.tied) == (None, None, None, None)
    assert empty.attention_bias is False


@pytest.mark.parametrize("name", [VL7, R1Q, R1L, Q3VL, Q3MOE, IVL, MLLAMA])
def test_the_same_values_from_a_transformers5_resave(name):
    """transformers 5 writes rope_theta inside rope_parameters and adds layer_types: same architecture."""
    import transformers

    resaved = transformers.AutoConfig.from_pretrained(CONFIGS / name).to_dict()
    family = get_family(FAMILY[name])
    raw, new = text_architecture(_config(name), family), text_architecture(resaved, family)
    for f in FIELDS:
        if getattr(raw, f) is not None:
            assert getattr(new, f) == getattr(raw, f), f
    if new.layer_types is not None:
        assert len(new.layer_types) == raw.num_layers
    assert compare(raw, new).blocking == []


# -- pairs -------------------------------------------------------------------------------------------------
def test_paper_pair_passes_with_a_rope_note():
    assert _check(VL7, R1Q) == ["rope_theta 1000000 vs 10000"]


def test_qwen3_pairs_pass():
    assert _check(Q3VL, Q3) == ["rope_theta 5000000 vs 1000000"]
    assert _check(Q3VLMOE, Q3MOE) == ["rope_theta 5000000 vs 1000000"]
    assert _arch(Q3VLMOE).num_experts == _arch(Q3MOE).num_experts == 128


def test_internvl_pair_passes_with_a_vocab_note():
    notes = _check(IVL, R1Q)
    assert "vocab_size 151674 vs 152064" in notes
    assert notes == ["vocab_size 151674 vs 152064", "rope_theta 1000000 vs 10000"]  # InternVL's tie is unstated


def test_mllama_pair_passes_on_paired_layers():
    assert _check(MLLAMA, R1L) == []  # 32 vs 32 paired layers, vocab_size 128256 on both


def test_qwen_mllm_with_llama_llm_is_one_line_naming_what_differs():
    with pytest.raises(IncompatibleError) as e:
        _check(VL7, R1L)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("A (qwen2_5_vl) and B (llama) cannot share a base model: hidden_size 3584 vs 4096, ")
    for part in ("attention biases yes vs no", "intermediate_size 18944 vs 14336"):
        assert part in msg
    assert "layers" not in msg  # depth is a note: the layers both have still pair
    assert msg.endswith("so diff/merge/prior on this pair is meaningless")
    assert "vocab" not in msg and "rope" not in msg  # notes are not reasons


def test_qwen2_5_vl_with_qwen3_raises():
    with pytest.raises(IncompatibleError) as e:
        _check(VL7, Q3)
    msg = str(e.value)
    for part in ("hidden_size 3584 vs 4096", "intermediate_size 18944 vs 12288", "attention biases yes vs no",
                 "kv heads 4 vs 8"):
        assert part in msg
    assert "head_dim" not in msg  # 3584 / 28 = 128 = Qwen3-8B's head_dim


def test_compare_blocking_and_notes():
    a, b = _arch(VL7), _arch(R1L)
    result = compare(a, b)
    assert isinstance(result, Comparison) and not result.compatible
    blocking, notes = result
    assert blocking == ["hidden_size 3584 vs 4096", "heads 28 vs 32", "kv heads 4 vs 8",
                        "intermediate_size 18944 vs 14336", "attention biases yes vs no"]
    assert notes == ["layers 28 vs 32", "vocab_size 152064 vs 128256", "rope_theta 1000000 vs 500000"]
    assert compare(a, a) == Comparison([], []) and compare(a, a).compatible


def test_compare_moe_dense_cross_layers_and_text_types():
    moe, dense = _arch(Q3MOE), _arch(Q3)
    blocking, _ = compare(moe, dense)
    assert "experts 128 vs none (dense)" in blocking
    mllama = _arch(MLLAMA)
    fewer = TextArchitecture(**{**mllama.__dict__, "num_layers": 28, "cross_layers": 0})
    assert compare(mllama, fewer) == Comparison([], ["layers 32 (+8 cross-attention) vs 28"])
    mistral = TextArchitecture(**{**_arch(R1L).__dict__, "text_type": "mistral", "vocab_size": 32000})
    assert compare(_arch(R1L), mistral) == Comparison([], ["vocab_size 128256 vs 32000", "text types llama vs mistral"])
    untied = TextArchitecture(**{**_arch(R1L).__dict__, "tied": True, "hidden_size": None})
    assert compare(_arch(R1L), untied) == Comparison([], ["tied embeddings no vs yes"])  # None is not compared


def test_compare_layer_types():
    base = _arch(Q3)
    full = ("full_attention",) * 4
    hybrid = ("linear_attention",) * 3 + ("full_attention",)
    sliding = ("sliding_attention",) * 3 + ("full_attention",)
    arch = lambda types: TextArchitecture(**{**base.__dict__, "num_layers": 4, "layer_types": types})  # noqa: E731
    assert compare(arch(full), arch(hybrid)).blocking == [
        "layer types differ at 3 of 4 layers (layer 0: full_attention vs linear_attention)"]
    # sliding vs full: the same weights, a different window
    assert compare(arch(full), arch(sliding)) == Comparison(
        [], ["attention windows differ at 3 of 4 layers (layer 0: full_attention vs sliding_attention)"])
    assert compare(arch(full), arch(None)) == Comparison([], [])


def test_mllama_layer_types_drop_the_cross_layers():
    cfg = _config(MLLAMA)
    cross = cfg["text_config"]["cross_attention_layers"]
    types = ["cross_attention" if i in cross else "full_attention" for i in range(40)]
    cfg["text_config"] = {**cfg["text_config"], "layer_types": types}
    assert text_architecture(cfg, get_family("mllama")).layer_types == ("full_attention",) * 32


def test_importable_without_torch_or_transformers():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import deltakit.lineage\n"
            "print(sorted(m for m in sys.modules if m.startswith('deltakit')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "['deltakit', 'deltakit.errors', 'deltakit.families', 'deltakit.lineage']"


# -- after diff ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cos", [0.0, 0.003, -0.05, 0.19, -0.19])
def test_unrelated_warning_near_zero(cos):
    msg = unrelated_warning(cos)
    assert msg is not None and "\n" not in msg
    assert "never one model" in msg and f"{cos:.3f}" in msg


@pytest.mark.parametrize("cos", [0.2, 0.5, 0.63, 0.77, 0.98, 1.0, -0.3, math.nan])
def test_no_unrelated_warning_for_related_pairs(cos):
    assert unrelated_warning(cos) is None  # the paper's far Qwen pair (~0.63-0.77) included


def test_unrelated_warning_threshold():
    assert UNRELATED_COSINE == 0.2
    assert unrelated_warning(0.3, threshold=0.4) is not None
    assert unrelated_warning(0.3, threshold=0.25) is None
    with pytest.raises(ValueError):
        unrelated_warning(0.1, threshold=0)
