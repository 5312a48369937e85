"""``deltakit eval`` on a tiny Qwen2.5-VL with the real offline processor: scripted outputs give a hand-countable
accuracy, real greedy generation is batch-size invariant, the CLI writes every prediction as it is made, --resume
continues an interrupted run, sampling / thinking / prompt flags reach generate and the chat template."""

import json

import pytest
import torch
import transformers
from PIL import Image

from deltakit.cli import main
from deltakit.data import DataError
from deltakit.demo.samples import write_demo_data
from deltakit.errors import DeltakitError
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


def reference_outputs(model, processor, items, max_new_tokens: int) -> list[str]:
    """Greedy decoding written out: one unpadded prompt at a time, argmax of the model's last logits, no cache and
    no ``generate``; the prompt from the processor's own chat template and the image opened with PIL."""
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [tok.eos_token_id if eos is None else eos])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and >10x faster than two on a busy 2-core machine
    try:
        return [_greedy(model, processor, tok, eos, item, max_new_tokens) for item in items]
    finally:
        torch.set_num_threads(threads)


def _greedy(model, processor, tok, eos: set[int], item, max_new_tokens: int) -> str:
    """One item decoded greedily, as :func:`reference_outputs` says."""
    content, kw = build_prompt(item), {}
    if item.image is not None:
        content = [{"type": "image"}, {"type": "text", "text": content}]
        kw["images"] = [Image.open(item.image).convert("RGB")]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    enc = dict(processor(text=[text], return_tensors="pt", **kw))
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(**enc).logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
            length = enc["input_ids"].shape[1]  # grow every per-token input by the new token
            for k, v in list(enc.items()):
                if torch.is_tensor(v) and v.shape == (1, length):
                    fill = token if k == "input_ids" else int(k == "attention_mask")
                    enc[k] = torch.cat([v, torch.tensor([[fill]], dtype=v.dtype)], 1)
    return tok.decode(new, skip_special_tokens=True)


def test_accuracy_matches_hand_count(tiny, bench, monkeypatch):
    calls = []
    monkeypatch.setattr(QWEN_VL, "generate", scripted_generate(transformers.AutoProcessor.from_pretrained(tiny), calls))
    report = evaluate(tiny, bench, batch_size=3, max_new_tokens=64)
    assert [c for c, _ in calls] == [3, 3, 1] and sum(p for _, p in calls) > 0
    assert (report.examples, report.correct, report.unanswered) == (7, 4, 1)
    assert report.accuracy == pytest.approx(4 / 7)
    assert {k: (v["examples"], v["correct"]) for k, v in report.categories["category"].items()} == {
        "average": (1, 1), "color": (2, 1), "counting": (2, 1), "shape": (2, 1)}
    assert report.categories["category"]["color"]["accuracy"] == 0.5
    assert {k: (v["examples"], v["correct"]) for k, v in report.categories["answer_type"].items()} == {
        "float": (1, 1), "integer": (2, 1), "multi_choice": (2, 1), "text": (2, 1)}
    preds = report.predictions
    assert [p["id"] for p in preds] == [f"q{i}" for i in range(7)]
    assert [p["prediction"] for p in preds] == [out for _, out in SCRIPT]
    assert [p["extracted"] for p in preds] == ["3", "4", "square", "circle", "5.5", "red", None]
    assert [p["correct"] for p in preds] == [True, False, True, False, True, True, False]


def test_prompt_format(bench):
    items = load_bench(bench)
    assert build_prompt(items[2]) == ("Which shape is shown?\nChoices:\n(A) circle\n(B) square\n(C) triangle\n"
                                      "Answer with the option's letter from the given choices.\n"
                                      "Think step by step inside <think> </think>, then give the final answer in \\boxed{}.")
    assert "Answer with a number with 1 decimal place." in build_prompt(items[4])
    assert items[3].answer_type == "multi_choice"  # inferred from choices


def test_real_generation_matches_greedy_decoding_written_out(tiny, tmp_path):
    # Left-padded batches of 3 (image and text-only questions mixed) give, for every question, the tokens that
    # plain greedy decoding of that question alone gives with the model as transformers loads it.
    demo = write_demo_data(tmp_path / "demo", n=1, seed=1, n_bench=5)
    with demo.bench.open("a") as fh:  # a text-only question in the same batches as image ones
        fh.write(json.dumps({"question": "What is 2 + 2?", "answer": "4", "answer_type": "integer", "category": "text"}) + "\n")
    three = evaluate(tiny, demo.bench, batch_size=3, max_new_tokens=6)
    model = QWEN_VL.from_pretrained(tiny, dtype=torch.float32).eval()
    want = reference_outputs(model, transformers.AutoProcessor.from_pretrained(tiny), load_bench(demo.bench), 6)
    assert [p["prediction"] for p in three.predictions] == want
    assert len(set(want)) > 2  # outputs depend on the prompt, so padding errors would show


def test_cli_writes_every_prediction(tiny, bench, tmp_path, capsys, monkeypatch):
    # The scripted model (see test_accuracy_matches_hand_count) through the CLI: the first 5 of SCRIPT are
    # right, wrong, right, wrong, right by hand.
    calls = []
    monkeypatch.setattr(QWEN_VL, "generate", scripted_generate(transformers.AutoProcessor.from_pretrained(tiny), calls))
    out = tmp_path / "eval.json"
    main(["eval", str(tiny), "--data", str(bench), "--json", str(out), "--batch-size", "2", "--max-new-tokens", "64",
          "--limit", "5"])
    assert [c for c, _ in calls] == [2, 2, 1]
    data = json.loads(out.read_text())
    assert (data["examples"], data["correct"], data["unanswered"], data["accuracy"]) == (5, 3, 0, 0.6)
    assert [(p["id"], p["prediction"], p["extracted"], p["correct"]) for p in data["predictions"]] == [
        (f"q{i}", out, pred, ok) for i, ((_, out), pred, ok) in
        enumerate(zip(SCRIPT[:5], ["3", "4", "square", "circle", "5.5"], [True, False, True, False, True]))]
    assert {k: (v["examples"], v["correct"]) for k, v in data["categories"]["category"].items()} == {
        "average": (1, 1), "counting": (2, 1), "shape": (2, 1)}
    assert set(data["predictions"][0]) == {"id", "prediction", "extracted", "answer", "correct", "lenient_correct", "groups"}
    assert data["benchmark"] == "deltakit" and data["lenient_accuracy"] is None
    # beside --json, each prediction was also written as it was scored (what an interrupted run keeps)
    written = [json.loads(line) for line in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()]
    assert written == data["predictions"]
    rows = [" ".join(line.replace("│", " ").replace("*", " ").split()) for line in capsys.readouterr().out.splitlines()]
    for row in ("average 1 1 100.0%", "counting 2 1 50.0%", "shape 2 1 50.0%", "deltakit: 3/5 = 60.0% (official rules)"):
        assert row in rows, (row, rows)
    assert "0 without a usable answer" in rows


def test_cli_errors(tiny, bench, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SCRIPT[0][0] | {"image": None}) + "\n" + json.dumps({"question": "q", "answer": "1", "answer_type": "list"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: answer_type 'list' is not one of"):
        load_bench(bad)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: answer_type 'list' is not one of"):
        evaluate(tiny, bad)
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
    # The merge output loads with its copied processor files and generates what the BR2V model built here does:
    # the MLLM with its decoder layers and final norm set to 0.9 MLLM + 0.1 LLM (merge's default modules
    # attn, mlp, norm; embeddings and lm_head kept), decoded greedily by reference_outputs.
    from deltakit.tiny import save_partner_llm

    llm = save_partner_llm(tiny, tmp_path / "llm", noise=1.0)  # far enough that 0.1 of it changes the greedy tokens
    main(["merge", "--mllm", str(tiny), "--llm", str(llm), "--method", "linear", "--alpha", "0.9", str(tmp_path / "merged")])
    report = evaluate(tmp_path / "merged", bench, batch_size=4, max_new_tokens=3)
    processor, items = transformers.AutoProcessor.from_pretrained(tiny), load_bench(bench)
    model = QWEN_VL.from_pretrained(tiny, dtype=torch.float32).eval()
    unmerged = reference_outputs(model, processor, items, 3)
    text = transformers.Qwen2ForCausalLM.from_pretrained(llm, dtype=torch.float32).state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.replace("model.language_model.", "model.")
            if name.startswith(("model.language_model.layers.", "model.language_model.norm.")):
                p.copy_(0.9 * p + 0.1 * text[key])
    want = reference_outputs(model, processor, items, 3)
    assert [p["prediction"] for p in report.predictions] == want
    assert want != unmerged  # so an output that were the unmerged MLLM would fail
    assert [p["id"] for p in report.predictions] == [f"q{i}" for i in range(len(SCRIPT))]


def test_degenerate_long_number_is_scored_wrong_not_a_crash(tiny, tmp_path, monkeypatch):
    # Naive merges often emit a runaway number; Decimal.quantize used to raise InvalidOperation and the
    # whole eval died without writing its JSON.
    import deltakit.evaluate as ev

    bench = tmp_path / "bench.jsonl"
    records = [{"id": "long-float", "question": "a?", "answer": "5.5", "answer_type": "float", "precision": 1},
               {"id": "ok", "question": "b?", "answer": "5.5", "answer_type": "float", "precision": 1},
               {"id": "long-int", "question": "c?", "answer": "3", "answer_type": "integer"}]
    bench.write_text("".join(json.dumps(r) + "\n" for r in records))
    outputs = {"a?": "\\boxed{" + "9" * 40 + "}", "b?": "\\boxed{5.54}", "c?": "\\boxed{" + "7" * 1_000_001 + "}"}
    monkeypatch.setattr(ev, "generate", lambda model, processor, items, max_new_tokens, *a: [outputs[i.question] for i in items])
    out = tmp_path / "eval.json"
    main(["eval", str(tiny), "--data", str(bench), "--json", str(out)])
    data = json.loads(out.read_text())
    assert (data["examples"], data["correct"], data["unanswered"]) == (3, 1, 2)
    assert [(p["id"], p["extracted"], p["correct"]) for p in data["predictions"]] == [
        ("long-float", None, False), ("ok", "5.5", True), ("long-int", None, False)]


def test_interrupted_eval_keeps_the_predictions_it_made(tiny, bench, tmp_path, monkeypatch, capsys):
    import deltakit.evaluate as ev

    by_question = {rec["question"]: out for rec, out in SCRIPT}
    batches = []

    def generate(model, processor, items, max_new_tokens, *args):
        if len(batches) == 2:  # after k = 4 examples (two batches of 2), as if Ctrl-C hit during the third
            raise KeyboardInterrupt
        batches.append(len(items))
        return [by_question[item.question] for item in items]

    monkeypatch.setattr(ev, "generate", generate)
    preds, out = tmp_path / "preds.jsonl", tmp_path / "eval.json"
    preds.write_text("stale line from an earlier run\n")
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tiny), "--data", str(bench), "--batch-size", "2", "--predictions", str(preds), "--json", str(out)])
    assert exc.value.code == 130 and not out.exists()
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == 4
    # Hand count of SCRIPT's first four (see test_accuracy_matches_hand_count).
    assert [(r["id"], r["extracted"], r["correct"]) for r in lines] == [
        ("q0", "3", True), ("q1", "4", False), ("q2", "square", True), ("q3", "circle", False)]
    assert capsys.readouterr().err.splitlines()[-1] == "aborted"
    # --resume: the four made are kept, only the other three are generated; the result is the whole run's
    batches.clear()
    batches.append(None)  # no more interruptions: generate raises only when len(batches) == 2
    batches.append(None)
    batches.append(None)
    with preds.open("ab") as fh:
        fh.write(b'{"id": "q4", "predic')  # a line cut by the interruption is dropped
    main(["eval", str(tiny), "--data", str(bench), "--batch-size", "2", "--predictions", str(preds), "--json", str(out),
          "--resume"])
    assert batches[3:] == [2, 1]
    data = json.loads(out.read_text())
    assert (data["examples"], data["correct"], data["resumed"]) == (7, 4, 4)  # hand count of SCRIPT: 4 of 7
    assert [json.loads(line)["id"] for line in preds.read_text().splitlines()] == [f"q{i}" for i in range(7)]


def test_predictions_file_of_a_complete_run(tiny, bench, tmp_path, monkeypatch):
    import deltakit.evaluate as ev

    by_question = {rec["question"]: out for rec, out in SCRIPT}
    monkeypatch.setattr(ev, "generate", lambda model, processor, items, max_new_tokens, *a: [by_question[i.question] for i in items])
    preds = tmp_path / "preds.jsonl"
    report = evaluate(tiny, bench, batch_size=3, predictions_path=preds)
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["correct"] for r in lines] == [True, False, True, False, True, True, False]  # hand count, 4 of 7
    assert lines == report.predictions
    with pytest.raises(DeltakitError, match=r"nowhere[/\\]preds\.jsonl: cannot write predictions"):
        evaluate(tiny, bench, predictions_path=tmp_path / "nowhere" / "preds.jsonl")


def test_sampling_thinking_and_prompt_flags(tiny, bench, tmp_path, monkeypatch):
    # The flags reach transformers: the generation config samples at the given temperature/top-p, the chat template
    # gets enable_thinking, and the user turn is the --prompt template filled from the record.
    processor = transformers.AutoProcessor.from_pretrained(tiny)
    tok, seen = processor.tokenizer, {"thinking": [], "configs": [], "prompts": []}
    template = type(processor).apply_chat_template

    def spy(self, conversation, **kwargs):
        seen["thinking"].append(kwargs.get("enable_thinking"))
        return template(self, conversation, **kwargs)

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        seen["configs"].append(generation_config)
        seen["prompts"] += [tok.decode(ids[m.bool()]) for ids, m in zip(input_ids, attention_mask)]
        new = torch.tensor([tok("\\boxed{3}<|im_end|>")["input_ids"]] * len(input_ids))
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(type(processor), "apply_chat_template", spy)
    monkeypatch.setattr(QWEN_VL, "generate", generate)
    out = tmp_path / "eval.json"
    main(["eval", str(tiny), "--data", str(bench), "--limit", "2", "--temperature", "0.7", "--top-p", "0.9", "--seed", "5",
          "--disable-thinking", "--prompt", "Q: {question} Go.", "--json", str(out)])
    [cfg] = seen["configs"]
    assert (cfg.do_sample, cfg.temperature, cfg.top_p) == (True, 0.7, 0.9)
    assert seen["thinking"] == [False, False]
    assert "Q: How many red shapes? Go." in seen["prompts"][0] and "Think step by step" not in seen["prompts"][0]
    data = json.loads(out.read_text())
    assert data["sampling"] == {"temperature": 0.7, "top_p": 0.9, "seed": 5}
    assert data["chat_template_kwargs"] == {"enable_thinking": False}
    assert [p["correct"] for p in data["predictions"]] == [True, False]  # \boxed{3}: q0's answer is 3, q1's is 5
    with pytest.raises(DataError, match="--prompt names field 'nope'"):
        evaluate(tiny, bench, prompt="{nope}")


def test_seeded_sampling_is_reproducible(tiny, bench):
    from deltakit.evaluate import Sampling

    runs = [evaluate(tiny, bench, limit=2, max_new_tokens=3, batch_size=2, sampling=Sampling(1.5, 1.0, 7)) for _ in range(2)]
    assert [p["prediction"] for p in runs[0].predictions] == [p["prediction"] for p in runs[1].predictions]
