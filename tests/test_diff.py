"""deltakit diff: every figure against plain float64 torch formulas on fully loaded tensors; reports; bad input."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit.cli import main
from deltakit.diagnostics import CLOSE_COSINE, CLOSE_REL_L2, FAR_COSINE, FAR_REL_L2, diff, verdict
from deltakit.errors import IncompatibleError
from deltakit.tiny import save_partner_llm

LAYERS = 3
KIND = [(r"self_attn\.([qkvo])_proj", "attn.{}"), (r"mlp\.(gate|up|down)_proj", "mlp.{}"), (r"layernorm|^norm", "norm"),
        (r"embed_tokens", "embed"), (r"lm_head", "lm_head")]


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _text(folder: Path) -> dict[str, torch.Tensor]:
    """Canonical name -> float64 tensor for the text tower of a Qwen-layout checkpoint, mapped by hand."""
    return {k.removeprefix("model."): v.double() for k, v in _load(folder).items() if not k.startswith(("visual.", "model.visual."))}


def _kind(name: str) -> str:
    for pattern, kind in KIND:
        m = re.search(pattern, name)
        if m:
            return kind.format(*m.groups())
    raise AssertionError(name)


def _ref(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    l2 = (a - b).norm().item()
    if na == 0:
        return {"l2": l2, "norm_a": na, "norm_b": nb}
    return {"cosine": (a @ b).item() / (na * nb), "l2": l2, "norm_a": na, "norm_b": nb, "rel_l2": l2 / na}


def _check(stats, want: dict[str, float]) -> None:
    for k, v in want.items():
        assert getattr(stats, k) == pytest.approx(v, rel=1e-6, abs=1e-9), k


@pytest.fixture(scope="module")
def vl(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen2_5_vl", layers=LAYERS, max_shard_size="40KB")


@pytest.fixture(scope="module")
def partners(vl, tmp_path_factory) -> dict[torch.dtype, Path]:
    root = tmp_path_factory.mktemp("diff")
    return {dt: save_partner_llm(vl, root / str(dt), noise=0.3, dtype=dt) for dt in (torch.bfloat16, torch.float16)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [97, 1 << 18])
def test_every_figure_matches_float64_formulas(vl, partners, dtype, chunk):
    llm = partners[dtype]
    report = diff(vl, llm, threads=3, block_elements=chunk)
    a, b = _text(vl), _text(llm)
    assert a.keys() == b.keys()
    biases_a_zero = {k for k, v in a.items() if not v.any()}
    assert {t.canonical for t in report.tensors} == set(a)
    assert report.only_a == report.only_b == [] and report.shape_mismatch == []
    for t in report.tensors:
        assert t.key_a.endswith(t.canonical) and t.key_b.endswith(t.canonical)
        want = _ref(a[t.canonical], b[t.canonical])
        if t.canonical in biases_a_zero:  # |A| = 0: cosine and relative L2 are undefined
            assert math.isnan(t.stats.cosine) and math.isnan(t.stats.rel_l2)
            _check(t.stats, want)
        else:
            _check(t.stats, want)
    for i in range(LAYERS):
        names = sorted(n for n in a if n.startswith(f"layers.{i}."))
        _check(report.layers[i], _ref(torch.cat([a[n].flatten() for n in names]), torch.cat([b[n].flatten() for n in names])))
    for kind, stats in report.kinds.items():
        names = sorted(n for n in a if _kind(n) == kind)
        _check(stats, _ref(torch.cat([a[n].flatten() for n in names]), torch.cat([b[n].flatten() for n in names])))
    assert set(report.kinds) == {_kind(n) for n in a}
    names = sorted(a)
    _check(report.overall, _ref(torch.cat([a[n].flatten() for n in names]), torch.cat([b[n].flatten() for n in names])))
    layer_cos = sorted(_ref(torch.cat([a[n].flatten() for n in a if n.startswith(f"layers.{i}.")]),
                            torch.cat([b[n].flatten() for n in a if n.startswith(f"layers.{i}.")]))["cosine"] for i in range(LAYERS))
    assert report.median_layer_cosine == pytest.approx(layer_cos[LAYERS // 2], rel=1e-9)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_next", "idefics2", "idefics3"])
def test_mllm_against_its_partner_llm_across_layouts(tiny_checkpoint, tmp_path, family):
    mllm = tiny_checkpoint(family)
    llm = save_partner_llm(mllm, tmp_path / "llm", noise=0.1)
    a, b = _load(mllm), _load(llm)
    report = diff(mllm, llm)
    assert report.only_a == report.only_b == [] and report.shape_mismatch == []
    assert {t.key_b for t in report.tensors} == set(b)  # every LLM tensor found its MLLM counterpart
    for t in report.tensors:
        assert t.key_a in a and not t.key_a.startswith(("model.vision", "vision", "model.visual", "visual"))
        _check(t.stats, _ref(a[t.key_a], b[t.key_b]))
    assert report.verdict == "close"


def test_identical_models_are_close_and_exact(vl):
    report = diff(vl, vl)
    assert report.verdict == "close"
    assert report.median_layer_l2 == 0.0 and report.overall.l2 == 0.0
    assert report.median_layer_cosine == pytest.approx(1.0, abs=1e-12)


def test_verdict_thresholds():
    assert (CLOSE_COSINE, FAR_COSINE) == (0.95, 0.85)
    assert CLOSE_REL_L2 == pytest.approx(math.sqrt(0.1)) and FAR_REL_L2 == pytest.approx(math.sqrt(0.3))
    assert verdict(0.99, 0.05) == "close"  # LLaVA/Idefics-like pairs in the paper's Figure 2
    assert verdict(0.95, 0.31) == "close"
    assert verdict(0.9499, 0.2) == "moderate"
    assert verdict(0.97, 0.40) == "moderate"  # cosine close, but the norms drifted
    assert verdict(0.85, 0.5) == "moderate"
    assert verdict(0.70, 0.77) == "far"  # Qwen-like pairs in Figure 2
    assert verdict(0.99, 0.60) == "far"
    assert verdict(float("nan"), 0.1) == "far"


def test_noise_level_moves_the_verdict(vl, tmp_path):
    # B = A + noise * std(A) * N(0, 1): a weight's cosine is ~1/sqrt(1 + noise^2) (0.995 for 0.1, 0.707 for 1.0);
    # a layer's is lower at large noise, its zero q/k/v biases gaining all-noise values in B
    near = diff(vl, save_partner_llm(vl, tmp_path / "near", noise=0.1))
    far = diff(vl, save_partner_llm(vl, tmp_path / "far", noise=1.0))
    assert near.verdict == "close" and near.median_layer_cosine == pytest.approx(1 / math.sqrt(1.01), abs=0.01)
    assert far.verdict == "far" and far.median_layer_cosine < 1 / math.sqrt(2)


def test_vocab_mismatch_and_layers_on_one_side(tiny_checkpoint):
    a_dir = tiny_checkpoint("qwen2", layers=3)
    b_dir = tiny_checkpoint("qwen2", seed=1, layers=2, vocab=600)
    report = diff(a_dir, b_dir)
    a, b = _text(a_dir), _text(b_dir)
    rec = {t.canonical: t for t in report.tensors}
    for name in ("embed_tokens.weight", "lm_head.weight"):
        t = rec[name]
        assert (t.shape_a, t.shape_b, t.rows_compared) == ((512, 32), (600, 32), 512)
        _check(t.stats, _ref(a[name], b[name][:512]))
        assert any(name in n and "B has 88 extra rows" in n for n in report.notes)
    assert report.only_a == sorted((n for n in a if n.startswith("layers.2.")))
    assert report.only_b == []
    assert sorted(report.layers) == [0, 1]


def test_tied_embeddings_compare_through_embed(tiny_checkpoint):
    a_dir = tiny_checkpoint("qwen2", tie=True)
    b_dir = tiny_checkpoint("qwen2", seed=1)
    a, b = _text(a_dir), _text(b_dir)
    assert "lm_head.weight" not in a
    report = diff(a_dir, b_dir)
    t = {t.canonical: t for t in report.tensors}["lm_head.weight"]
    assert (t.key_a, t.key_b) == ("model.embed_tokens.weight", "lm_head.weight")
    _check(t.stats, _ref(a["embed_tokens.weight"], b["lm_head.weight"]))
    assert any("A ties lm_head to embed_tokens" in n for n in report.notes)
    both = diff(a_dir, a_dir)
    assert "lm_head.weight" not in {t.canonical for t in both.tensors}


def _without_config(folder, tmp_path):
    """The same shards under a config that states nothing about the architecture."""
    bare = tmp_path / f"bare-{folder.name}"
    bare.mkdir()
    for f in folder.glob("*.safetensors*"):
        shutil.copy(f, bare / f.name)  # a copy: links out of a model folder are refused
    (bare / "config.json").write_text('{"model_type": "qwen2"}')
    return bare


def test_lineage_check_then_shape_mismatch_is_reported(tiny_checkpoint, tmp_path):
    a, b = tiny_checkpoint("qwen2"), tiny_checkpoint("qwen2", intermediate=48)
    with pytest.raises(IncompatibleError, match=r"cannot share a base model: intermediate_size 64 vs 48;"):
        diff(a, b)
    # when the configs do not say, the tensors do: every MLP weight is reported, the rest compared
    report = diff(a, _without_config(b, tmp_path))
    assert sorted(n for n, _, _ in report.shape_mismatch) == sorted(
        f"layers.{i}.mlp.{m}_proj.weight" for i in range(2) for m in ("gate", "up", "down"))
    assert "mlp.up" not in report.kinds and "attn.q" in report.kinds


def test_nan_is_warned_marked_and_left_out(vl, partners, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(vl, bad)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = next(f for f in bad.glob("*.safetensors") if name in load_file(f))
    tensors = load_file(shard)
    tensors[name][3, :5] = float("nan")
    tensors[name][0, 0] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    llm = partners[torch.bfloat16]
    report = diff(bad, llm)
    t = {t.canonical: t for t in report.tensors}["layers.1.mlp.up_proj.weight"]
    assert (t.nonfinite_a, t.nonfinite_b) == (6, 0)
    assert len(report.warnings) == 1 and name in report.warnings[0] and "6 NaN/Inf in A" in report.warnings[0]
    a, b = _text(bad), _text(llm)
    names = sorted(n for n in a if n.startswith("layers.1.") and n != "layers.1.mlp.up_proj.weight")
    _check(report.layers[1], _ref(torch.cat([a[n].flatten() for n in names]), torch.cat([b[n].flatten() for n in names])))
    out = tmp_path / "r.json"
    main(["diff", str(bad), str(llm), "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["summary"]["nonfinite_tensors"] == ["layers.1.mlp.up_proj.weight"]
    assert f"warning: layers.1.mlp.up_proj.weight: 6 NaN/Inf in A ({name})" in capsys.readouterr().err


def test_cli_json_csv_plot(vl, partners, tmp_path, capsys):
    llm = partners[torch.bfloat16]
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "png")}
    main(["diff", str(vl), str(llm), "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["png"]),
          "--per-tensor"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "per layer" in shown and "per module kind" in shown and "per tensor" in shown
    data = json.loads(paths["json"].read_text())
    assert data["a"] == {"path": str(vl), "family": "qwen2_5_vl"} and data["b"]["family"] == "qwen2"
    a, b = _text(vl), _text(llm)
    # The summary from float64 formulas: per-layer cosine and relative L2, their medians, the verdict by the rule
    # (far below cosine 0.85 or above rel. L2 sqrt(0.3), close from 0.95 and up to sqrt(0.1), moderate between).
    layers = [_ref(torch.cat([a[n].flatten() for n in sorted(a) if n.startswith(f"layers.{i}.")]),
                   torch.cat([b[n].flatten() for n in sorted(a) if n.startswith(f"layers.{i}.")])) for i in range(LAYERS)]
    cos = sorted(r["cosine"] for r in layers)[LAYERS // 2]
    rel = sorted(r["rel_l2"] for r in layers)[LAYERS // 2]
    want = "far" if cos < 0.85 or rel > math.sqrt(0.3) else "close" if cos >= 0.95 and rel <= math.sqrt(0.1) else "moderate"
    summary = data["summary"]
    assert summary["median_layer_cosine"] == pytest.approx(cos, rel=1e-6)
    assert summary["median_layer_rel_l2"] == pytest.approx(rel, rel=1e-6)
    assert summary["verdict"] == want and " ".join(summary["verdict_text"].split()) in shown
    assert [r["layer"] for r in data["layers"]] == list(range(LAYERS))
    for r, ref in zip(data["layers"], layers):
        assert r["cosine"] == pytest.approx(ref["cosine"], rel=1e-6) and r["l2"] == pytest.approx(ref["l2"], rel=1e-6)
    assert len(data["tensors"]) == len(a)
    for r in data["tensors"]:
        assert r["key_a"] == "model." + r["canonical"] or r["canonical"] == r["key_a"] == "lm_head.weight"
        assert r["key_b"] == "model." + r["canonical"] or r["canonical"] == r["key_b"] == "lm_head.weight"
        want = _ref(a[r["canonical"]], b[r["canonical"]])
        assert r["l2"] == pytest.approx(want["l2"], rel=1e-6)
        if a[r["canonical"]].any():
            assert r["cosine"] == pytest.approx(want["cosine"], rel=1e-6)
        else:
            assert r["cosine"] is None  # NaN (|A| = 0) is written as null
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["canonical"] for r in rows] == [r["canonical"] for r in data["tensors"]]
    assert {"key_a", "key_b", "layer", "kind", "shape_a", "cosine", "l2", "norm_a", "norm_b", "rel_l2"} <= set(rows[0])
    for row in rows:  # the CSV against the formulas too
        want = _ref(a[row["canonical"]], b[row["canonical"]])
        assert row["shape_a"] == "x".join(map(str, a[row["canonical"]].shape))
        for k in ("l2", "norm_a", "norm_b", "cosine", "rel_l2"):
            if k in want:
                assert float(row[k]) == pytest.approx(want[k], rel=1e-6, abs=1e-9), (row["canonical"], k)
            else:
                assert row[k] in ("", "nan"), (row["canonical"], k, row[k])  # |A| = 0: undefined
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


# -------------------------------------------------------------------------------------------------- bad input
def _error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def sharded_copy(vl, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(vl, out)
    return out


def test_missing_shard(sharded_copy, vl, capsys):
    victim = sorted(sharded_copy.glob("model-*.safetensors"))[-1]
    victim.unlink()
    assert f"shard {victim.name!r} named in model.safetensors.index.json is missing" in _error(
        ["diff", str(sharded_copy), str(vl)], capsys)
    (sharded_copy / "model.safetensors.index.json").unlink()
    assert f"shard {victim.name} is missing" in _error(["diff", str(vl), str(sharded_copy)], capsys)


def test_index_naming_a_missing_file(sharded_copy, vl, capsys):
    index = json.loads((sharded_copy / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-extra.safetensors"
    (sharded_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "shard 'model-extra.safetensors' named in" in _error(["diff", str(sharded_copy), str(vl)], capsys)


def test_truncated_and_corrupt_shard(sharded_copy, vl, capsys):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert "truncated file" in _error(["diff", str(sharded_copy), str(vl)], capsys)
    shard.write_bytes(data[:8] + b"\xff" * 32 + data[40:])
    assert "corrupt safetensors header" in _error(["diff", str(sharded_copy), str(vl)], capsys)


def test_not_a_model_and_nothing_in_common(vl, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    assert "not a model folder" in _error(["diff", str(empty), str(vl)], capsys)
    assert "no such file or folder" in _error(["diff", str(tmp_path / "nope"), str(vl)], capsys)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    save_file({"model.layers.0.adapter.weight": torch.zeros(2, 2)}, odd / "model.safetensors")
    assert "have no text-tower tensor in common" in _error(["diff", str(odd), str(vl)], capsys)
    with pytest.raises(IncompatibleError):
        main(["--debug", "diff", str(odd), str(vl)])


def test_pickle_only_checkpoint(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("qwen2")
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(src / "config.json", binary / "config.json")
    torch.save(load_file(src / "model.safetensors"), binary / "pytorch_model.bin")
    other = tiny_checkpoint("qwen2", seed=1)
    assert "--allow-pickle" in _error(["diff", str(binary), str(other)], capsys)
    out = tmp_path / "r.json"
    main(["diff", str(binary), str(other), "--allow-pickle", "--json", str(out)])
    got = json.loads(out.read_text())["summary"]["overall"]
    a, b = _text(src), _text(other)
    names = sorted(a)
    want = _ref(torch.cat([a[n].flatten() for n in names]), torch.cat([b[n].flatten() for n in names]))
    for k, v in want.items():  # the unpickled weights give the float64 figures of the safetensors ones
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
