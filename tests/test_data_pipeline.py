"""The processed-once data pipeline: one-pass label spans against the three-pass reference, the on-disk cache against
the uncached tensors, the cutoff policy's counts, <think> and Qwen3's enable_thinking, the step order and length
grouping, packing against the padded batch on the tiny model, and whole runs (workers + cache vs today's pipeline,
resume with grouping and packing, TensorBoard curves read back with TensorBoard's own reader), and the cache's pixel
storage (bf16 pixels against what the vision tower sees from float32 ones; none: recomputed pixels against the processor's)."""

import copy
import functools
import json
import shutil
import os
import threading
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from deltakit.data import DataError, SFTDataset, _n_images, collate, load_examples, render
from deltakit.datacache import CachedDataset, build_workers, cache_key, cached_dataset, pixel_storage
from deltakit.errors import DeltakitError
from deltakit.tiny import SPECIAL
from deltakit.tiny_processor import save_tiny_processor
from deltakit.train import TrainConfig, finetune
from deltakit.train import loop as loop_module
from deltakit.train.loader import MicroBatchSampler, StepOrder, check_packable, pack, packed_inputs
from deltakit.train.loop import count_targets, token_loss_sum

PAD = SPECIAL["endoftext"]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    """The session's tiny Qwen2.5-VL, copied with the offline processor beside it."""
    path = tmp_path_factory.mktemp("vl") / "model"
    shutil.copytree(tiny_checkpoint("qwen2_5_vl"), path)
    return save_tiny_processor(path)


@pytest.fixture(scope="module")
def processor(model_dir):
    return transformers.AutoProcessor.from_pretrained(model_dir)


WORDS = "red blue green circle square count the answer is two three so we see".split()


def _answer(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return "<think>" + " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)) + "</think> \\boxed{2}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """14 records: one image (3 sizes), text only, two turns with two images (answers of 2-40 words), a long prompt,
    two text-only turns."""
    root = tmp_path_factory.mktemp("pipeline")
    sizes = [(56, 56), (112, 84), (84, 112)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (60 * i, 200, 30)).save(root / f"{i}.png")
    records = []
    for i in range(12):
        answer = _answer(2 + (i * 7) % 39, i)
        if i % 4 == 3:
            records.append({"messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": answer}]})
        elif i % 4 == 2:
            records.append({"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "<image>How many?"}, {"role": "assistant", "content": answer},
                                         {"role": "user", "content": "And here?<image>"}, {"role": "assistant", "content": "two"}],
                            "images": [f"{i % 3}.png", f"{(i + 1) % 3}.png"]})
        else:
            records.append({"messages": [{"role": "user", "content": "<image>How many?"}, {"role": "assistant", "content": answer}],
                            "images": [f"{i % 3}.png"]})
    records.append({"messages": [{"role": "user", "content": "How many? " + " ".join(WORDS * 4)}, {"role": "assistant", "content": "two"}]})
    records.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "two"},
                                 {"role": "user", "content": "And? " + " ".join(WORDS * 3)}, {"role": "assistant", "content": "three"}]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def three_pass_labels(processor, ex):
    """Today's reference: the processor run on the whole conversation and on each assistant turn's two prefixes."""
    images = [Image.open(p).convert("RGB") for p in ex.images]

    def encode(text, imgs):
        return processor(text=[text], return_tensors="pt", **({"images": imgs} if imgs else {}))["input_ids"][0]

    ids = encode(render(processor, ex.messages, False), images)
    labels = torch.full_like(ids, -100)
    for turn, msg in enumerate(ex.messages):
        if msg["role"] == "assistant":
            start = encode(render(processor, ex.messages[:turn], True), images[:_n_images(ex.messages[:turn])])
            end = encode(render(processor, ex.messages[:turn + 1], False).rstrip(), images[:_n_images(ex.messages[:turn + 1])])
            assert torch.equal(ids[:len(end)], end) and torch.equal(end[:len(start)], start)
            labels[len(start):len(end)] = ids[len(start):len(end)]
    return ids, labels


def test_one_pass_spans_equal_the_three_pass_reference(data, processor, monkeypatch):
    examples = load_examples(data)
    ds = SFTDataset(examples, processor)
    calls = []
    encode = ds._encode
    monkeypatch.setattr(ds, "_encode", lambda text, images: calls.append(1) or encode(text, images))
    for i, ex in enumerate(examples):
        ids, labels = three_pass_labels(processor, ex)
        item = ds[i]
        assert torch.equal(item["input_ids"], ids) and torch.equal(item["labels"], labels), ex.where
    assert len(calls) == len(examples)  # the processor ran once per example
    # the general path (for processors that expand images otherwise) gives the same spans
    ex = examples[2]
    item = ds[2]
    spans = ds._encoded_spans(item["input_ids"], ex, [Image.open(p).convert("RGB") for p in ex.images])
    assert [(a, b) for a, b in spans] == [(a, b) for a, b in _runs(item["labels"] != -100)]


def _runs(mask):
    out, start = [], None
    for i, m in enumerate(mask.tolist() + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            out.append((start, i))
            start = None
    return out


def assert_same_items(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_cache_gives_exactly_the_uncached_tensors_once(data, processor, tmp_path, monkeypatch):
    examples = load_examples(data)
    ds = SFTDataset(examples, processor)
    reference = [ds[i] for i in range(len(examples))]
    cached = cached_dataset(data, processor, cache_dir=tmp_path, workers=2)  # built by 2 DataLoader workers
    assert isinstance(cached, CachedDataset) and len(cached) == len(examples)
    assert cached.lengths == [len(reference[i]["input_ids"]) for i in range(len(examples))]
    for i in range(len(examples)):
        assert_same_items(cached[i], reference[i])
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= cached[0].keys() and "pixel_values" not in cached[3]
    with safe_open(cached.folder / "shard-00000.safetensors") as f:  # plain safetensors, ids stored as int32
        assert f.get_tensor("input_ids.data").dtype == torch.int32 and f.get_tensor("pixel_values.data").dtype == torch.float32
    # a second open reads the entry without running the processor; a pickled copy (a worker's) reads the same
    monkeypatch.setattr(SFTDataset, "encode", lambda self, i: pytest.fail("processor ran on a cache hit"))
    again = cached_dataset(data, processor, cache_dir=tmp_path)
    assert again.folder == cached.folder
    import pickle
    assert_same_items(pickle.loads(pickle.dumps(again))[5], reference[5])
    # the key follows the data, the cutoff and the template arguments; the data file's path does not matter
    key = cache_key(data, examples, processor, None, "truncate", {})[0]
    assert key != cache_key(data, examples, processor, 64, "truncate", {})[0]
    assert key != cache_key(data, examples, processor, None, "truncate", {"enable_thinking": False})[0]
    moved = tmp_path / "moved.jsonl"
    shutil.copy(data, moved)
    assert cache_key(moved, examples, processor, None, "truncate", {})[0] == key
    moved.write_text(data.read_text().replace("How many?", "How many? "))
    assert cache_key(moved, examples, processor, None, "truncate", {})[0] != key


def safe_open(path):
    from safetensors import safe_open as open_

    return open_(str(path), framework="pt")


def test_concurrent_builders_build_once(data, processor, tmp_path, monkeypatch):
    encodes = []
    encode = SFTDataset.encode
    monkeypatch.setattr(SFTDataset, "encode", lambda self, i: encodes.append(i) or encode(self, i))
    out = [None, None]

    def build(slot):
        out[slot] = cached_dataset(data, processor, cache_dir=tmp_path)

    threads = [threading.Thread(target=build, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(encodes) == list(range(14)) and out[0].folder == out[1].folder
    assert [p.name for p in (tmp_path / "sft").iterdir() if not p.name.endswith(".lock")] == [out[0].folder.name]


def test_cutoff_policy_counts(data, processor, tmp_path):
    examples = load_examples(data)
    full = [SFTDataset(examples, processor)[i] for i in range(len(examples))]
    cutoff = 60
    # By hand from the full examples: an example fits, or its answer is cut at the cutoff (the cut inside an
    # answer), or it loses whole later turns (the cut after an answer's end, before an image-free tail), or it is
    # dropped (no whole answer before the cutoff and the cut not inside one; or an image after the cut).
    expected = {"kept": 0, "truncated": 0, "dropped_long": 0, "dropped_prompt": 0, "dropped_image": 0}
    tokens_cut = targets_cut = 0
    kept_items = []
    for item in full:
        n, spans = len(item["input_ids"]), _runs(item["labels"] != -100)
        targets = int((item["labels"] != -100).sum())
        if n <= cutoff:
            expected["kept"] += 1
            kept_items.append(item)
            continue
        cut = cutoff if any(a < cutoff < b for a, b in spans) else max([b for a, b in spans if b <= cutoff], default=0)
        if cut == 0:
            expected["dropped_prompt"] += 1
        elif (item["input_ids"][cut:] == SPECIAL["image"]).any():
            expected["dropped_image"] += 1
        else:
            expected["truncated"] += 1
            kept_items.append({k: v[:cut] if k in ("input_ids", "labels", "mm_token_type_ids") else v for k, v in item.items()})
            tokens_cut += n - cut
            targets_cut += targets - int((item["labels"][:cut] != -100).sum())
            continue
        tokens_cut += n
        targets_cut += targets
    assert min(expected[k] for k in ("kept", "truncated", "dropped_prompt", "dropped_image")) > 0, expected
    cached = cached_dataset(data, processor, cache_dir=tmp_path, max_length=cutoff)
    assert cached.stats["counts"] == expected
    assert (cached.stats["tokens_cut"], cached.stats["targets_cut"]) == (tokens_cut, targets_cut)
    assert len(cached) == len(kept_items) and all(len(cached[i]["input_ids"]) <= cutoff for i in range(len(cached)))
    for i, item in enumerate(kept_items):
        assert_same_items(cached[i], item)
    dropped = cached_dataset(data, processor, cache_dir=tmp_path, max_length=cutoff, cutoff_policy="drop")
    longer = sum(len(it["input_ids"]) > cutoff for it in full)
    assert dropped.stats["counts"] == {**dict.fromkeys(expected, 0), "kept": len(full) - longer, "dropped_long": longer}
    assert dropped.stats["dropped"][0].startswith(f"{data}:") and "longer than the cutoff 60" in dropped.stats["dropped"][0]


# Qwen3's handling of reasoning, reduced to what matters here: the final assistant turn's content is split at
# </think> into reasoning and answer and rendered "<think>\n{reasoning}\n</think>\n\n{answer}"; with
# enable_thinking false the generation prompt ends in an empty think block, so the answer alone is trained.
QWEN3_STYLE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}"
    "{% set c = m['content'] %}{% set r = '' %}"
    "{% if '</think>' in c %}{% set r = c.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<think>\\n' + r + '\\n</think>\\n\\n' + c }}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)


def test_think_tags_and_enable_thinking(processor, tmp_path):
    qwen3 = copy.copy(processor)
    qwen3.chat_template = QWEN3_STYLE
    tok = processor.tokenizer

    def trained(answer, **kw):
        ex = load_examples(_jsonl(tmp_path, [{"messages": [{"role": "user", "content": "Two?"}, {"role": "assistant", "content": answer}]}]))
        item = SFTDataset(ex, qwen3, template_kwargs=kw)[0]
        return [tok.decode(item["input_ids"][a:b]) for a, b in _runs(item["labels"] != -100)]

    # the template's own layout of the reasoning is what is trained (here: newlines around it normalised)
    assert trained("<think>one plus one</think>\n\ntwo") == ["<think>\none plus one\n</think>\n\ntwo<|im_end|>"]
    assert trained("two", enable_thinking=False) == ["two<|im_end|>"]  # the empty think block is prompt, not trained
    assert trained("two") == ["<think>\n\n</think>\n\ntwo<|im_end|>"]  # thinking on, no reasoning in the data
    with pytest.raises(DataError, match="enable_thinking is off"):
        trained("<think>one plus one</think> two", enable_thinking=False)
    # the same bad record met by a cache build's worker process: one error line naming the record, no entry left
    with pytest.raises(DataError) as err:
        cached_dataset(tmp_path / "r.jsonl", qwen3, template_kwargs={"enable_thinking": False}, cache_dir=tmp_path / "c", workers=1)
    assert str(err.value).startswith(f"{tmp_path / 'r.jsonl'}:1: ") and "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "c" / "sft").iterdir() if not p.name.endswith(".lock")]
    # Qwen2.5-VL's template keeps <think> as ordinary text, trained with the answer
    ex = load_examples(_jsonl(tmp_path, [{"messages": [{"role": "user", "content": "Two?"}, {"role": "assistant", "content": "<think>a</think> b"}]}]))
    item = SFTDataset(ex, processor)[0]
    assert [tok.decode(item["input_ids"][a:b]) for a, b in _runs(item["labels"] != -100)] == ["<think>a</think> b<|im_end|>"]


def _jsonl(folder, records):
    path = folder / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_step_order_grouping_and_split_invariance():
    n, g, per_epoch, seed = 203, 8, 25, 3
    plain = StepOrder(n, g, per_epoch, seed)
    for epoch in (0, 1):  # today's order: one permutation per epoch, seeded by seed + epoch, cut into global batches
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert [plain.step(epoch * per_epoch + s) for s in range(per_epoch)] == [perm[s * g:(s + 1) * g] for s in range(per_epoch)]
    # a long-tailed length distribution (log-normal, like chain-of-thought answers)
    lengths = [int(x) for x in torch.exp(6.0 + 0.8 * torch.randn(n, generator=torch.Generator().manual_seed(1)))]
    grouped = StepOrder(n, g, per_epoch, seed, lengths)
    again = StepOrder(n, g, per_epoch, seed, lengths)
    steps = [grouped.step(s) for s in range(per_epoch)]
    assert steps == [again.step(s) for s in range(per_epoch)]  # deterministic
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    assert sorted(i for s in steps for i in s) == sorted(perm[:per_epoch * g])  # the same examples as without grouping
    assert all([lengths[i] for i in s] == sorted((lengths[i] for i in s), reverse=True) for s in steps)

    def padding(order, micro):
        return sum(len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb)
                   for s in range(per_epoch) for mb in (order.step(s)[k:k + micro] for k in range(0, g, micro)))

    assert padding(grouped, 2) < 0.2 * padding(plain, 2)
    # the micro-batches of every split cover each step's examples exactly
    for world, batch, accum in ((1, 8, 1), (2, 2, 2), (4, 1, 2), (8, 1, 1)):
        got = [[i for r in range(world) for mb in MicroBatchSampler(grouped, s, s + 1, r, batch, accum) for i in mb]
               for s in range(per_epoch)]
        assert got == steps, (world, batch, accum)
    resumed = list(MicroBatchSampler(grouped, 7, 12, 0, 4, 2))
    assert resumed == [mb for s in range(7, 12) for mb in (steps[s][:4], steps[s][4:])]


def test_packing_gives_the_padded_loss(data, processor, tiny_checkpoint):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint("qwen2_5_vl"), dtype=torch.float32)
    ds = SFTDataset(load_examples(data), processor)
    items = [ds[i] for i in (0, 3, 2, 5)]  # one image, text only, two turns with two images, one image
    padded, packed = collate(items, PAD), pack(items, PAD)
    assert packed["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items)) and "attention_mask" not in packed
    assert int(count_targets(packed)) == int(count_targets(padded))
    inputs = packed_inputs(model)(packed)
    # positions: text positions restart at 0 per example; the 3 rotary rows are the example's own (image rows 2-D)
    pos = inputs["position_ids"]
    starts = [0, *torch.tensor([len(it["input_ids"]) for it in items]).cumsum(0)[:-1].tolist()]
    assert pos.shape == (4, 1, packed["input_ids"].shape[1]) and (pos[0, 0, starts] == 0).all()
    for start, item in zip(starts, items):
        alone, _ = model.model.get_rope_index(item["input_ids"][None], item["mm_token_type_ids"][None], item.get("image_grid_thw"))
        assert torch.equal(pos[1:, :, start:start + len(item["input_ids"])], alone)
    with torch.no_grad():
        want = token_loss_sum(model, padded)
        got = token_loss_sum(model, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # without the restarted positions (one long sequence) the examples would see each other: a different loss
    with torch.no_grad():
        mixed = token_loss_sum(model, {k: v for k, v in packed.items() if not k.startswith("seq_")})
    assert abs(float(mixed) - float(want)) > 1e-2
    llava = type("M", (torch.nn.Module,), {})()
    llava.config = transformers.PretrainedConfig()
    llava.config.model_type = "llava"
    with pytest.raises(DeltakitError, match="packing is not supported for model type 'llava'"):
        check_packable(llava)


def _weights(folder):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_runs_with_workers_and_cache_grouping_packing_resume_and_curves(model_dir, data, processor, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = dict(model=str(model_dir), data=str(data), lr=1e-3, warmup_ratio=0.0, max_steps=4, batch_size=2, grad_accum=2,
                adam_eps=1e-4, precision="fp32", cache_dir=str(tmp_path / "cache"))
    # workers + cache against today's pipeline (the examples in memory, processed by SFTDataset, collated in-process)
    cached = finetune(TrainConfig(**base, out=str(tmp_path / "cached"), num_workers=2))
    examples = SFTDataset(load_examples(data), processor)
    with monkeypatch.context() as m:
        m.setattr(loop_module, "load_data", lambda config: ([examples[i] for i in range(len(examples))],
                                                            functools.partial(collate, pad_id=PAD), None))
        today = finetune(TrainConfig(**base, out=str(tmp_path / "today")))
    assert cached.data["workers"] == 2 and today.data["workers"] == 0 and cached.data["counts"]["kept"] == 14
    a, b = _weights(tmp_path / "cached"), _weights(tmp_path / "today")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # curves: TensorBoard's reader finds every logged value of the run in OUT/runs, and the PNG is written
    acc = EventAccumulator(str(tmp_path / "cached" / "runs"))
    acc.Reload()
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"), ("tokens_per_s", "train/tokens_per_s")):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in cached.history]
    assert Image.open(tmp_path / "cached" / "train_curves.png").size[0] > 500
    assert sum(r["padding"] for r in today.history) > 0 and all(r["input_tokens"] > 0 for r in today.history)
    # grouping + packing: no padding; resumed from the step-2 checkpoint (its run folder copied, as if the run had
    # been killed after it), the run ends with the uninterrupted weights
    packed = dict(base, group_by_length=True, packing=True, num_workers=1, save_every=2)
    whole = finetune(TrainConfig(**packed, out=str(tmp_path / "whole")))
    assert all(r["padding"] == 0 for r in whole.history)
    shutil.copytree(tmp_path / "whole.run", tmp_path / "again.run")
    assert [p.name for p in (tmp_path / "again.run" / "checkpoints").iterdir()] == ["step-0000002"]
    resumed = finetune(TrainConfig(**packed, out=str(tmp_path / "again"), resume=True))
    assert resumed.resumed_from == 2
    w, r = _weights(tmp_path / "whole"), _weights(tmp_path / "again")
    assert all(torch.equal(w[n], r[n]) for n in w)
    acc = EventAccumulator(str(tmp_path / "again.run"))  # the live event file: steps 1-2 kept, 3-4 of the resumed run
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == [pytest.approx(x["loss"], rel=1e-6) for x in whole.history]


def test_older_checkpoint_fingerprints_still_resume():
    from deltakit.train.loop import _fingerprint, fingerprint_mismatch
    from deltakit.train.setup import Plan

    config = TrainConfig(model="m", data="d", out="o", cutoff_len=4096)
    plan = Plan.make(8, config, 1)
    now = _fingerprint(config, plan)
    # written before cutoff_len (then max_length) and the data-pipeline fields existed
    old = {k: v for k, v in now.items() if k not in ("cutoff_len", "cutoff_policy", "enable_thinking", "group_by_length", "packing")}
    assert fingerprint_mismatch(now, {**old, "max_length": 4096}, plan) is None
    assert fingerprint_mismatch(now, {**old, "max_length": 2048}, plan) == "cutoff_len is 4096 but the checkpoint was made with 2048"
    grouped = _fingerprint(TrainConfig(model="m", data="d", out="o", cutoff_len=4096, group_by_length=True), plan)
    assert fingerprint_mismatch(grouped, {**old, "max_length": 4096}, plan) == "group_by_length is True but the checkpoint was made with False"


def test_unusable_cache_folder_is_one_error_line(data, processor, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DeltakitError) as err:
        cached_dataset(data, processor, cache_dir=blocker)
    assert str(err.value).startswith(f"{blocker / 'sft'}: cannot use this data cache folder") and "\n" not in str(err.value)


def _pixel_bytes(folder):
    with safe_open(folder / "shard-00000.safetensors") as f:
        return {k: f.get_slice(k).get_shape()[0] * (2 if f.get_slice(k).get_dtype() == "BF16" else 4)
                for k in f.keys() if k == "pixel_values.data"}


def test_bf16_pixels_are_exactly_what_a_bf16_run_sees(model_dir, data, processor, tmp_path):
    reference = SFTDataset(load_examples(data), processor)
    stored = cached_dataset(data, processor, cache_dir=tmp_path, pixels="bfloat16")
    want, got = reference[2], stored[2]  # two images
    assert got["pixel_values"].dtype == torch.bfloat16 and torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert torch.equal(got["pixel_values"], want["pixel_values"].to(torch.bfloat16))
    assert (got["pixel_values"].float() != want["pixel_values"]).float().mean() > 0.5  # most pixels are not bf16 values
    full = cached_dataset(data, processor, cache_dir=tmp_path)
    assert full.folder != stored.folder and _pixel_bytes(stored.folder)["pixel_values.data"] * 2 == _pixel_bytes(full.folder)["pixel_values.data"]
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    embedded = []
    model.model.visual.patch_embed.register_forward_hook(lambda module, args, out: embedded.append(out))

    def tower(pixels, bf16):  # the model's own entry point for pixels: casts them to the tower's dtype, then the tower
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return torch.cat(model.model.get_image_features(pixels, want["image_grid_thw"]).pooler_output)

    # a bf16 run (float32 master weights under autocast): the patch embedding's output and the tower's, bit for bit
    a, b = tower(want["pixel_values"], True), tower(got["pixel_values"], True)
    assert embedded[0].dtype == torch.bfloat16 and torch.equal(embedded[0], embedded[1]) and torch.equal(a, b)
    # an fp32 run sees the float32 pixels: bf16 ones would change its input, so auto keeps float32 there
    assert not torch.equal(tower(want["pixel_values"], False), tower(got["pixel_values"], False))
    # the tower's weights in bf16 (FSDP2 mixed precision): get_image_features casts to bf16, the same again
    model.model.visual.to(torch.bfloat16)
    assert torch.equal(tower(want["pixel_values"], False), tower(got["pixel_values"], False))
    assert pixel_storage("auto", torch.bfloat16, "qwen2_5_vl") == pixel_storage("auto", torch.bfloat16, "qwen2_vl") == "bfloat16"
    assert pixel_storage("auto", torch.float32, "qwen2_5_vl") == pixel_storage("auto", torch.bfloat16, "llava") == "float32"
    assert pixel_storage("none", torch.float32, None) == "none"
    with pytest.raises(DeltakitError, match="cache pixels must be one of auto, float32, bfloat16, none, not 'fp8'"):
        pixel_storage("fp8", torch.float32, None)


def test_no_pixels_cache_recomputes_them_exactly_in_workers(data, processor, tmp_path):
    import os

    root = tmp_path / "d"
    shutil.copytree(data.parent, root)
    reference = SFTDataset(load_examples(root / "train.jsonl"), processor)
    cached = cached_dataset(root / "train.jsonl", processor, cache_dir=tmp_path / "c", pixels="none")
    assert cached.pixels == "none" and _pixel_bytes(cached.folder) == {}
    # read in a DataLoader worker (the image processor travels with the pickled dataset): the processor's tensors
    items = list(torch.utils.data.DataLoader(cached, batch_size=None, num_workers=1, collate_fn=dict))
    for i, item in enumerate(items):
        assert_same_items(item, reference[i])
    assert "pixel_values" in items[2] and "pixel_values" not in items[3]
    assert cache_key(data, reference.examples, processor, None, "truncate", {}, "none")[0] != \
        cache_key(data, reference.examples, processor, None, "truncate", {})[0]
    with pytest.raises(DeltakitError, match="stores no pixel values; open it with the processor's image processor"):
        CachedDataset(cached.folder)
    st = os.stat(root / "0.png")
    os.utime(root / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DeltakitError) as err:
        cached[0]
    assert str(err.value) == f"{(root / '0.png').resolve()}: image changed since the data cache {cached.folder} was built " \
                             "without pixel values; run again to rebuild it"


def test_bf16_run_with_auto_pixels_trains_the_float32_pixels_weights(model_dir, data, tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "plot_curves", lambda records, path, **k: path.write_bytes(b""))  # tested above
    base = dict(model=str(model_dir), data=str(data), lr=1e-3, warmup_ratio=0.0, max_steps=1, batch_size=4, adam_eps=1e-4,
                precision="bf16", num_workers=0, cache_dir=str(tmp_path / "cache"))
    auto = finetune(TrainConfig(**base, out=str(tmp_path / "auto")))
    full = finetune(TrainConfig(**base, out=str(tmp_path / "full"), cache_pixels="float32"))
    assert auto.data["cache_pixels"] == "bfloat16" and full.data["cache_pixels"] == "float32"
    assert json.loads((Path(auto.data["cache"]) / "index.json").read_text())["key"]["pixels"] == "bfloat16"
    a, b = _weights(tmp_path / "auto"), _weights(tmp_path / "full")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lm_head.weight"], _weights(model_dir)["lm_head.weight"])
    with pytest.raises(DeltakitError, match="cache_pixels must be one of auto, float32, bfloat16, none, not 'fp16'"):
        TrainConfig(**base, out="o", cache_pixels="fp16").validated()


def test_a_daemonic_process_loads_in_process(monkeypatch):
    """A daemonic process (a pool worker) may not start children: the default is then 0 workers, an explicit
    count is one error line instead of multiprocessing's assertion deep in the DataLoader."""
    import multiprocessing

    from deltakit.errors import DeltakitError
    from deltakit.train import loader

    lazy = _Lazy([{"input_ids": torch.ones(3, dtype=torch.long)}] * 4)
    monkeypatch.setattr(multiprocessing.current_process(), "_config", {**multiprocessing.current_process()._config, "daemon": True})
    assert loader.in_daemon()
    assert loader.default_workers(lazy, world_size=1) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))  # a machine where a build would use 7
    assert build_workers() == 0
    with pytest.raises(DeltakitError, match="daemonic"):
        loader.make_loader(lazy, [[0, 1]], lambda b: b, workers=1, pin_memory=False)


class _Lazy:
    """A dataset that is not a list: one whose items the loader workers would compute."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
