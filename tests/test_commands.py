"""The shell recipes in commands/ run end to end on tiny stand-ins named like the real checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltakit.data import write_demo_data
from deltakit.tiny import save_partner_llm, save_tiny
from deltakit.tiny_processor import save_tiny_processor

COMMANDS = Path(__file__).resolve().parents[1] / "commands"


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


def test_figure2_pairs(models, tmp_path):
    run_recipe("diff-paper-pairs.sh", {"MODELS": str(models), "RUNS": str(tmp_path)})
    reports = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert len(reports) == 4 and len(list(tmp_path.glob("*.png"))) == 4 and len(list(tmp_path.glob("*.csv"))) == 4
    assert reports["Qwen2.5-VL-7B-Instruct--DeepSeek-R1-Distill-Qwen-7B"]["summary"]["verdict"] == "far"
    assert reports["Qwen2-VL-7B-Instruct--Qwen2-Math-7B"]["summary"]["verdict"] == "far"
    # noise 0.05 of each tensor's std: cosine ~ 1 / sqrt(1 + 0.05^2) = 0.9988 per weight matrix
    assert reports["llava-v1.6-mistral-7b-hf--MetaMath-Mistral-7B"]["summary"]["verdict"] == "close"


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
    # 2 layers x (q, k, v, o weights + q, k, v biases + gate, up, down) carry the prior
    drift = json.loads((runs / "drift.json").read_text())
    assert drift["drift_tensors"] == 2 * 10 and drift["steps"] == 3
    assert json.loads((runs / "sft.json").read_text())["drift_tensors"] == 0
    for name in ("Qwen2.5-VL-7B-Instruct", "br2v", "sft", "drift"):
        report = json.loads((runs / f"eval-{name}.json").read_text())
        assert report["examples"] == 4 and len(report["predictions"]) == 4


def test_priors_of_the_2026_pairs(tmp_path):
    models = tmp_path / "models"
    for family, mllm, llm in (("qwen3_vl", "Qwen3-VL-8B-Instruct", "Qwen3-8B"),
                              ("qwen3_vl_moe", "Qwen3-VL-30B-A3B-Instruct", "Qwen3-30B-A3B"),
                              ("internvl", "InternVL3-8B-hf", "DeepSeek-R1-Distill-Qwen-7B"),
                              ("mllama", "Llama-3.2-11B-Vision", "DeepSeek-R1-Distill-Llama-8B")):
        save_tiny(family, models / mllm)
        save_partner_llm(models / mllm, models / llm, noise=1.0)
    runs = tmp_path / "runs"
    run_recipe("prior-2026-pairs.sh", {"MODELS": str(models), "RUNS": str(runs)})
    from deltakit.prior import Prior

    # tiny towers: 2 layers (mllama: 5, of which 2 cross-attention); q,k,v,o (+3 biases for InternVL's Qwen2
    # tower) and 3 MLP weights per layer, or for the MoE 3 per expert x 4 experts
    expected = {"Qwen3-VL-8B-Instruct": ("qwen3_vl", 2 * 7), "Qwen3-VL-30B-A3B-Instruct": ("qwen3_vl_moe", 2 * (4 + 4 * 3)),
                "InternVL3-8B-hf": ("internvl", 2 * 10), "Llama-3.2-11B-Vision": ("mllama", 3 * 7)}
    for mllm, (family, n) in expected.items():
        pair = next(runs.glob(f"{mllm}--*.prior.safetensors"))
        prior = Prior.open(pair)
        assert (prior.family, len(prior.names)) == (family, n)
        prior.close()
        report = json.loads(next(runs.glob(f"{mllm}--*.diff.json")).read_text())
        assert report["a"]["family"] == family
        assert len(report["experts"]) == (2 * 4 if family == "qwen3_vl_moe" else 0)
