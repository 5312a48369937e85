"""The miniature world: the task generator checked by a solver written here, and the family builder at a tiny size."""

import json
import re

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from deltakit.demo import family as fam
from deltakit.demo.settings import FamilyRecipe
from deltakit.demo.task import write_task_data
from deltakit.evaluate import load_bench

# A recipe small enough to build in seconds (the real one is in deltakit.demo.settings).
TINY = FamilyRecipe(hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, vision_hidden=16, vision_heads=2,
                    batch=4, base_batch=4, align_steps=2, base_steps=3, reasoner_steps=3, close_steps=3, far_steps=4, n_check=4, max_new_tokens=4)


def solve(query: str, digits: list[int]) -> tuple[int, list[tuple[int, str, int, int]]]:
    """An independent solver: the operations read from the question's words, applied left to right mod 10."""
    words = re.fullmatch(r"first (\w+) second, then (\w+) third, then (\w+) fourth\.", query)
    assert words, query
    table = {"plus": lambda a, b: (a + b) % 10, "minus": lambda a, b: (a - b) % 10, "times": lambda a, b: a * b % 10}
    value, steps = digits[0], []
    for op, d in zip(words.groups(), digits[1:]):
        new = table[op](value, d)
        steps.append((value, op, d, new))
        value = new
    return value, steps


def check_cot(answer: str, digits: list[int], query: str) -> None:
    """The chain of thought lists the digits, does each step right, and boxes the solver's answer."""
    want, steps = solve(query, digits)
    m = re.fullmatch(r"<think>The numbers are ((?:\d )*\d)\. (.*)</think> The answer is \\boxed\{(\d)\}\.", answer)
    assert m, answer
    assert [int(x) for x in m.group(1).split()] == digits
    assert re.findall(r"(\d) (plus|minus|times) (\d) is (\d)\.", m.group(2)) == [tuple(map(str, s)) for s in steps]
    assert int(m.group(3)) == want


def test_task_answers_are_right_by_construction(tmp_path):
    data = write_task_data(tmp_path / "d", n_train=80, n_test=150, n_heldout=20, seed=3)
    bench = [json.loads(line) for line in data.test.read_text().splitlines()]
    assert len(bench) == 150 and len(load_bench(data.test)) == 150  # the eval format
    for rec in bench:
        assert rec["answer"] == str(solve(rec["query"], rec["digits"])[0])
        with Image.open(data.root / rec["image"]) as im:
            assert im.size == (112, 28)
    texts = [json.loads(line) for line in data.text_test.read_text().splitlines()]
    for rec, text in zip(bench, texts):  # the same problem, the numbers in the text instead of the image
        listing = "The numbers are " + " ".join(map(str, rec["digits"])) + ". "
        assert text["query"] == listing + rec["query"] and text["answer"] == rec["answer"] and "image" not in text
    train = [json.loads(line) for line in data.train.read_text().splitlines()]
    heldout = [json.loads(line) for line in data.heldout.read_text().splitlines()]
    for rec in train + heldout:
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        assert user.startswith("<image>") and len(rec["images"]) == 1
        digits = [int(x) for x in answer.split("The numbers are ")[1].split(".")[0].split()]
        check_cot(answer, digits, user.removeprefix("<image>"))
    # Held out by identity: no (digits, operations) of the test or held-out sets is trained on.
    def key(digits, query):
        return tuple(digits), query
    trained = {key([int(x) for x in r["messages"][1]["content"].split("are ")[1].split(".")[0].split()],
                   r["messages"][0]["content"][7:]) for r in train}
    assert not trained & {key(r["digits"], r["query"]) for r in bench}
    # Answers spread over the ten digits (no constant guess scores well).
    counts = [sum(r["answer"] == str(d) for r in bench) for d in range(10)]
    assert max(counts) < 0.3 * len(bench)
    again = write_task_data(tmp_path / "e", n_train=80, n_test=150, n_heldout=20, seed=3)
    assert again.test.read_text() == data.test.read_text()
    assert (again.root / "images" / "test-00007.png").read_bytes() == (data.root / "images" / "test-00007.png").read_bytes()


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return fam.build_family(TINY, tmp_path_factory.mktemp("fam") / "a")


def test_family_loads_with_transformers(built):
    a = built
    assert set(a.info["text_accuracy"]) == {"base", "reasoner"} and set(a.info["transcription_accuracy"]) == {"close", "far"}
    assert type(transformers.AutoModelForCausalLM.from_pretrained(a.reasoner)).__name__ == "Qwen2ForCausalLM"
    for member in fam.MLLMS:
        model = transformers.AutoModelForImageTextToText.from_pretrained(a.path(member))
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert type(transformers.AutoProcessor.from_pretrained(a.path(member))).__name__ == "Qwen2_5_VLProcessor"
    assert transformers.AutoTokenizer.from_pretrained(a.base).chat_template


def test_towers_start_from_the_base_and_move_as_designed(built):
    a = built
    base, reasoner = _weights(a.base), _weights(a.reasoner)
    close, far = _weights(a.path("close")), _weights(a.path("far"))
    assert reasoner.keys() == base.keys()
    assert any(not torch.equal(reasoner[k], base[k]) for k in base)

    def moved(mllm):  # |tower - base| / |base| over the text tower (Qwen2.5-VL saves it under the LLM's keys)
        num = den = 0.0
        for k, w in base.items():
            num += float((mllm[k].double() - w.double()).square().sum())
            den += float(w.double().square().sum())
        return (num / den) ** 0.5

    assert 0 < moved(close) < moved(far)  # lightly tuned (a quarter of the rate, fewer tasks) vs trained hard
    assert set(close) - set(base) and all(k.startswith("visual.") for k in set(close) - set(base))
    assert not torch.equal(close["visual.patch_embed.proj.weight"], far["visual.patch_embed.proj.weight"])


def test_cache_is_keyed_by_the_recipe(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fam, "build_family", lambda recipe, out, progress, force: calls.append(out) or
                        (out.mkdir(parents=True), (out / "family.json").write_text("{}"), fam.load_family(out))[-1])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first, built_now = fam.ensure_family(TINY)
    again, built_again = fam.ensure_family(TINY)
    other, _ = fam.ensure_family(FamilyRecipe(**{**TINY.__dict__, "seed": 1}))
    assert (built_now, built_again) == (True, False) and len(calls) == 2
    assert first.root == again.root == tmp_path / "xdg" / "deltakit" / fam.recipe_key(TINY)
    assert other.root != first.root and fam.recipe_key(TINY).startswith(f"minifamily-v{fam.RECIPE_VERSION}-")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fam.cache_root() == tmp_path / "home" / ".cache" / "deltakit"


def test_an_interrupted_build_resumes_with_the_same_weights(built, tmp_path, monkeypatch):
    """Deterministic (same recipe and seed, same weights) and resumable: a second build, interrupted after the
    LLMs and resumed without retraining them, equals the first tensor for tensor."""
    a = built
    real = fam.train_loop

    def fail_on_mllms(model, groups, batches, steps, progress, desc, *loss_fn):
        if "MLLM" in desc:
            raise KeyboardInterrupt
        return real(model, groups, batches, steps, progress, desc, *loss_fn)

    monkeypatch.setattr(fam, "train_loop", fail_on_mllms)
    with pytest.raises(KeyboardInterrupt):
        fam.build_family(TINY, tmp_path / "c")
    partial = tmp_path / "c.partial"
    assert not (tmp_path / "c").exists() and sorted(p.name for p in partial.iterdir()) == \
        ["base", "base.json", "reasoner", "reasoner.json"]
    monkeypatch.setattr(fam, "train_loop", lambda model, groups, batches, steps, progress, desc, *loss_fn:
                        pytest.fail("retrained") if "MLLM" not in desc else
                        real(model, groups, batches, steps, progress, desc, *loss_fn))
    c = fam.build_family(TINY, tmp_path / "c")
    assert not partial.exists() and c.info["losses"] == a.info["losses"]
    for member in fam.MEMBERS:
        wa, wc = _weights(a.path(member)), _weights(c.path(member))
        assert all(torch.equal(wa[k], wc[k]) for k in wa), member
