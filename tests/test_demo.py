"""`deltakit demo` end to end through the CLI (tiny settings); its report checked against numbers recomputed here."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from deltakit.cli import main
from deltakit.data import SFTDataset, collate, load_examples

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


def test_every_artifact_is_there(demo):
    out, report, _ = demo
    assert json.loads((out / "demo.json").read_text()) == report
    for rel in ("data/train.jsonl", "data/bench.jsonl", "data/train-text.jsonl", "prior.safetensors", "reports/diff.json",
                "models/merged/merge_report.json", "models/sft/train_log.jsonl", "models/drift/deltakit_finetune.json",
                *(f"reports/eval-{m}.json" for m in ("base", "merged", "sft", "drift"))):
        assert (out / rel).is_file(), rel
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert "<image>" not in (out / "data" / "train-text.jsonl").read_text()
    assert report["finetune"]["drift"]["drift_tensors"] == report["prior"]["tensors"] == 20
    assert report["finetune"]["sft"]["drift_tensors"] == 0 and report["finetune"]["sft"]["steps"] == 3
    text_loss = report["finetune"]["reasoner"]["heldout_text_loss"]
    assert text_loss["reasoner"] < text_loss["base"]


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
    assert len(prior) == 20
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


def test_scores_match_the_predictions_and_hf_loss(demo):
    out, report, _ = demo
    for m in ("base", "merged", "sft", "drift"):
        ev = json.loads((out / "reports" / f"eval-{m}.json").read_text())
        assert len(ev["predictions"]) == 4
        assert report["models"][m]["accuracy"] == sum(p["correct"] for p in ev["predictions"]) / 4
    # Held-out loss of the SFT model: transformers' own mean token loss over one batch of all held-out examples.
    processor = transformers.AutoProcessor.from_pretrained(out / "models" / "sft")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "models" / "sft", dtype=torch.float32)
    dataset = SFTDataset(load_examples(out / "data" / "heldout" / "train.jsonl"), processor)
    batch = collate([dataset[i] for i in range(len(dataset))], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = float(model(**batch).loss)
    assert report["models"]["sft"]["heldout_loss"] == pytest.approx(loss, rel=1e-5)
    losses = [report["models"][m]["heldout_loss"] for m in ("base", "sft")]
    assert losses[1] < losses[0]


def test_existing_output_is_refused(demo, capsys):
    out, _, _ = demo
    with pytest.raises(SystemExit) as exc:
        main(["demo", str(out), *ARGS])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "already exists" in err and "--force" in err
