"""The study's table and figures come from its JSON alone (analyses/study.py --from-json), with the numbers right."""

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image
from scipy import stats

from deltakit.demo.settings import LABELS, METHODS, SEEDED

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("study_script", ROOT / "analyses" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy(fam: str, method: str, seed: int) -> float:
    """Made-up accuracies: merges help the close family only; seeded methods vary with the seed."""
    base = {"close": 0.30, "far": 0.20}[fam]
    bump = 0.1 * (METHODS.index(method) % 3) if method != "base" else 0.0
    if fam == "far" and method in ("linear", "task_arithmetic", "ties", "dare_ties", "layer_swap"):
        bump = -0.05
    return round(base + bump + (0.02 * seed if method in SEEDED else 0.0), 3)


def config(seed: int) -> dict:
    layers = {"close": {str(i): {"cosine": 0.99 - 0.01 * i, "l2": 1.0 + i, "rel_l2": 0.1} for i in range(4)},
              "far": {str(i): {"cosine": 0.6 + 0.02 * i, "l2": 10.0 + i, "rel_l2": 0.8} for i in range(4)}}
    pairs = {f: {"verdict": v, "median_layer_cosine": c, "median_layer_l2": 1.0, "median_layer_rel_l2": r, "overall_cosine": c,
                 "layers": layers[f]} for f, v, c, r in (("close", "close", 0.985, 0.1), ("far", "far", 0.63, 0.8))}
    methods = METHODS if seed == 0 else SEEDED  # later seeds rerun only what depends on the seed
    return {"seed": seed, "settings": {"n_test": 500}, "family": {}, "pairs": pairs,
            "results": {f: {m: {"accuracy": accuracy(f, m, seed), "cot_loss": 1.0 + 0.1 * seed + 0.01 * i}
                            for i, m in enumerate(methods)} for f in ("close", "far")}}


def test_table_and_figures_from_json(tmp_path):
    json_dir = tmp_path / "study"
    json_dir.mkdir()
    for seed in (0, 1, 2):
        (json_dir / f"seed-{seed}.json").write_text(json.dumps(config(seed)))
    page = tmp_path / "study.md"
    page.write_text("# Study\n\nprose before\n\n<!-- study:table -->\nold table\n<!-- /study:table -->\n\nprose after\n")
    load_script().main(["--from-json", str(json_dir), "--page", str(page), "--figures", str(tmp_path / "fig")])
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Study\n\nprose before") and text.endswith("prose after\n")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for m in METHODS:
        cells = [c.strip() for c in rows[LABELS[m]].strip("|").split("|")]
        for fam, acc_cell, loss_cell in (("close", cells[1], cells[2]), ("far", cells[3], cells[4])):
            runs = [accuracy(fam, m, s) for s in ((0, 1, 2) if m in SEEDED else (0,))]
            mean = sum(runs) / len(runs)
            if m in SEEDED:  # mean +- t(0.975, 2) * s / sqrt(3), in percent
                sd = (sum((r - mean) ** 2 for r in runs) / (len(runs) - 1)) ** 0.5
                half = stats.t.ppf(0.975, len(runs) - 1) * sd / len(runs) ** 0.5
                assert acc_cell == f"{100 * mean:.1f} ± {100 * half:.1f}", (m, fam)
            else:
                assert acc_cell == f"{100 * mean:.1f}", (m, fam)
            i = METHODS.index(m) if m not in SEEDED else None
            losses = [1.0 + 0.1 * s + 0.01 * (SEEDED.index(m) if s else METHODS.index(m)) for s in (0, 1, 2)] \
                if m in SEEDED else [1.0 + 0.01 * i]
            assert loss_cell == f"{sum(losses) / len(losses):.3f}", (m, fam)
    # diff verdicts and whether they predicted which family merging helps (close: merges above base; far: below)
    assert "*close* (0.985 / 0.100)" in text and "*far* (0.630 / 0.800)" in text
    assert text.count("prediction **right**") == 2
    agg = json.loads((json_dir / "study.json").read_text())
    assert agg["seeds"] == [0, 1, 2] and agg["verdicts"]["far"]["merges_above_base"] == []
    assert agg["table"]["close"]["sft"]["runs"] == [accuracy("close", "sft", s) for s in (0, 1, 2)]
    for name in ("study_pairs.png", "study_accuracy.png"):
        with Image.open(tmp_path / "fig" / name) as im:
            assert im.size[0] > 600 and im.size[1] > 300
            assert len(set(im.convert("L").getdata())) > 20  # something was drawn


def test_no_json_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--from-json", str(tmp_path), "--page", str(tmp_path / "p.md"), "--figures", str(tmp_path)])
    assert "no seed-*.json" in str(exc.value)


def test_a_merge_helps_only_beyond_the_test_sets_sampling_error():
    from deltakit.demo.study import aggregate

    configs = [config(s) for s in (0, 1, 2)]
    close = configs[0]["results"]["close"]
    close["linear"]["accuracy"] = 0.33  # +3 points on 500 questions: 1.96 * sqrt((.33 * .67 + .3 * .7) / 500) = 5.8
    close["ties"]["accuracy"] = 0.36    # +6 points: beyond it
    for m in ("task_arithmetic", "layer_swap"):
        close[m]["accuracy"] = 0.2
    for c in configs:
        for fam in ("close", "far"):
            c["results"][fam]["dare_ties"]["accuracy"] = 0.1
    v = aggregate(configs)["verdicts"]["close"]
    assert v["merges_above_base"] == ["ties"]
    assert abs(v["margins"]["linear"] - 1.96 * ((0.33 * 0.67 + 0.3 * 0.7) / 500) ** 0.5) < 1e-12
