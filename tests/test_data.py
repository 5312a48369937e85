"""Data pipeline on the real tiny processor: formats, assistant-only labels, image tokens, collate, errors, demo data,
and one end-to-end fine-tuning run through it."""

import json
import math

import pytest
import torch
import transformers
from PIL import Image

from deltakit.data import DataError, SFTDataset, collate, load_examples
from deltakit.demo.samples import write_demo_data
from deltakit.evaluate import evaluate, load_bench
from deltakit.tiny import SPECIAL, VOCAB, save_tiny
from deltakit.tiny_processor import save_tiny_processor

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2.5-VL with the offline processor saved beside it."""
    path = save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("tiny-vl-proc"))
    save_tiny_processor(path)
    return path


@pytest.fixture(scope="module")
def processor(tiny):
    return transformers.AutoProcessor.from_pretrained(tiny)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images: 56x56 (4x4 patches of 14 -> 4 merged tokens) and 112x84 (8x6 patches -> 12 tokens)."""
    root = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (56, 56), (250, 0, 0)).save(root / "red.png")
    Image.new("RGB", (112, 84), (0, 0, 250)).save(root / "blue.png")
    return root


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


ANSWER1 = "<think>I see 2 red circles and 1 blue square.</think> The answer is \\boxed{2}."
ANSWER2 = "<think>Blue.</think> \\boxed{blue}"


def sharegpt_record():
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "<image>How many red shapes?"},
                         {"role": "assistant", "content": ANSWER1},
                         {"role": "user", "content": "And this one?<image>"},
                         {"role": "assistant", "content": ANSWER2}],
            "images": ["red.png", "blue.png"]}


def test_tiny_processor_tokens(processor):
    tok = processor.tokenizer
    names = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
             "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image": "<|image_pad|>",
             "video": "<|video_pad|>"}
    assert {k: tok.convert_tokens_to_ids(v) for k, v in names.items()} == SPECIAL
    assert len(tok) == 507 <= VOCAB
    ids = tok("<think>x</think> 12")["input_ids"]
    assert max(ids) < 500  # <think> is text, not a special token
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think> 12"
    assert (processor.image_token_id, processor.video_token_id) == (SPECIAL["image"], SPECIAL["video"])
    assert tok.pad_token_id == SPECIAL["endoftext"] and tok.eos_token_id == SPECIAL["im_end"]


@pytest.mark.parametrize("size", [(56, 56), (112, 84), (70, 40)])
def test_image_tokens_match_the_model(tiny, processor, size):
    # Reference: Qwen2-VL resizes each side to a multiple of 28 (within the pixel limits) and merges 2x2 patches.
    w, h = size
    rw, rh = max(28, round(w / 28) * 28), max(28, round(h / 28) * 28)
    if rw * rh < 56 * 56:
        scale = math.sqrt(56 * 56 / (w * h))
        rw, rh = math.ceil(w * scale / 28) * 28, math.ceil(h * scale / 28) * 28
    expected = (rw // 14) * (rh // 14) // 4
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                         tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.new("RGB", size, "white")], return_tensors="pt")
    assert int((enc["input_ids"] == SPECIAL["image"]).sum()) == expected
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], VOCAB) and torch.isfinite(logits).all()


def test_qwen2_vl_processor_fits_its_model(tmp_path):
    path = save_tiny_processor(save_tiny("qwen2_vl", tmp_path / "q2vl"), family="qwen2_vl")
    processor = transformers.AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                         tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.new("RGB", (112, 56), "white")], return_tensors="pt")
    assert int((enc["input_ids"] == SPECIAL["image"]).sum()) == 8 * 4 // 4
    with torch.no_grad():
        logits = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path)(**enc).logits
    assert torch.isfinite(logits).all()


def trained_spans(item, tok):
    """Decoded text of each maximal run of trained (label != -100) positions."""
    mask = (item["labels"] != -100).tolist()
    spans, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append(tok.decode(item["input_ids"][start:i]))
            start = None
    return spans


def test_only_assistant_tokens_are_trained(images, processor):
    path = write_jsonl(images / "sg.jsonl", [sharegpt_record()])
    item = SFTDataset(load_examples(path), processor)[0]
    ids, labels = item["input_ids"], item["labels"]
    trained = labels != -100
    assert torch.equal(labels[trained], ids[trained])
    assert trained_spans(item, processor.tokenizer) == [ANSWER1 + IM_END, ANSWER2 + IM_END]
    # nothing of the prompt, system, images or template framing is trained
    assert not trained[ids == SPECIAL["image"]].any() and not trained[ids == SPECIAL["im_start"]].any()
    assert int((ids == SPECIAL["image"]).sum()) == 4 + 12
    assert int(item["image_grid_thw"].prod(-1).sum()) == item["pixel_values"].shape[0] == 4 * 4 + 8 * 6
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.count(IM_END) == 5
    # the untrained part decodes to exactly the prompt turns plus the assistant headers
    untrained = processor.tokenizer.decode(ids[~trained])
    assert ANSWER1 not in untrained and "Be brief." in untrained and untrained.count("<|im_start|>assistant\n") == 2


def test_both_formats_give_identical_tensors(images, processor):
    sg = sharegpt_record()
    conversations = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "<image>How many red shapes?"}, {"from": "gpt", "value": ANSWER1},
        {"from": "human", "value": "And this one?<image>"}, {"from": "gpt", "value": ANSWER2}],
        "images": ["red.png", "blue.png"]}
    typed = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "How many red shapes?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER1}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "path": str(images / "blue.png")}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER2}]}]}
    typed_listed = json.loads(json.dumps(typed))
    typed_listed["messages"][1]["content"][0] = {"type": "image"}
    typed_listed["messages"][3]["content"][1] = {"type": "image", "url": "file://blue.png"}
    typed_listed["images"] = ["red.png"]
    path = write_jsonl(images / "formats.jsonl", [sg, conversations, typed, typed_listed])
    ds = SFTDataset(load_examples(path), processor)
    items = [ds[i] for i in range(len(ds))]
    for other in items[1:]:
        assert other.keys() == items[0].keys()
        for key in items[0]:
            assert torch.equal(other[key], items[0][key]), key


def test_collate_pads_right_and_concatenates_images(images, processor):
    path = write_jsonl(images / "mix.jsonl", [
        {"messages": [{"role": "user", "content": "<image>Red?"}, {"role": "assistant", "content": "yes"}], "images": ["red.png"]},
        {"messages": [{"role": "user", "content": "Just text, a longer question here."}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "<image>Blue?"}, {"role": "assistant", "content": "yes"}], "images": ["blue.png"]}])
    ds = SFTDataset(load_examples(path), processor)
    items = [ds[i] for i in range(3)]
    batch = collate(items, pad_id=SPECIAL["endoftext"])
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for row, (it, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], it["input_ids"])
        assert torch.equal(batch["labels"][row, :n], it["labels"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == SPECIAL["endoftext"]).all() and (batch["labels"][row, n:] == -100).all()
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == SPECIAL["image"])


def test_truncation(images, processor):
    path = write_jsonl(images / "long.jsonl", [sharegpt_record()])
    examples = load_examples(path)
    full = SFTDataset(examples, processor)[0]
    cut = len(full["input_ids"]) - 5  # inside the last answer
    item = SFTDataset(examples, processor, max_length=cut)[0]
    assert len(item["input_ids"]) == len(item["labels"]) == len(item["mm_token_type_ids"]) == cut
    assert torch.equal(item["input_ids"], full["input_ids"][:cut]) and torch.equal(item["labels"], full["labels"][:cut])
    assert torch.equal(item["pixel_values"], full["pixel_values"])
    last_image = max(i for i, t in enumerate(full["input_ids"].tolist()) if t == SPECIAL["image"])
    with pytest.raises(DataError, match=r"long\.jsonl:1: .* would cut an image"):
        SFTDataset(examples, processor, max_length=last_image)[0]


BAD = [
    ('{"messages": [', "not valid JSON"),
    ({"images": []}, "no 'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], "images": ["nope.png"]},
     "image not found"),
    ({"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["red.png"]}, "2 image placeholders but 1 paths"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "images": ["red.png"]},
     "0 image placeholders but 1 paths"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}]},
                   {"role": "assistant", "content": "y"}]}, "remote image"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "y"}]}, "neither"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[m for _, m in BAD])
def test_bad_records_name_file_and_line(images, record, message):
    good = sharegpt_record()
    path = write_jsonl(images / "bad.jsonl", [good, "", record])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_demo_data(tmp_path, processor):
    demo = write_demo_data(tmp_path / "a", n=10, seed=3, n_bench=5)
    again = write_demo_data(tmp_path / "b", n=10, seed=3, n_bench=5)
    assert demo.train.read_text() == again.train.read_text() and demo.bench.read_text() == again.bench.read_text()
    assert (demo.images / "train-00004.png").read_bytes() == (again.images / "train-00004.png").read_bytes()
    examples = load_examples(demo.train)
    bench = load_bench(demo.bench)
    assert len(examples) == 10 and len(bench) == 5
    assert [b.answer_type for b in bench] == ["integer", "integer", "float", "text", "multi_choice"]
    item = SFTDataset(examples, processor)[1]
    [span] = trained_spans(item, processor.tokenizer)
    assert span.startswith("<think>The digits from left to right are ") and span.endswith("</think> The answer is \\boxed{"
                                                                                           + span.split("{")[-1])
    number = span.split("So the number is ")[1].split(".")[0]
    assert span.endswith(f"\\boxed{{{number}}}.{IM_END}")


def test_finetune_end_to_end_on_real_processor(tiny, tmp_path):
    from deltakit.train import TrainConfig, finetune

    demo = write_demo_data(tmp_path / "demo", n=4, seed=0)
    out = tmp_path / "out"
    result = finetune(TrainConfig(model=str(tiny), data=str(demo.train), out=str(out), max_steps=2, batch_size=2, lr=1e-3))
    assert result.steps == 2 and math.isfinite(result.final_loss) and result.final_loss > 0
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    processor = transformers.AutoProcessor.from_pretrained(out)
    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    batch = collate([SFTDataset(load_examples(demo.train), processor)[0]], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.isfinite(logits).all()
    report = evaluate(out, demo.bench, batch_size=4, max_new_tokens=3, limit=4)
    assert report.examples == len(report.predictions) == 4


def test_finetune_on_a_model_without_processor_files(tmp_path, capsys):
    from deltakit.cli import main

    bare = save_tiny("qwen2_5_vl", tmp_path / "bare")
    demo = write_demo_data(tmp_path / "demo", n=4, seed=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(bare), "--data", str(demo.train), "--out", str(tmp_path / "out"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "cannot load its processor" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
