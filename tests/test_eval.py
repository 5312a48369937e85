"""``deltakit eval`` on a tiny Qwen2.5-VL with the real offline processor: scripted outputs give a hand-countable
accuracy, real greedy generation is batch-size invariant, the CLI writes every prediction."""

import json

import pytest
import torch
import transformers
from PIL import Image

from deltakit.cli import main
from deltakit.data import DataError, write_demo_data
from deltakit.evaluate import build_prompt, evaluate, load_bench
from deltakit.tiny import SPECIAL, save_tiny
from deltakit.tiny_processor import save_tiny_processor

QWEN_VL = transformers.Qwen2_5_VLForConditionalGeneration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("tiny-vl-eval"), seed=3)
    save_tiny_processor(path)
    return path


# (record, scripted model output); correct by hand: 1, 3, 5, 6 -> 4 of 7.
SCRIPT = [
    ({"question": "How many red shapes?", "image": "red.png", "answer": "3", "answer_type": "integer", "category": "counting"},
     "<think>I count three.</think> The answer is \\boxed{3}."),
    ({"question": "How many shapes in all, five or four?", "answer": "5", "answer_type": "integer", "category": "counting"},
     "\\boxed{4}"),
    ({"question": "Which shape is shown?", "image": "blue.png", "choices": ["circle", "square", "triangle"],
      "answer": "square", "answer_type": "multi_choice", "category": "shape"}, "<think>four corners</think> \\boxed{B}"),
    ({"question": "Which shape has three corners?", "choices": ["circle", "square", "triangle"], "answer": "triangle",
      "category": "shape"}, "The answer is (A)."),
    ({"question": "Average of 3 and 8?", "answer": "5.5", "answer_type": "float", "precision": 1, "category": "average"},
     "\\boxed{5.50}"),
    ({"question": "What color is it?", "image": "red.png", "answer": "red", "answer_type": "text", "category": "color"},
     "\\boxed{Red}"),
    ({"question": "What color is the sky?", "answer": "blue", "answer_type": "text", "category": "color"}, "\\boxed{}"),
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    Image.new("RGB", (56, 56), (250, 0, 0)).save(root / "red.png")
    Image.new("RGB", (112, 84), (0, 0, 250)).save(root / "blue.png")
    path = root / "bench.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", **rec}) + "\n" for i, (rec, _) in enumerate(SCRIPT)))
    return path


def scripted_generate(processor, calls):
    """A ``generate`` that checks left padding and answers each prompt with its scripted output."""
    tok = processor.tokenizer

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        assert generation_config.do_sample is False and generation_config.num_beams == 1
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            n = int(mask.sum())
            assert mask[-n:].all() and not mask[:-n].any()  # left padding
            assert (ids[:-n] == SPECIAL["endoftext"]).all()
            prompt = tok.decode(ids[-n:])
            [output] = [out for rec, out in SCRIPT if rec["question"] + "\n" in prompt]
            rows.append(tok(output + "<|im_end|>")["input_ids"][:generation_config.max_new_tokens])
        calls.append((len(rows), int((attention_mask == 0).sum())))
        width = max(map(len, rows))
        new = torch.tensor([r + [SPECIAL["endoftext"]] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    return generate


def test_accuracy_matches_hand_count(tiny, bench, monkeypatch):
    calls = []
    monkeypatch.setattr(QWEN_VL, "generate", scripted_generate(transformers.AutoProcessor.from_pretrained(tiny), calls))
    report = evaluate(tiny, bench, batch_size=3, max_new_tokens=64)
    assert [c for c, _ in calls] == [3, 3, 1] and sum(p for _, p in calls) > 0
    assert (report.examples, report.correct, report.unanswered) == (7, 4, 1)
    assert report.accuracy == pytest.approx(4 / 7)
    assert {k: (v["examples"], v["correct"]) for k, v in report.categories.items()} == {
        "average": (1, 1), "color": (2, 1), "counting": (2, 1), "shape": (2, 1)}
    assert report.categories["color"]["accuracy"] == 0.5
    assert {k: (v["examples"], v["correct"]) for k, v in report.answer_types.items()} == {
        "float": (1, 1), "integer": (2, 1), "multi_choice": (2, 1), "text": (2, 1)}
    preds = report.predictions
    assert [p["id"] for p in preds] == [f"q{i}" for i in range(7)]
    assert [p["output"] for p in preds] == [out for _, out in SCRIPT]
    assert [p["prediction"] for p in preds] == ["3", "4", "square", "circle", "5.5", "red", None]
    assert [p["correct"] for p in preds] == [True, False, True, False, True, True, False]


def test_prompt_format(bench):
    items = load_bench(bench)
    assert build_prompt(items[2]) == ("Which shape is shown?\nChoices:\n(A) circle\n(B) square\n(C) triangle\n"
                                      "Answer with the option's letter from the given choices.\n"
                                      "Think step by step inside <think> </think>, then give the final answer in \\boxed{}.")
    assert "Answer with a number with 1 decimal place." in build_prompt(items[4])
    assert items[3].answer_type == "multi_choice"  # inferred from choices


def test_real_generation_is_batch_size_invariant(tiny, tmp_path):
    demo = write_demo_data(tmp_path / "demo", n=1, seed=1, n_bench=5)
    with demo.bench.open("a") as fh:  # a text-only question in the same batches as image ones
        fh.write(json.dumps({"question": "What is 2 + 2?", "answer": "4", "answer_type": "integer", "category": "text"}) + "\n")
    one = evaluate(tiny, demo.bench, batch_size=1, max_new_tokens=6)
    three = evaluate(tiny, demo.bench, batch_size=3, max_new_tokens=6)
    assert one.examples == three.examples == 6
    assert [p["output"] for p in one.predictions] == [p["output"] for p in three.predictions]
    assert len({p["output"] for p in one.predictions}) > 2  # outputs depend on the prompt, so padding errors would show


def test_cli_writes_every_prediction(tiny, bench, tmp_path, capsys):
    out = tmp_path / "eval.json"
    main(["eval", str(tiny), "--data", str(bench), "--json", str(out), "--batch-size", "2", "--max-new-tokens", "4",
          "--limit", "5"])
    data = json.loads(out.read_text())
    assert data["examples"] == len(data["predictions"]) == 5
    assert data["correct"] == sum(p["correct"] for p in data["predictions"])
    assert set(data["predictions"][0]) == {"id", "category", "answer_type", "question", "choices", "answer", "output",
                                           "prediction", "correct"}
    assert "counting" in capsys.readouterr().out


def test_cli_errors(tiny, bench, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SCRIPT[0][0] | {"image": None}) + "\n" + json.dumps({"question": "q", "answer": "1", "answer_type": "list"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: answer_type 'list' is not one of"):
        load_bench(bad)
    bad.write_text(json.dumps({"question": "q", "choices": ["x", "y"], "answer": "z"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: answer 'z' is neither one of the choices nor an option letter"):
        load_bench(bad)
    for args in (["eval", str(tiny), "--data", str(bad)], ["eval", str(tmp_path), "--data", str(bench)],
                 ["eval", str(tiny), "--data", str(bench), "--batch-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_evaluates_a_merged_output(tiny, bench, tmp_path):
    from deltakit.tiny import save_partner_llm

    llm = save_partner_llm(tiny, tmp_path / "llm")
    main(["merge", "--mllm", str(tiny), "--llm", str(llm), "--method", "linear", "--alpha", "0.9", str(tmp_path / "merged")])
    report = evaluate(tmp_path / "merged", bench, batch_size=4, max_new_tokens=3)
    assert report.examples == len(report.predictions) == len(SCRIPT)
