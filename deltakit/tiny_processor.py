"""A tiny but complete processor for the tiny Qwen2-VL / Qwen2.5-VL models of :mod:`deltakit.tiny`, built offline.

It has every part a real Qwen2.5-VL processor has, so the whole data -> training -> evaluation path runs on
tiny models: a byte-level BPE tokenizer trained with the ``tokenizers`` library on a small built-in corpus
(ids below 500; the Qwen special tokens at exactly the ids of :data:`deltakit.tiny.SPECIAL`; ``<think>`` and
``</think>`` are ordinary text), the Qwen2-VL image processor with small pixel limits (a 56x56 image is 4x4
patches, i.e. 4 image tokens after the 2x2 merge), the Qwen2-VL video processor (transformers 5 builds one
with every Qwen2-VL processor) and a Qwen2-VL style chat template. :func:`save_tiny_processor` writes it so
``transformers.AutoProcessor.from_pretrained`` loads it with no network and no remote code.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from deltakit.families import get_family
from deltakit.tiny import SPECIAL, VOCAB

# Qwen's names for the special tokens of deltakit.tiny.SPECIAL, in id order (500..506).
SPECIAL_TOKENS = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image": "<|image_pad|>", "video": "<|video_pad|>",
}
# Pixel limits of the tiny image processor: at least 56x56 (4x4 patches of 14), at most 112x112 (8x8 patches).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-VL style: one "<|im_start|>role\n...<|im_end|>\n" block per message, a default system message,
# images and videos as "<|vision_start|><|image_pad|><|vision_end|>" (the processor expands the pad token
# to one token per merged patch), and "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = ("red blue green yellow purple orange black white circle circles square squares triangle triangles shape "
          "shapes digit digits number numbers image picture count counting how many there are is the a an of in on "
          "and or what which how much total sum left right top bottom answer question choice option first second "
          "third so we see I think therefore each one two three four five six seven eight nine ten plus minus times "
          "equals area angle length width height degrees value find compute read show shown figure table chart "
          "bar line point points graph larger smaller than most least system user assistant you helpful").split()
_SENTENCES = (
    "<think>{a} I count {n} {c} {s}. {b}</think> The answer is \\boxed{{{n}}}.",
    "How many {c} {s} are there in the image?",
    "What is the {w} of the {c} {s}? Answer with a number.",
    "<think>The digits read {n}{m}. So the number is {n}{m}.</think> \\boxed{{{n}{m}}}",
    "Choices: (A) {n} (B) {m} (C) {k} (D) {n}{m}. The correct option is ({L}).",
    "{n} + {m} = {k}. {n} x {m} = {p}. The total is {k}.",
    "Question: {a} Answer: {b}",
    "You are a helpful assistant. {a}",
)


def _corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic English-like lines about counting, reading digits and multiple choice, with ``<think>``."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = lambda k: " ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
        n, m = rng.randint(0, 9), rng.randint(0, 9)
        out.append(_SENTENCES[i % len(_SENTENCES)].format(
            a=words(rng.randint(3, 8)), b=words(rng.randint(3, 8)), n=n, m=m, k=n + m, p=n * m,
            c=rng.choice(_WORDS[:8]), s=rng.choice(_WORDS[8:16]), w=rng.choice(("area", "length", "angle", "value")),
            L=rng.choice("ABCD")))
    return out


# transformers' Qwen2Tokenizer replaces a tokenizer.json's pre-tokenizer with this split (digits one by one), so a
# tokenizer meant for a folder transformers loads as Qwen2Tokenizer (a Qwen2 LLM's) must be trained with it.
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                    r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=4)
def _trained_bpe(extra: tuple[str, ...] = (), qwen_split: bool = False) -> str:
    """The trained tokenizer as ``tokenizers`` JSON (trained once per process and corpus: it is deterministic);
    ``extra`` lines are trained on after the built-in corpus (the miniature family's language); ``qwen_split``
    pre-tokenizes as Qwen2's tokenizer does, so the tokenizer is the same however transformers loads it."""
    tok = Tokenizer(models.BPE())
    if qwen_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    first_special = min(SPECIAL.values())
    trainer = trainers.BpeTrainer(vocab_size=first_special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator([*_corpus(), *extra], trainer)
    if tok.get_vocab_size() != first_special:
        raise RuntimeError(f"tiny tokenizer learned {tok.get_vocab_size()} tokens, expected {first_special}")
    names = sorted(SPECIAL, key=SPECIAL.get)
    tok.add_special_tokens([SPECIAL_TOKENS[n] for n in names])
    if any(tok.token_to_id(SPECIAL_TOKENS[n]) != SPECIAL[n] for n in names) or tok.get_vocab_size() > VOCAB:
        raise RuntimeError("tiny tokenizer special tokens are not at deltakit.tiny.SPECIAL ids")
    return tok.to_str()


def build_tokenizer(extra: tuple[str, ...] = (), qwen_split: bool = False) -> transformers.PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer: 500 learned tokens (ids 0-499, also from ``extra`` lines), then the 7 Qwen
    special tokens; ``qwen_split``: pre-tokenized as Qwen2's tokenizer (see :data:`QWEN_PRETOKENIZE`)."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(tuple(extra), qwen_split)), eos_token=SPECIAL_TOKENS["im_end"],
        pad_token=SPECIAL_TOKENS["endoftext"], model_max_length=4096, padding_side="right",
        clean_up_tokenization_spaces=False)


PROCESSOR_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
"""The families whose tiny models take this processor (Qwen2-VL's image processor, 14-pixel patches merged 2 x 2)."""


def build_tiny_processor(family: str = "qwen2_5_vl", extra: tuple[str, ...] = (),
                         qwen_split: bool = False) -> transformers.ProcessorMixin:
    """The processor of a tiny ``qwen2_5_vl`` (default) or ``qwen2_vl`` model (its class the one transformers maps
    the family's ``model_type`` to); ``extra`` lines also train the tokenizer, ``qwen_split`` as in :func:`build_tokenizer`."""
    if family not in PROCESSOR_FAMILIES:
        raise ValueError(f"no tiny processor for family {family!r}; choose from {', '.join(PROCESSOR_FAMILIES)}")
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[get_family(family).model_types[0]])
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image = transformers.Qwen2VLImageProcessor(size=size)
    video = transformers.Qwen2VLVideoProcessor(size=size)
    return cls(image_processor=image, tokenizer=build_tokenizer(extra, qwen_split), video_processor=video,
               chat_template=CHAT_TEMPLATE)


def save_tiny_processor(path: str | os.PathLike, family: str = "qwen2_5_vl", extra: tuple[str, ...] = ()) -> Path:
    """Write the tiny processor's files into ``path`` (e.g. a folder made by :func:`deltakit.tiny.save_tiny`)."""
    build_tiny_processor(family, extra).save_pretrained(path)
    return Path(path)
