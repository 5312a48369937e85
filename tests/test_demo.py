"""`deltakit demo` end to end through the CLI on a tiny family; its numbers checked against ones recomputed here.

The family is built at a tiny size (tests/test_minifamily.py's recipe) and put where the CLI's default recipe is
looked up in the cache, so the real CLI path runs: cache lookup, every merge, prior, SFT and DRIFT run, eval.
"""

import contextlib
import io
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_minifamily import TINY

from deltakit.cli import main
from deltakit.cli._common import console
from deltakit.demo import family as fam
from deltakit.demo.settings import LABELS, METHODS, FamilyRecipe

ARGS = ["--quick", "--n-test", "6", "--n-heldout", "4", "--n-train", "16", "--steps", "2"]


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cache = tmp / "cache"
    fam.build_family(TINY, cache / fam.recipe_key(FamilyRecipe()))
    printed = io.StringIO()
    width, console.width = console.width, 200  # one table row per line
    with contextlib.redirect_stdout(printed):
        main(["demo", str(tmp / "out"), *ARGS, "--cache", str(cache), "--json", str(tmp / "demo.json")])
    return (tmp / "out", json.loads((tmp / "demo.json").read_text()), fam.load_family(cache / fam.recipe_key(FamilyRecipe())),
            printed.getvalue()) if not setattr(console, "width", width) else None


def test_cli_prints_the_table(demo):
    _, report, _, printed = demo
    assert "family: reused" in printed and "diff verdict" in printed
    for m in METHODS:
        assert LABELS[m] in printed
    for f in ("close", "far"):
        assert f"{100 * report['table'][f]['sft']['accuracy']:.1f}%" in printed
        assert f"{report['table'][f]['drift_adaptive']['cot_loss']:.3f}" in printed


def test_every_artifact_is_there(demo):
    out, report, _, _ = demo
    assert json.loads((out / "demo.json").read_text()) == report
    assert report["family_built"] is False and list(report["table"]["far"]) == list(METHODS)
    for rel in ("data/train.jsonl", "data/test.jsonl", "data/heldout.jsonl", "study.json", "table.md",
                "figures/pairs.png", "figures/accuracy.png", "reports/diff-close.json", "reports/diff-far.json",
                *(f"priors/{f}-{p}.safetensors" for f in ("close", "far") for p in ("both", "attn", "mlp")),
                *(f"reports/eval-{f}-{m}.json" for f in ("close", "far") for m in METHODS),
                *(f"models/{f}/{m}/config.json" for f in ("close", "far") for m in METHODS if m != "base")):
        assert (out / rel).is_file(), rel
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    study = json.loads((out / "study.json").read_text())
    # DRIFT bound every tensor of its prior: 2 layers x (q, k, v weight and bias, o; gate, up, down).
    for f in ("close", "far"):
        r = study["results"][f]
        assert (r["drift_adaptive"]["drift_tensors"], r["drift_adaptive_attn"]["drift_tensors"],
                r["drift_adaptive_mlp"]["drift_tensors"], r["sft"]["drift_tensors"]) == (20, 14, 6, 0)


def test_diff_verdict_numbers_follow_the_weights(demo):
    _, report, family, _ = demo
    reasoner = weights(family.reasoner)
    for f in ("close", "far"):
        mllm = weights(family.path(f))
        for layer, stats in report["pairs"][f]["layers"].items():
            keys = sorted(k for k in reasoner if k.startswith(f"model.layers.{layer}."))
            a = torch.cat([mllm[k].flatten() for k in keys])
            b = torch.cat([reasoner[k].flatten() for k in keys])
            assert stats["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-7)
            assert stats["l2"] == pytest.approx(float((a - b).norm()), rel=1e-6)  # float32 products summed in float64
            assert stats["rel_l2"] == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-6)


def test_merges_and_priors_follow_the_formulas(demo):
    out, _, family, _ = demo
    base, reasoner, close = weights(family.base), weights(family.reasoner), weights(family.path("close"))
    linear, ta = weights(out / "models" / "close" / "linear"), weights(out / "models" / "close" / "task_arithmetic")
    swap = weights(out / "models" / "close" / "layer_swap")
    for k, w in close.items():
        merged = (k.startswith("model.layers.") or k == "model.norm.weight")
        if merged:
            torch.testing.assert_close(linear[k], 0.9 * w + 0.1 * reasoner[k], rtol=0, atol=1e-7)
            torch.testing.assert_close(ta[k], base[k] + (w - base[k]) + (reasoner[k] - base[k]), rtol=0, atol=1e-6)
            kept = k.startswith("model.layers.0.")  # layer swap keeps the MLLM's first layer (keep_layers 1)
            torch.testing.assert_close(swap[k], w if kept else 0.9 * w + 0.1 * reasoner[k], rtol=0, atol=1e-7)
        else:
            assert torch.equal(linear[k], w) and torch.equal(ta[k], w), k
    prior = weights(out / "priors")  # three files; each holds its own modules' canonical names
    both = load_file(out / "priors" / "close-both.safetensors")
    assert len(both) == 20 and prior
    for name, d in both.items():
        torch.testing.assert_close(d.double(), reasoner["model." + name] - close["model." + name], rtol=0, atol=1e-6)
    assert all(".mlp." not in n for n in load_file(out / "priors" / "close-attn.safetensors"))
    assert all(".mlp." in n for n in load_file(out / "priors" / "close-mlp.safetensors"))


_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def _score(output: str, answer: str) -> bool:
    """docs/eval.md's rule for integer answers, written out: the text after the last </think>; in it the last
    \\boxed{}, else what follows the last final-answer phrase on its line, else all of it; its last number
    (digits or a number word up to twenty) equals the answer."""
    text = output.split("</think>")[-1] if output.split("</think>")[-1].strip() else output
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        text = boxed[-1]
    else:
        phrases = list(re.finditer(r"(the answer is|final answer:|answer:|the correct option is)", text, re.IGNORECASE))
        if phrases:
            text = text[phrases[-1].end():].split("\n")[0].strip().removesuffix(".")
    numbers = re.findall(r"-?\d+(?:\.\d+)?|\b(?:" + "|".join(_WORDS) + r")\b", text, re.IGNORECASE)
    if not numbers:
        return False
    last = numbers[-1].lower()
    value = float(_WORDS.index(last)) if last in _WORDS else float(last)
    return value == float(answer)


def test_accuracy_and_cot_loss_recomputed(demo):
    out, report, family, _ = demo
    test = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    for f in ("close", "far"):
        for m in METHODS:
            ev = json.loads((out / "reports" / f"eval-{f}-{m}.json").read_text())
            right = sum(_score(p["prediction"], r["answer"]) for p, r in zip(ev["predictions"], test))
            assert report["table"][f][m]["accuracy"] == right / len(test)
    # CoT loss: transformers' own mean token loss over one batch of every held-out conversation, the labels
    # being the answer's tokens and <|im_end|>, found here by tokenizing the answer on its own.
    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    from PIL import Image
    for f, m, path in (("close", "base", family.path("close")), ("far", "sft", out / "models" / "far" / "sft")):
        processor = transformers.AutoProcessor.from_pretrained(path)
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["messages"][0]["content"][7:]}]},
             {"role": "assistant", "content": r["messages"][1]["content"]}], tokenize=False) for r in heldout]
        images = [Image.open(out / "data" / r["images"][0]).convert("RGB") for r in heldout]
        enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = torch.full_like(enc["input_ids"], -100)
        for i, r in enumerate(heldout):
            answer = processor.tokenizer(r["messages"][1]["content"] + "<|im_end|>").input_ids
            n = int(enc["attention_mask"][i].sum()) - 1  # the template's final "\n" is not trained
            assert enc["input_ids"][i, n - len(answer):n].tolist() == answer
            labels[i, n - len(answer):n] = enc["input_ids"][i, n - len(answer):n]
        with torch.no_grad():
            want = float(model(**enc, labels=labels).loss)
        assert report["table"][f][m]["cot_loss"] == pytest.approx(want, rel=1e-5)


def test_bad_settings_are_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", str(tmp_path / "out"), "--steps", "0", "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "steps must be at least 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(SystemExit) as exc:
        main(["demo", str(tmp_path / "out"), "--methods", "sft,bogus", "--cache", str(tmp_path / "cache")])
    assert exc.value.code == 1 and "unknown method bogus" in capsys.readouterr().err


def test_existing_output_is_refused(demo, capsys):
    out, _, _, _ = demo
    with pytest.raises(SystemExit) as exc:
        main(["demo", str(out), *ARGS])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "already exists" in err and "--force" in err
