"""The shell recipes in commands/ run end to end on tiny stand-ins named like the real checkpoints."""

import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from deltakit.demo.samples import write_demo_data
from deltakit.evaluate import load_bench
from deltakit.tiny import save_partner_llm, save_tiny
from deltakit.tiny_processor import save_tiny_processor
from test_eval import reference_outputs

COMMANDS = Path(__file__).resolve().parents[1] / "commands"


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


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Tiny models under the folder names the recipes expect; Qwen partners far (noise 1), the LLaVA one close (0.05)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny("qwen2_5_vl", root / "Qwen2.5-VL-7B-Instruct")
    save_tiny_processor(root / "Qwen2.5-VL-7B-Instruct", "qwen2_5_vl")
    save_partner_llm(root / "Qwen2.5-VL-7B-Instruct", root / "DeepSeek-R1-Distill-Qwen-7B", noise=1.0)
    save_tiny("qwen2_vl", root / "Qwen2-VL-7B-Instruct", seed=1)
    save_partner_llm(root / "Qwen2-VL-7B-Instruct", root / "Qwen2-Math-7B", noise=1.0)
    save_tiny("llava_next", root / "llava-v1.6-mistral-7b-hf", seed=2)
    save_partner_llm(root / "llava-v1.6-mistral-7b-hf", root / "MetaMath-Mistral-7B", noise=0.05)
    save_tiny("idefics2", root / "idefics2-8b", seed=3)
    return root


def run_recipe(script: str, env: dict[str, str]) -> None:
    """Run ``commands/<script>`` with the deltakit of this interpreter first on PATH."""
    full = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(COMMANDS / script)], env=full, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_shell_recipe_parses():
    scripts = sorted(COMMANDS.glob("*.sh"))
    assert len(scripts) >= 2
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """cosine, |A - B| and |A - B| / |A| in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return {"cosine": float(a @ b / (a.norm() * b.norm())), "l2": float((a - b).norm()), "rel_l2": float((a - b).norm() / a.norm())}


PAIRS = {"Qwen2.5-VL-7B-Instruct": "DeepSeek-R1-Distill-Qwen-7B", "Qwen2-VL-7B-Instruct": "Qwen2-Math-7B",
         "llava-v1.6-mistral-7b-hf": "MetaMath-Mistral-7B", "idefics2-8b": "MetaMath-Mistral-7B"}


def test_figure2_pairs(models, tmp_path):
    run_recipe("diff-paper-pairs.sh", {"MODELS": str(models), "RUNS": str(tmp_path)})
    verdicts = {}
    for mllm, llm in PAIRS.items():
        name = f"{mllm}--{llm}"
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        a, b = _weights(models / mllm), _weights(models / llm)
        # Every figure from the two checkpoints' tensors (as the report pairs their keys), in float64.
        records = report["tensors"]
        assert {r["key_b"] for r in records} == set(b)  # every LLM tensor is compared
        for r in records:
            want = _stats(a[r["key_a"]], b[r["key_b"]])
            assert r["l2"] == pytest.approx(want["l2"], rel=1e-6), r["canonical"]
            if a[r["key_a"]].any():
                assert r["cosine"] == pytest.approx(want["cosine"], rel=1e-6), r["canonical"]
        overall = _stats(torch.cat([a[r["key_a"]].flatten() for r in records]), torch.cat([b[r["key_b"]].flatten() for r in records]))
        assert report["summary"]["overall"]["cosine"] == pytest.approx(overall["cosine"], rel=1e-6)
        with open(tmp_path / f"{name}.csv") as f:
            rows = {row["canonical"]: row for row in csv.DictReader(f)}
        assert set(rows) == {r["canonical"] for r in records}
        for r in records:
            assert float(rows[r["canonical"]]["l2"]) == pytest.approx(_stats(a[r["key_a"]], b[r["key_b"]])["l2"], rel=1e-6)
        # The verdict from the median per-layer figures and the documented thresholds (docs/diff.md).
        layers = sorted({int(m[1]) for r in records if (m := re.match(r"layers\.(\d+)\.", r["canonical"]))})
        per_layer = [_stats(torch.cat([a[r["key_a"]].flatten() for r in records if r["canonical"].startswith(f"layers.{i}.")]),
                            torch.cat([b[r["key_b"]].flatten() for r in records if r["canonical"].startswith(f"layers.{i}.")]))
                     for i in layers]
        cos = statistics.median(x["cosine"] for x in per_layer)  # 2 layers: the mean of the two
        rel = statistics.median(x["rel_l2"] for x in per_layer)
        assert report["summary"]["median_layer_cosine"] == pytest.approx(cos, rel=1e-6)
        verdicts[mllm] = "far" if cos < 0.85 or rel > math.sqrt(0.3) else "close" if cos >= 0.95 and rel <= math.sqrt(0.1) else "moderate"
        assert report["summary"]["verdict"] == verdicts[mllm], (mllm, cos, rel)
    # Qwen partners at noise 1 (cosine ~ 1/sqrt(2) per weight), LLaVA's at noise 0.05 (~ 1/sqrt(1 + 0.05^2) = 0.9988)
    assert verdicts["Qwen2.5-VL-7B-Instruct"] == verdicts["Qwen2-VL-7B-Instruct"] == "far"
    assert verdicts["llava-v1.6-mistral-7b-hf"] == "close"


@pytest.mark.slow
def test_paper_pipeline(models, tmp_path):
    """diff, BR2V, prior, SFT and DRIFT (torchrun, FSDP2, one CPU process) and four evals, as the paper runs them."""
    write_demo_data(tmp_path / "data", n=32, n_bench=4)
    runs = tmp_path / "runs"
    run_recipe("drift-qwen2.5-vl-7b-r1.sh", {
        "MODELS": str(models), "TRAIN": str(tmp_path / "data" / "train.jsonl"), "BENCH": str(tmp_path / "data" / "bench.jsonl"),
        "RUNS": str(runs), "NGPU": "1", "MAX_NEW_TOKENS": "8"})
    vl = load_file(models / "Qwen2.5-VL-7B-Instruct" / "model.safetensors")
    r1 = load_file(models / "DeepSeek-R1-Distill-Qwen-7B" / "model.safetensors")
    br2v = {k: v for f in (runs / "br2v").glob("*.safetensors") for k, v in load_file(f).items()}
    key = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(br2v[key], (0.9 * vl[key] + 0.1 * r1[key]).bfloat16())
    # The prior: 2 layers x (q, k, v, o weights + q, k, v biases + gate, up, down), D = R1 - VL stored in bf16.
    prior = load_file(runs / "prior-r1.safetensors")
    names = {f"layers.{i}.{t}" for i in range(2) for t in [f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")]
             + ["self_attn.o_proj.weight"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]}
    assert set(prior) == names
    for n, d in prior.items():
        assert torch.equal(d, (r1["model." + n].float() - vl["model." + n].float()).bfloat16()), n
    drift = json.loads((runs / "drift.json").read_text())
    assert drift["drift_tensors"] == len(names) and drift["steps"] == 3  # 32 examples, global batch 32, 3 epochs
    assert json.loads((runs / "sft.json").read_text())["drift_tensors"] == 0
    # The prior acted: DRIFT's update of the prior's tensors leans toward D more than SFT's of the same data.
    sft, dft = (_weights(runs / m) for m in ("sft", "drift"))

    def cos_with_d(w):
        u = torch.cat([(w["model." + n].double() - vl["model." + n].double()).flatten() for n in names])
        d = torch.cat([prior[n].double().flatten() for n in names])
        return float(u @ d / (u.norm() * d.norm()))

    assert cos_with_d(dft) > cos_with_d(sft) + 0.05, (cos_with_d(dft), cos_with_d(sft))  # measured 0.135 vs 0.004
    records = [json.loads(line) for line in (tmp_path / "data" / "bench.jsonl").read_text().splitlines()]
    for name in ("Qwen2.5-VL-7B-Instruct", "br2v", "sft", "drift"):
        report = json.loads((runs / f"eval-{name}.json").read_text())
        outputs = [p["prediction"] for p in report["predictions"]]
        assert [p["id"] for p in report["predictions"]] == [r["id"] for r in records]
        right = sum(hand_score(o, r) for o, r in zip(outputs, records))  # scored here from the outputs
        assert (report["examples"], report["correct"]) == (4, right)
        if name == "drift":  # the outputs themselves: greedy decoding written out, with transformers
            model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(runs / name, dtype=torch.float32).eval()
            processor = transformers.AutoProcessor.from_pretrained(runs / name)
            assert outputs == reference_outputs(model, processor, load_bench(tmp_path / "data" / "bench.jsonl"), 8)


def test_priors_of_the_2026_pairs(tmp_path):
    """The recipe on its two pairs with MLLM-specific layouts (fused MoE experts, cross-attention layers): the
    others run the same two commands."""
    models = tmp_path / "models"
    for family, mllm, llm in (("qwen3_vl_moe", "Qwen3-VL-30B-A3B-Instruct", "Qwen3-30B-A3B"),
                              ("mllama", "Llama-3.2-11B-Vision", "DeepSeek-R1-Distill-Llama-8B")):
        save_tiny(family, models / mllm)
        save_partner_llm(models / mllm, models / llm, noise=1.0)
    runs = tmp_path / "runs"
    run_recipe("prior-2026-pairs.sh", {"MODELS": str(models), "RUNS": str(runs),
                                       "ONLY": "Qwen3-VL-30B-A3B-Instruct Llama-3.2-11B-Vision"})
    from deltakit.prior import Prior

    # tiny towers: 2 layers (mllama: 5, of which 2 cross-attention); q,k,v,o and 3 MLP weights per layer, for the
    # MoE 3 per expert x 4 experts
    expected = {"Qwen3-VL-30B-A3B-Instruct": ("qwen3_vl_moe", 2 * (4 + 4 * 3)), "Llama-3.2-11B-Vision": ("mllama", 3 * 7)}
    assert len(list(runs.glob("*.prior.safetensors"))) == 2
    for mllm, (family, n) in expected.items():
        pair = next(runs.glob(f"{mllm}--*.prior.safetensors"))
        prior = Prior.open(pair)
        assert (prior.family, len(prior.names)) == (family, n)
        prior.close()
        report = json.loads(next(runs.glob(f"{mllm}--*.diff.json")).read_text())
        assert report["a"]["family"] == family
        assert len(report["experts"]) == (2 * 4 if family == "qwen3_vl_moe" else 0)
