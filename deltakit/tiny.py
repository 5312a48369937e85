"""Tiny but real checkpoints of every family, built with transformers, for tests, the demo and benchmarks.

Nothing is downloaded: configs are written here with small sizes, weights are seeded random values,
and :func:`save_partner_llm` derives a text-only "reasoning" LLM from an MLLM's text tower so that
pairs with a known relationship can be made offline.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from deltakit.errors import FamilyError
from deltakit.families import get_family
from deltakit.model import map_parameters, open_model, part_of

# Special-token ids at the top of the tiny vocabulary, named after Qwen's tokens
# (<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>);
# ids below 500 are free for a trained tokenizer.
VOCAB = 512
SPECIAL = {"endoftext": 500, "im_start": 501, "im_end": 502, "vision_start": 503, "vision_end": 504, "image": 505, "video": 506}


def text_config(model_type: str = "qwen2", hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 64, vocab: int = VOCAB, tie: bool = False) -> dict:
    """A small decoder config as a dict (``model_type`` included)."""
    return dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                tie_word_embeddings=tie, max_position_embeddings=512, bos_token_id=SPECIAL["endoftext"],
                eos_token_id=SPECIAL["im_end"], pad_token_id=SPECIAL["endoftext"])


def config_class(family: str) -> type[PretrainedConfig]:
    """The transformers config class of ``family`` (the one its ``model_type`` maps to)."""
    return transformers.CONFIG_MAPPING[get_family(family).model_types[0]]


def _text_model_type(family: str) -> str:
    """The text config's ``model_type`` inside ``family``'s config: its config class's own text sub-config's where
    that has one, else the standalone LLM's (``family.text_type``). Qwen2-VL / Qwen2.5-VL are given the LLM's
    ("qwen2"), which their config classes rename, as they always have been."""
    fam = get_family(family)
    if not fam.multimodal or family in ("qwen2_vl", "qwen2_5_vl"):
        return fam.text_type
    sub = (getattr(config_class(family), "sub_configs", None) or {}).get("text_config")
    return getattr(sub, "model_type", "") or fam.text_type


EXPERTS, TOP_K = 4, 2
MLLAMA_LAYERS = 5
"""Tiny mllama's decoder layers (cross-attention ones included) when ``layers`` is not given."""


def _mrope(half: int) -> list[int]:
    """An ``mrope_section`` (t, h, w) that sums to ``half`` (half the rotary dim)."""
    return [half - 2 * (half // 4), half // 4, half // 4]


def _text_extras(text: dict, text_type: str) -> dict:
    """Add to a :func:`text_config` dict what a ``text_type`` tower needs beyond the common fields."""
    hidden, heads, layers = text["hidden_size"], text["num_attention_heads"], text["num_hidden_layers"]
    if text_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        text["head_dim"] = hidden // heads
    if text_type in ("qwen3_moe", "qwen3_5_moe_text"):
        # 2 * I != H and I != H, so [E, 2I, H] / [E, H, I] and their transposes cannot be confused.
        text.update(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=hidden + hidden // 2)
    if text_type in ("qwen3_5_text", "qwen3_5_moe_text"):
        head_dim = 16
        text.update(head_dim=head_dim, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    layer_types=["full_attention" if i % 2 else "linear_attention" for i in range(layers)],
                    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.5,
                                     "mrope_section": _mrope(head_dim // 4), "mrope_interleaved": True})
    if text_type == "qwen3_5_moe_text":  # no dense MLP: the shared expert takes the dense size
        text["shared_expert_intermediate_size"] = text.pop("intermediate_size")
    if text_type == "gemma3_text":
        text.update(query_pre_attn_scalar=text["head_dim"], sliding_window=16,
                    layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(layers)])
    return text


def _family_text(family: str, **text_kw) -> dict:
    """The text config dict of ``family``'s tiny model (its text tower's, for an MLLM)."""
    fam = get_family(family)
    if family == "mllama":
        text_kw.setdefault("layers", MLLAMA_LAYERS)
        if text_kw.get("tie"):
            raise ValueError("mllama cannot tie lm_head to embed_tokens (the embedding has 8 more rows)")
    text = _text_extras(text_config(_text_model_type(family), **text_kw), fam.text_type)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5_000_000.0,
                                   "mrope_section": _mrope(text["head_dim"] // 2), "mrope_interleaved": True}
    if family == "mllama":
        n = text["num_hidden_layers"]
        text["cross_attention_layers"] = [i for i in (1, 3) if i < n - 1]
    return text


def tiny_config(family: str, **text_kw) -> PretrainedConfig:
    """A transformers config of ``family`` with a tiny text tower (``text_kw`` go to :func:`text_config`)."""
    fam = get_family(family)
    text = _family_text(family, **text_kw)
    if not fam.multimodal:
        return transformers.AutoConfig.for_model(**text)
    hidden = text["hidden_size"]
    tie = text["tie_word_embeddings"]
    qwen_ids = dict(image_token_id=SPECIAL["image"], video_token_id=SPECIAL["video"],
                    vision_start_token_id=SPECIAL["vision_start"], vision_end_token_id=SPECIAL["vision_end"],
                    tie_word_embeddings=tie)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        head_dim = hidden // text["num_attention_heads"]
        q = head_dim // 2
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [q // 4, q // 4, q - 2 * (q // 4)]}
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=16, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
        else:
            vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
        return config_class(family)(text_config=text, vision_config=vision, **qwen_ids)
    if family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        if family.startswith("qwen3_vl"):
            vision["deepstack_visual_indexes"] = [0]
        return config_class(family)(text_config=text, vision_config=vision, **qwen_ids)
    clip = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)
    if family == "llava":
        return config_class(family)(text_config=text, vision_config=clip, image_token_index=SPECIAL["image"],
                                        tie_word_embeddings=tie)
    if family == "llava_next":
        return config_class(family)(text_config=text, vision_config=clip, image_token_index=SPECIAL["image"],
                                            image_grid_pinpoints=[[28, 28], [28, 56]], tie_word_embeddings=tie)
    siglip = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    if family == "idefics2":
        perceiver = dict(hidden_size=hidden, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                         resampler_head_dim=8, num_key_value_heads=1)
        return config_class(family)(text_config=text, vision_config=siglip, perceiver_config=perceiver,
                                           image_token_id=SPECIAL["image"], tie_word_embeddings=tie)
    if family == "idefics3":
        return config_class(family)(text_config=text, vision_config=siglip, image_token_id=SPECIAL["image"],
                                           scale_factor=2, tie_word_embeddings=tie)
    siglip = dict(siglip, model_type="siglip_vision_model", vision_use_head=False)
    if family == "llava_onevision":
        return config_class(family)(text_config=text, vision_config=siglip,
                                                 image_token_index=SPECIAL["image"], video_token_index=SPECIAL["video"],
                                                 image_grid_pinpoints=[[28, 28], [28, 56]], tie_word_embeddings=tie)
    if family == "gemma3":
        return config_class(family)(text_config=text, vision_config=siglip, mm_tokens_per_image=1,
                                         boi_token_index=SPECIAL["vision_start"], eoi_token_index=SPECIAL["vision_end"],
                                         image_token_index=SPECIAL["image"], tie_word_embeddings=tie)
    if family == "internvl":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return config_class(family)(text_config=text, vision_config=vision, image_token_id=SPECIAL["image"],
                                           image_seq_length=1, downsample_ratio=0.5, tie_word_embeddings=tie)
    if family == "mistral3":
        # 56 px: a 4 x 4 patch image merges to 4 tokens (Mistral3's projector cannot take a one-token image).
        pixtral = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, image_size=56, patch_size=14)
        return config_class(family)(text_config=text, vision_config=pixtral, image_token_index=SPECIAL["image"],
                                           spatial_merge_size=2, tie_word_embeddings=tie)
    if family == "mllama":
        # The projector reads the last hidden state and one intermediate layer's: 2 * 16 features.
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                      vision_output_dim=32, intermediate_layers_indices=[0], image_size=28, patch_size=14,
                      max_num_tiles=1, supported_aspect_ratios=[[1, 1]])
        # The image token is the first of the 8 rows embed_tokens has beyond the vocabulary, as in Llama-3.2-Vision.
        return config_class(family)(text_config=text, vision_config=vision, image_token_index=VOCAB)
    raise ValueError(f"no tiny config for family {family!r}")


def build_tiny(family: str, seed: int = 0, **text_kw) -> PreTrainedModel:
    """A randomly initialised tiny model of ``family`` (deterministic for a seed)."""
    torch.manual_seed(seed)
    return getattr(transformers, get_family(family).architectures[0])(tiny_config(family, **text_kw)).eval()


def save_tiny(family: str, path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_shard_size: str | int | None = None, **text_kw) -> Path:
    """Build a tiny model of ``family`` and ``save_pretrained`` it (sharded when ``max_shard_size`` is set)."""
    model = build_tiny(family, seed, **text_kw).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kw)
    return Path(path)


# Fields the LLM's modeling reads with getattr although its config class does not declare them
# (Qwen3MoeConfig has no head_dim; Qwen3-30B-A3B's is 128, not hidden_size / heads).
_READ_ANYWAY = {"head_dim"}
# Keys of a saved config that describe the file, not the model.
_NOT_MODEL = ("architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
              "text_config", "vision_config")


def partner_config(src) -> PretrainedConfig:
    """The config of a text-only LLM of ``src``'s text type (:meth:`~deltakit.families.Family.text_type_of`) with the text tower of ``src``
    (a :class:`~deltakit.model.MappedCheckpoint`).

    Built from the MLLM's own ``text_config`` (over its top-level fields, for flat legacy configs): every
    field the LLM's config class knows carries over, with ``num_hidden_layers`` the paired layer count
    (MLLM-only cross-attention layers dropped, from ``layer_types`` too), ``tie_word_embeddings`` whether
    ``src`` ties them, ``head_dim`` explicit (``hidden_size / heads`` where the MLLM leaves it out), and
    rope settings only the MLLM uses (``mrope_section``, ...) left out.
    """
    fam = src.family
    cfg = src.ckpt.config
    text = {k: v for k, v in cfg.items() if k not in _NOT_MODEL} if fam.multimodal else {}
    text.update(cfg.get("text_config") or ({} if fam.multimodal else cfg))
    src_type = text.get("model_type")
    llm_type = fam.text_type_of(cfg)
    cls = transformers.CONFIG_MAPPING[llm_type]
    aliases = getattr(cls, "attribute_map", {}) or {}  # saved configs hold the targets (num_local_experts)
    known = {f.name for f in dataclasses.fields(cls)} | set(aliases) | set(aliases.values()) | _READ_ANYWAY
    kw = {k: v for k, v in text.items() if k in known and k not in _NOT_MODEL}
    kw["num_hidden_layers"] = src.num_layers
    if isinstance(kw.get("layer_types"), list) and src.cross:
        kw["layer_types"] = [t for i, t in enumerate(kw["layer_types"]) if i not in src.cross]
    kw["tie_word_embeddings"] = src.tied
    if kw.get("head_dim") is None:
        kw.pop("head_dim", None)
        if "head_dim" in {f.name for f in dataclasses.fields(cls)}:  # else the LLM computes hidden / heads itself
            kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    rope = kw.get("rope_parameters")
    if isinstance(rope, dict) and src_type in transformers.CONFIG_MAPPING:
        mllm_only = set(getattr(transformers.CONFIG_MAPPING[src_type], "ignore_keys_at_rope_validation", ()) or ())
        mllm_only -= set(getattr(cls, "ignore_keys_at_rope_validation", ()) or ())
        if rope.get("type") == "mrope":  # Qwen2-VL's legacy marker of its mrope
            mllm_only.add("type")
        kw["rope_parameters"] = {k: v for k, v in rope.items() if k not in mllm_only}
    return transformers.AutoConfig.for_model(llm_type, **kw)


def save_partner_llm(mllm: str | os.PathLike, path: str | os.PathLike, noise: float = 0.1, seed: int = 1,
                     dtype: torch.dtype = torch.float32, max_shard_size: str | int | None = None) -> Path:
    """Save a text-only LLM whose weights are ``mllm``'s text tower plus ``noise``-scaled Gaussian noise.

    Each tensor ``W`` becomes ``W + noise * std(W) * N(0, 1)`` (norm weights, whose std is ~0, get
    ``noise * N(0, 1)``): ``noise`` sets how far apart the pair is, as close LLaVA-like pairs or far
    Qwen-VL-like pairs are in the paper.

    The LLM is of the MLLM's text type (:func:`partner_config`), holds every paired canonical
    tensor (MLLM-only cross-attention layers are left out) and fills fused MoE experts expert by expert.
    Where the MLLM's embedding has extra rows (mllama's 8 beyond the vocabulary), the LLM gets the first
    ``vocab_size``. Noise is drawn per canonical tensor in parameter order, with a generator seeded by ``seed``.
    """
    src = open_model(mllm)
    config = partner_config(src)
    llm = get_family(src.family.text_type_of(src.ckpt.config))
    model = getattr(transformers, llm.architectures[0])(config)
    _, infos, parts = map_parameters(model, llm)
    unmapped = [n for n, i in infos.items() if i.role != "text"]
    if unmapped:
        raise FamilyError(f"{llm.name} partner of {mllm}: parameters outside the text tower: {unmapped[:5]}")
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for canonical, part in parts.items():
            if canonical not in src.text and not (canonical == "lm_head.weight" and src.tied):
                raise FamilyError(f"{mllm}: no {canonical!r} for the {llm.name} partner LLM")
            w = src.get(canonical).float()
            dst = part_of(params[part.key].data, part)
            if w.shape != dst.shape:
                if w.dim() != dst.dim() or w.shape[1:] != dst.shape[1:] or w.shape[0] < dst.shape[0]:
                    raise FamilyError(f"{mllm}: {canonical!r} is {list(w.shape)}, "
                                      f"the {llm.name} partner's {list(dst.shape)}")
                w = w[:dst.shape[0]]
            scale = w.std() if w.numel() > 1 and w.std() > 1e-6 else torch.tensor(1.0)
            dst.copy_(w + noise * scale * torch.randn(w.shape, generator=gen))
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.to(dtype).save_pretrained(path, **kw)
    return Path(path)
