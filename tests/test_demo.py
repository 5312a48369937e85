"""`deltakit demo` end to end through the CLI (tiny settings); its report checked against numbers recomputed here."""

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open

from deltakit.cli import main
from deltakit.data import SFTDataset, collate, load_examples
from deltakit.evaluate import load_bench
from test_eval import reference_outputs

ARGS = ["--steps", "3", "--reasoner-steps", "4", "--n-train", "8", "--n-bench", "4", "--max-new-tokens", "8"]


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k).double() for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    main(["demo", str(tmp / "out"), *ARGS, "--json", str(tmp / "demo.json")])
    out = tmp / "out"
    return out, json.loads((tmp / "demo.json").read_text()), {m: weights(out / "models" / m)
                                                               for m in ("base", "reasoner-llm", "merged", "sft", "drift")}


def text_keys(w: dict) -> list[str]:
    return [k for k in w if "visual" not in k]


# The prior's tensors: the demo's 2 layers x (q, k, v, o weights, q, k, v biases, gate, up, down).
PRIOR_NAMES = {f"layers.{i}.{t}" for i in range(2) for t in
               [f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")] + ["self_attn.o_proj.weight"]
               + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]}


def hand_score(output: str, rec: dict) -> bool:
    """Right iff the last \\boxed{X} holds the answer: X the option letter or text for choices, the same number
    for numeric answers (to the record's precision), the same text case-insensitively otherwise."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", output)
    if not boxed:
        return False
    x, answer = boxed[-1].strip(), str(rec["answer"])
    choices = rec.get("choices")
    if choices and len(x) == 1 and x.isalpha() and ord(x.upper()) - 65 < len(choices):
        x = choices[ord(x.upper()) - 65]
    if rec.get("answer_type") in ("integer", "float"):
        try:
            return round(float(x), rec.get("precision") or 0) == round(float(answer), rec.get("precision") or 0)
        except ValueError:
            return False
    return x.lower() == answer.lower()


def hf_loss(model, batch: dict) -> float:
    """transformers' own mean token loss (labels shifted inside the model) over one batch (one thread: tiny matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return float(model(**batch).loss)
    finally:
        torch.set_num_threads(threads)


def test_every_artifact_is_there(demo):
    out, report, _ = demo
    assert json.loads((out / "demo.json").read_text()) == report
    for rel in ("data/train.jsonl", "data/bench.jsonl", "data/train-text.jsonl", "prior.safetensors", "reports/diff.json",
                "models/merged/merge_report.json", "models/sft/train_log.jsonl", "models/drift/deltakit_finetune.json",
                *(f"reports/eval-{m}.json" for m in ("base", "merged", "sft", "drift"))):
        assert (out / rel).is_file(), rel
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert "<image>" not in (out / "data" / "train-text.jsonl").read_text()
    assert report["finetune"]["drift"]["drift_tensors"] == report["prior"]["tensors"] == len(PRIOR_NAMES) == 20
    assert report["finetune"]["sft"]["drift_tensors"] == 0 and report["finetune"]["sft"]["steps"] == 3


def test_bad_settings_are_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", str(tmp_path / "out"), "--steps", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "steps must be at least 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_pair_and_merge_follow_the_formulas(demo):
    _, report, w = demo
    base, llm, merged = w["base"], w["reasoner-llm"], w["merged"]
    # diff: overall cosine of the whole text tower, from plain sums.
    keys = text_keys(base)
    assert sorted(keys) == sorted(llm) and len(keys) == report["diff"]["matched_tensors"]
    dot = sum(float((base[k] * llm[k]).sum()) for k in keys)
    norms = sum(float(base[k].square().sum()) for k in keys) * sum(float(llm[k].square().sum()) for k in keys)
    assert report["diff"]["overall_cosine"] == pytest.approx(dot / norms ** 0.5, abs=1e-9)
    # linear merge, alpha 0.9 on the MLLM, of the text tower but its embeddings and head; the rest copied bit for bit.
    for k in base:
        if "visual" not in k and "embed_tokens" not in k and "lm_head" not in k:
            torch.testing.assert_close(merged[k], 0.9 * base[k] + 0.1 * llm[k], rtol=0, atol=1e-7)
        else:
            assert torch.equal(merged[k], base[k]), k


def test_prior_is_reasoner_minus_base(demo):
    out, _, w = demo
    prior = weights(out)
    assert set(prior) == PRIOR_NAMES
    for name, d in prior.items():
        torch.testing.assert_close(d, (w["reasoner-llm"]["model." + name] - w["base"]["model." + name]).bfloat16().double())


def test_drift_moves_toward_the_reasoner_more_than_sft(demo):
    out, report, w = demo
    base, llm = w["base"], w["reasoner-llm"]
    names = list(weights(out))

    def cos(model):
        u = torch.cat([(w[model]["model." + n] - base["model." + n]).flatten() for n in names])
        d = torch.cat([(llm["model." + n] - base["model." + n]).flatten() for n in names])
        return float(u @ d / (u.norm() * d.norm()))

    got = {m: report["models"][m]["update_cos_prior"] for m in ("merged", "sft", "drift")}
    for m, value in got.items():
        assert value == pytest.approx(cos(m), abs=2e-3)  # the report uses the bf16 prior
    assert got["merged"] == pytest.approx(1.0, abs=1e-4)
    assert got["drift"] > got["sft"]
    assert report["models"]["base"]["update_cos_prior"] is None and report["models"]["base"]["reasoner_distance"] == 1.0
    assert report["models"]["merged"]["reasoner_distance"] == pytest.approx(0.9, abs=1e-6)


def _vl(folder):
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def test_scores_match_greedy_decoding_and_hf_loss(demo):
    out, report, _ = demo
    records = [json.loads(line) for line in (out / "data" / "bench.jsonl").read_text().splitlines()]
    items = load_bench(out / "data" / "bench.jsonl")
    for m in ("base", "merged", "sft", "drift"):
        ev = json.loads((out / "reports" / f"eval-{m}.json").read_text())
        outputs = [p["output"] for p in ev["predictions"]]
        assert [p["id"] for p in ev["predictions"]] == [r["id"] for r in records]
        # accuracy as scored here from the outputs (the tiny models box no answer in 8 tokens: 0 of 4 right)
        right = sum(hand_score(o, r) for o, r in zip(outputs, records))
        assert (report["models"][m]["correct"], report["models"][m]["accuracy"]) == (right, right / 4)
        if m in ("base", "drift"):  # the outputs themselves: plain greedy decoding with transformers, one prompt at a time
            path = out / "models" / m
            assert outputs == reference_outputs(_vl(path), transformers.AutoProcessor.from_pretrained(path), items, 8), m
    # Held-out losses: transformers' own mean token loss over one batch of all held-out examples.
    processor = transformers.AutoProcessor.from_pretrained(out / "models" / "base")
    dataset = SFTDataset(load_examples(out / "data" / "heldout" / "train.jsonl"), processor)
    batch = collate([dataset[i] for i in range(len(dataset))], processor.tokenizer.pad_token_id)
    for m in ("base", "sft"):
        assert report["models"][m]["heldout_loss"] == pytest.approx(hf_loss(_vl(out / "models" / m), batch), rel=1e-5), m
    losses = [report["models"][m]["heldout_loss"] for m in ("base", "sft")]
    assert losses[1] < losses[0]
    # The partner's held-out text-only CoT loss: the reasoner's text tower is the saved Qwen2 LLM (noise 0), and on
    # text-only input Qwen2.5-VL's mrope positions are plain 1-D ones, so the LLM gives the reasoner's loss.
    text = SFTDataset(load_examples(out / "data" / "heldout" / "train-text.jsonl"), processor)
    batch = collate([text[i] for i in range(len(text))], processor.tokenizer.pad_token_id)
    llm = transformers.Qwen2ForCausalLM.from_pretrained(out / "models" / "reasoner-llm", dtype=torch.float32).eval()
    text_loss = report["finetune"]["reasoner"]["heldout_text_loss"]
    assert text_loss["base"] == pytest.approx(hf_loss(_vl(out / "models" / "base"), batch), rel=1e-5)
    assert text_loss["reasoner"] == pytest.approx(
        hf_loss(llm, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}), rel=1e-5)
    assert text_loss["reasoner"] < text_loss["base"]


def test_existing_output_is_refused(demo, capsys):
    out, _, _ = demo
    with pytest.raises(SystemExit) as exc:
        main(["demo", str(out), *ARGS])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "already exists" in err and "--force" in err
