"""Tiny but real checkpoints of every family, built with transformers, for tests, the demo and benchmarks.

Nothing is downloaded: configs are written here with small sizes, weights are seeded random values,
and :func:`save_partner_llm` derives a text-only "reasoning" LLM from an MLLM's text tower so that
pairs with a known relationship can be made offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from deltakit.families import get_family
from deltakit.model import open_model

# Special-token ids at the top of the tiny vocabulary, named after Qwen's tokens
# (<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>);
# ids below 500 are free for a trained tokenizer.
VOCAB = 512
SPECIAL = {"endoftext": 500, "im_start": 501, "im_end": 502, "vision_start": 503, "vision_end": 504, "image": 505, "video": 506}

_ARCH = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "idefics2": "Idefics2ForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}
_TEXT_OF = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "llava": "llama", "llava_next": "mistral", "idefics2": "mistral", "idefics3": "llama"}


def text_config(model_type: str = "qwen2", hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 64, vocab: int = VOCAB, tie: bool = False) -> dict:
    """A small decoder config as a dict (``model_type`` included)."""
    return dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                tie_word_embeddings=tie, max_position_embeddings=512, bos_token_id=SPECIAL["endoftext"],
                eos_token_id=SPECIAL["im_end"], pad_token_id=SPECIAL["endoftext"])


def tiny_config(family: str, **text_kw) -> PretrainedConfig:
    """A transformers config of ``family`` with a tiny text tower (``text_kw`` go to :func:`text_config`)."""
    get_family(family)
    if family not in _TEXT_OF:
        return transformers.AutoConfig.for_model(**text_config(family, **text_kw))
    text = text_config(_TEXT_OF[family], **text_kw)
    hidden = text["hidden_size"]
    tie = text["tie_word_embeddings"]
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
        cls = transformers.Qwen2VLConfig if family == "qwen2_vl" else transformers.Qwen2_5_VLConfig
        return cls(text_config=text, vision_config=vision, image_token_id=SPECIAL["image"],
                   video_token_id=SPECIAL["video"], vision_start_token_id=SPECIAL["vision_start"],
                   vision_end_token_id=SPECIAL["vision_end"], tie_word_embeddings=tie)
    clip = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)
    if family == "llava":
        return transformers.LlavaConfig(text_config=text, vision_config=clip, image_token_index=SPECIAL["image"],
                                        tie_word_embeddings=tie)
    if family == "llava_next":
        return transformers.LlavaNextConfig(text_config=text, vision_config=clip, image_token_index=SPECIAL["image"],
                                            image_grid_pinpoints=[[28, 28], [28, 56]], tie_word_embeddings=tie)
    siglip = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    if family == "idefics2":
        perceiver = dict(hidden_size=hidden, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                         resampler_head_dim=8, num_key_value_heads=1)
        return transformers.Idefics2Config(text_config=text, vision_config=siglip, perceiver_config=perceiver,
                                           image_token_id=SPECIAL["image"], tie_word_embeddings=tie)
    return transformers.Idefics3Config(text_config=text, vision_config=siglip, image_token_id=SPECIAL["image"],
                                       scale_factor=2, tie_word_embeddings=tie)


def build_tiny(family: str, seed: int = 0, **text_kw) -> PreTrainedModel:
    """A randomly initialised tiny model of ``family`` (deterministic for a seed)."""
    torch.manual_seed(seed)
    return getattr(transformers, _ARCH[family])(tiny_config(family, **text_kw)).eval()


def save_tiny(family: str, path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_shard_size: str | int | None = None, **text_kw) -> Path:
    """Build a tiny model of ``family`` and ``save_pretrained`` it (sharded when ``max_shard_size`` is set)."""
    model = build_tiny(family, seed, **text_kw).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kw)
    return Path(path)


def save_partner_llm(mllm: str | os.PathLike, path: str | os.PathLike, noise: float = 0.1, seed: int = 1,
                     dtype: torch.dtype = torch.float32, max_shard_size: str | int | None = None) -> Path:
    """Save a text-only LLM whose weights are ``mllm``'s text tower plus ``noise``-scaled Gaussian noise.

    Each tensor ``W`` becomes ``W + noise * std(W) * N(0, 1)`` (norm weights, whose std is ~0, get
    ``noise * N(0, 1)``): ``noise`` sets how far apart the pair is, as close LLaVA-like pairs or far
    Qwen-VL-like pairs are in the paper.
    """
    src = open_model(mllm)
    cfg = src.ckpt.config
    text = dict(cfg.get("text_config") or cfg)
    text_type = _TEXT_OF.get(src.family.name, src.family.name)
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rms_norm_eps")
    kw = {k: text[k] for k in keep if k in text}
    kw["tie_word_embeddings"] = src.tied
    config = transformers.AutoConfig.for_model(text_type, **kw)
    model = getattr(transformers, _ARCH[text_type])(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        canonical = name[len("model."):] if name.startswith("model.") else name
        w = src.ckpt.get(src.resolve(canonical)).float()
        scale = w.std() if w.numel() > 1 and w.std() > 1e-6 else torch.tensor(1.0)
        state[name] = w + noise * scale * torch.randn(w.shape, generator=gen)
    model.load_state_dict(state, strict=False)
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.to(dtype).save_pretrained(path, **kw)
    return Path(path)
