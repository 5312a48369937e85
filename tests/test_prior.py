"""deltakit prior: D against direct subtraction of fully loaded tensors, selection, normalization, two-model
mode, each compression against a torch/numpy reference, inspect, validation errors, binding with DriftBias."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deltakit.cli import main
from deltakit.drift import DriftBias
from deltakit.errors import DeltakitError, IncompatibleError
from deltakit.io.writer import SafetensorsWriter, TensorSpec
from deltakit.prior import Prior, export_prior
from deltakit.tiny import build_tiny, save_partner_llm, save_tiny

LAYERS = 4
ATTN = [f"self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")] + ["self_attn.o_proj.weight"]
MLP = [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]

SUMS_REL = 1e-7
"""Norms are float32 row partials summed in float64 (deltakit.engine.sums): up to ~1e-8 relative, not float64-exact."""


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _disk(name: str) -> str:
    """On-disk key of a canonical name in the tiny checkpoints (transformers 5 saves Qwen2.5-VL's text tower as model.*)."""
    return name if name.startswith("lm_head") else "model." + name


def _names(layers, parts) -> set[str]:
    return {f"layers.{i}.{p}" for i in layers for p in parts}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prior")
    vl = save_tiny("qwen2_5_vl", root / "vl", layers=LAYERS)
    return {
        "root": root, "vl": vl,
        "llm": save_partner_llm(vl, root / "llm", noise=0.3, seed=1),
        "llm2": save_partner_llm(vl, root / "llm2", noise=0.3, seed=2),
        "vl16": save_tiny("qwen2_5_vl", root / "vl16", seed=3, layers=LAYERS, dtype=torch.bfloat16, max_shard_size="40KB"),
    }


@pytest.fixture(scope="module")
def sd(models) -> dict[str, dict[str, torch.Tensor]]:
    return {k: _load(models[k]) for k in ("vl", "llm", "llm2")}


@pytest.fixture(scope="module")
def full32(models) -> Path:
    out = models["root"] / "full32.safetensors"
    export_prior(models["vl"], models["llm"], out, dtype="float32")
    return out


def _direct(sd, name, plus="llm", minus="vl") -> torch.Tensor:
    return sd[plus][_disk(name)].float() - sd[minus][_disk(name)].float()


# ---------------------------------------------------------------------------------------------- D itself
def test_default_prior_is_direct_subtraction_with_metadata(models, sd, full32):
    stored = load_file(full32)
    assert set(stored) == _names(range(LAYERS), ATTN + MLP)
    for name, t in stored.items():
        assert t.dtype == torch.float32 and torch.equal(t, _direct(sd, name)), name
    meta = safe_open(str(full32), "pt").metadata()
    assert meta["format"] == "deltakit-prior" and meta["family"] == "qwen2_5_vl" and meta["dtype"] == "float32"
    sources = json.loads(meta["sources"])
    for role, model in (("mllm", "vl"), ("llm", "llm")):
        assert sources[role]["path"] == str(models[model].absolute())
        assert sources[role]["config_sha256"] == hashlib.sha256((models[model] / "config.json").read_bytes()).hexdigest()
    assert sources["llm"]["family"] == "qwen2" and json.loads(meta["modules"]) == ["attn", "mlp"]
    entries = json.loads(meta["tensors"])
    for name, e in entries.items():
        d, w = _direct(sd, name).double(), sd["vl"][_disk(name)].double()
        assert e["d_norm"] == pytest.approx(float(d.norm()), rel=SUMS_REL)
        assert e["w_norm"] == pytest.approx(float(w.norm()), rel=SUMS_REL)
        assert e["encoding"] == "full"
    small = full32.with_name("chunked.safetensors")
    export_prior(models["vl"], models["llm"], small, dtype="float32", block_elements=96)
    assert all(torch.equal(t, stored[n]) for n, t in load_file(small).items())
    prior = Prior.open(full32)
    assert prior.family == "qwen2_5_vl" and sorted(prior.names) == sorted(stored)
    for name in stored:  # Prior.get against D recomputed from the two checkpoints (safetensors, float32)
        assert prior.shape(name) == tuple(sd["vl"][_disk(name)].shape) and torch.equal(prior.get(name), _direct(sd, name)), name
    name = "layers.2.self_attn.k_proj.bias"
    assert prior.get(name, dtype=torch.float64).dtype == torch.float64


def _fidelity_from_stored(stored: torch.Tensor, d: torch.Tensor) -> tuple[float, float, float]:
    """cos(stored, D), |stored - D| / |D| and |stored| in float64: what a prior's header reports per tensor."""
    s, d = stored.double().reshape(-1), d.double().reshape(-1)
    return float(s @ d / (s.norm() * d.norm())), float((s - d).norm() / d.norm()), float(s.norm())


def test_reported_fidelity_is_that_of_the_stored_tensor(models, sd, full32, tmp_path):
    # The header's cosine, rel_error and stored_norm of each tensor, and the totals, recomputed here from the
    # stored tensor and D = LLM - MLLM of the float32 checkpoints. float32 storage is exact (cosine 1, error 0);
    # bf16 storage of the same D is not ("full" encoding, rounded): ~1e-6 below cosine 1, ~2e-3 relative error.
    bf16 = tmp_path / "bf16.safetensors"
    export_prior(models["vl"], models["llm"], bf16, dtype="bfloat16")
    for path, exact in ((full32, True), (bf16, False)):
        prior = Prior.open(path)
        stored = load_file(path)
        dot = d_sq = s_sq = err_sq = 0.0
        worst = 1.0
        for name, e in prior.entries.items():
            d = _direct(sd, name)
            assert stored[name].dtype == (torch.float32 if exact else torch.bfloat16) and e["encoding"] == "full"
            cos, rel, norm = _fidelity_from_stored(stored[name], d)
            if exact:
                assert cos == pytest.approx(1.0, abs=1e-12) and rel == 0.0
            else:
                assert 1e-7 < 1 - cos < 1e-5 and 1e-4 < rel < 1e-2, (name, cos, rel)
            assert e["cosine"] == pytest.approx(cos, abs=1e-7), name  # float32 partial sums (SUMS_REL)
            assert e["rel_error"] == pytest.approx(rel, rel=1e-5, abs=1e-12), name
            assert e["stored_norm"] == pytest.approx(norm, rel=SUMS_REL), name
            s64, d64 = stored[name].double(), d.double()
            dot, d_sq, s_sq = dot + float((s64 * d64).sum()), d_sq + float(d64.square().sum()), s_sq + float(s64.square().sum())
            err_sq += float((s64 - d64).square().sum())
            worst = min(worst, cos)
        totals = prior.metadata["totals"]
        assert totals["cosine"] == pytest.approx(dot / math.sqrt(d_sq * s_sq), abs=1e-7)
        assert totals["min_cosine"] == pytest.approx(worst, abs=1e-7)
        assert totals["rel_error"] == pytest.approx(math.sqrt(err_sq / d_sq), rel=1e-5, abs=1e-12)
        prior.close()


def test_bf16_default_from_sharded_bf16_checkpoints(models, tmp_path):
    llm16 = save_partner_llm(models["vl16"], tmp_path / "llm16", noise=0.3, dtype=torch.bfloat16, max_shard_size="40KB")
    assert len(list(models["vl16"].glob("*.safetensors"))) > 1
    out = tmp_path / "p.safetensors"
    export_prior(models["vl16"], llm16, out)
    vl, llm = _load(models["vl16"]), _load(llm16)
    stored = load_file(out)
    assert len(stored) == LAYERS * 10
    for name, t in stored.items():
        ref = (llm[_disk(name)].float() - vl[_disk(name)].float()).to(torch.bfloat16)
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref), name


# ---------------------------------------------------------------------------------------------- selection
def test_selection_modules_layers_skip_first(models, tmp_path):
    vl, llm = models["vl"], models["llm"]
    cases = [
        (dict(modules=("attn.q", "norm")), _names(range(LAYERS), ["self_attn.q_proj.weight", "self_attn.q_proj.bias",
                                                                 "input_layernorm.weight", "post_attention_layernorm.weight"]) | {"norm.weight"}),
        (dict(layers="1:3"), _names([1, 2], ATTN + MLP)),
        (dict(layers="1:3", skip_first=2), _names([2], ATTN + MLP)),
        (dict(layers="0,3:"), _names([0, 3], ATTN + MLP)),
        (dict(modules=("mlp.down", "attn.o", "embed"), skip_first=3),
         _names([3], ["mlp.down_proj.weight", "self_attn.o_proj.weight"]) | {"embed_tokens.weight"}),
        (dict(modules=("attn",), layers=[(2, 3)]), _names([2], ATTN)),
    ]
    for i, (kw, expected) in enumerate(cases):
        out = tmp_path / f"s{i}.safetensors"
        export_prior(vl, llm, out, **kw)
        assert set(load_file(out)) == expected, kw


def test_vocab_rows_overlap_only(models, sd, tmp_path):
    vl = models["vl"]
    for vocab in (508, 520):
        llm = save_tiny("qwen2", tmp_path / f"v{vocab}", seed=5, layers=LAYERS, vocab=vocab)
        other = _load(llm)
        out = tmp_path / f"v{vocab}.safetensors"
        report = export_prior(vl, llm, out, modules=("embed", "lm_head"), dtype="float32")
        stored = load_file(out)
        rows = min(vocab, 512)
        for name in ("embed_tokens.weight", "lm_head.weight"):
            ref = other[_disk(name)][:rows].float() - sd["vl"][_disk(name)][:rows].float()
            assert stored[name].shape == (512, 32)
            assert torch.equal(stored[name][:rows], ref) and not stored[name][rows:].any()
        assert any("vocab" in n for n in report.notes)
        assert (report.tensors["lm_head.weight"]["rows"] == rows) == (vocab < 512)


def test_normalize_rescales_to_mllm_norm(models, sd, tmp_path):
    out = tmp_path / "n.safetensors"
    report = export_prior(models["vl"], models["llm"], out, dtype="float32", normalize=True)
    zero = [n for n in report.tensors if not sd["vl"][_disk(n)].any()]  # the tiny model's zero-initialised biases
    assert zero and any(f"{len(zero)} tensors have |W_MLLM| = 0" in n for n in report.notes)
    for name, t in load_file(out).items():
        d, w = _direct(sd, name).double(), sd["vl"][_disk(name)].double()
        assert float(t.double().norm()) == pytest.approx(float(w.norm()), rel=1e-6)
        torch.testing.assert_close(t.double(), d * (w.norm() / d.norm()), rtol=1e-6, atol=1e-7)


def test_normalize_zero_weight_note_is_in_the_header(models, sd, tmp_path, capsys):
    # An MLLM whose q_proj biases are all zeros and whose k/v biases are not: exactly LAYERS tensors with |W| = 0.
    import shutil

    vl = tmp_path / "vl-zero-q"
    shutil.copytree(models["vl"], vl)
    weights = load_file(vl / "model.safetensors")
    for i in range(LAYERS):
        weights[f"model.layers.{i}.self_attn.q_proj.bias"] = torch.zeros_like(weights[f"model.layers.{i}.self_attn.q_proj.bias"])
        for p in "kv":
            key = f"model.layers.{i}.self_attn.{p}_proj.bias"
            weights[key] = torch.full_like(weights[key], 0.01 * (i + 1))
    save_file(weights, vl / "model.safetensors", metadata={"format": "pt"})
    note = (f"{LAYERS} tensors have |W_MLLM| = 0 (e.g. layers.0.self_attn.q_proj.bias, zero-initialised biases): "
            f"--normalize made their D 0")
    out = tmp_path / "n.safetensors"
    report = export_prior(vl, models["llm"], out, dtype="float32", normalize=True)
    assert note in report.notes
    prior = Prior.open(out)
    assert prior.metadata["notes"] == report.notes  # every note of the report is in the file's header
    assert [n for n in prior.metadata["notes"] if "|W_MLLM| = 0" in n] == [note]
    for i in range(LAYERS):
        assert not prior.get(f"layers.{i}.self_attn.q_proj.bias").any()
        assert prior.entries[f"layers.{i}.self_attn.q_proj.bias"]["w_norm"] == 0.0
    prior.close()
    capsys.readouterr()
    main(["prior", "inspect", str(out)])
    assert f"note: {note}" in " ".join(capsys.readouterr().out.split())
    # The largest case the header reserves room for: every selected tensor has |W| = 0.
    only = tmp_path / "q.safetensors"
    export_prior(vl, models["llm"], only, dtype="float32", normalize=True, include="*.q_proj.bias")
    assert Prior.open(only).metadata["notes"] == [note]
    # Without --normalize there is no such note, in the report or the header.
    plain = export_prior(vl, models["llm"], tmp_path / "p.safetensors", dtype="float32")
    assert not any("|W_MLLM| = 0" in n for n in plain.notes + Prior.open(tmp_path / "p.safetensors").metadata["notes"])


def test_two_model_mode(models, sd, tmp_path):
    out = tmp_path / "t.safetensors"
    report = export_prior(models["vl"], None, out, from_llm=models["llm"], to_llm=models["llm2"], dtype="float32",
                          alpha="attn=0.5,mlp.down=2")
    stored = load_file(out)
    assert set(stored) == _names(range(LAYERS), ATTN + MLP)
    for name, t in stored.items():
        assert torch.equal(t, _direct(sd, name, plus="llm2", minus="llm")), name
    assert report.mode == "two-model" and set(report.sources) == {"mllm", "from", "to"}
    prior = Prior.open(out)
    assert prior.family == "qwen2_5_vl"
    assert prior.alpha("layers.0.self_attn.v_proj.bias") == 0.5 and prior.alpha("layers.1.mlp.down_proj.weight") == 2.0
    assert prior.alpha("layers.1.mlp.up_proj.weight") == 1.0
    for name in stored:  # |W_MLLM| is still the MLLM's
        assert report.tensors[name]["w_norm"] == pytest.approx(float(sd["vl"][_disk(name)].double().norm()), rel=SUMS_REL)
    llama = save_tiny("llama", tmp_path / "llama", layers=LAYERS)
    with pytest.raises(IncompatibleError, match="two LLMs of one family"):
        export_prior(models["vl"], None, tmp_path / "x.safetensors", from_llm=models["llm"], to_llm=llama)


# ---------------------------------------------------------------------------------------------- compression
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def _check_fidelity(report, prior, sd, names):
    dot = ref_sq = rec_sq = 0.0
    worst = []
    for name in names:
        d, rec = _direct(sd, name).double(), prior.get(name, dtype=torch.float64)
        worst.append(_cos(d, rec))
        assert report.tensors[name]["cosine"] == pytest.approx(worst[-1], abs=1e-7), name  # float32 matmul blocking
        dot, ref_sq, rec_sq = dot + float(d.reshape(-1) @ rec.reshape(-1)), ref_sq + float(d.norm() ** 2), rec_sq + float(rec.norm() ** 2)
    assert report.totals["cosine"] == pytest.approx(dot / math.sqrt(ref_sq * rec_sq), abs=1e-7)
    assert report.totals["min_cosine"] == pytest.approx(min(worst), abs=1e-7)
    assert report.bytes_on_disk == prior.path.stat().st_size


@pytest.mark.parametrize("chunk", [1 << 20, 96])  # whole tensors, and row blocks of 1-3 rows
def test_lowrank_error_is_the_discarded_singular_values(models, sd, tmp_path, chunk):
    out, rank = tmp_path / "lr.safetensors", 3
    report = export_prior(models["vl"], models["llm"], out, dtype="float32", compress=f"lowrank:{rank}", block_elements=chunk)
    raw, prior = load_file(out), Prior.open(out)
    data = 0
    for name in prior.names:
        d = _direct(sd, name).double()
        if d.dim() == 1:
            assert torch.equal(raw[name], d.float()) and prior.entries[name]["encoding"] == "full"
            data += d.numel() * 4
            continue
        u, v = raw[f"{name}:u"], raw[f"{name}:v"]
        assert u.shape == (d.shape[0], rank) and v.shape == (rank, d.shape[1])
        s = torch.linalg.svdvals(d)
        err_sq = float((d - prior.get(name, dtype=torch.float64)).norm() ** 2)
        assert err_sq == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-4), name
        data += (u.numel() + v.numel()) * 4
    assert report.totals["data_bytes"] == data and report.totals["full_bytes"] == sum(math.prod(prior.shape(n)) * 4 for n in prior.names)
    _check_fidelity(report, prior, sd, prior.names)


def test_topk_keeps_exactly_the_largest(models, sd, tmp_path):
    out, fraction = tmp_path / "tk.safetensors", 0.1
    report = export_prior(models["vl"], models["llm"], out, dtype="float32", compress=f"topk:{fraction}")
    prior = Prior.open(out)
    for name in prior.names:
        d = _direct(sd, name).numpy().reshape(-1)
        k = math.ceil(fraction * d.size)
        keep = np.argsort(-np.abs(d), kind="stable")[:k]
        ref = np.zeros_like(d)
        ref[keep] = d[keep]
        np.testing.assert_array_equal(prior.get(name).numpy().reshape(-1), ref)
        assert prior.entries[name]["k"] == k
    _check_fidelity(report, prior, sd, prior.names)


@pytest.mark.parametrize("chunk", [1 << 20, 96])
def test_int8_error_within_half_a_step(models, sd, tmp_path, chunk):
    out = tmp_path / "q.safetensors"
    report = export_prior(models["vl"], models["llm"], out, dtype="float32", compress="int8", block_elements=chunk)
    raw, prior = load_file(out), Prior.open(out)
    for name in prior.names:
        d = _direct(sd, name).numpy()
        rows = d.reshape(1, -1) if d.ndim == 1 else d
        scale = np.abs(rows).max(axis=1) / 127
        np.testing.assert_allclose(raw[f"{name}:scale"].numpy(), scale, rtol=1e-6)
        q = raw[f"{name}:q"]
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127
        err = np.abs(prior.get(name).numpy().reshape(rows.shape) - rows)
        assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all(), name
    _check_fidelity(report, prior, sd, prior.names)


# ---------------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_cli_export_both_forms_and_inspect(models, sd, tmp_path, capsys):
    vl, llm = str(models["vl"]), str(models["llm"])
    out = tmp_path / "c.safetensors"
    main(["prior", "--mllm", vl, "--llm", llm, str(out), "--dtype", "fp32", "--layers", "1:", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["tensors"] == (LAYERS - 1) * 10
    code, err = _cli(["prior", "--mllm", vl, "--llm", llm, str(out)], capsys)
    assert code == 1 and err.startswith("error:") and "already exists" in err and len(err.strip().splitlines()) == 1
    main(["prior", "export", "--mllm", vl, "--llm", llm, str(out), "--force", "--compress", "int8", "--dtype", "float32", "--layers", "1:"])
    assert Prior.open(out).metadata["compression"] == {"method": "int8"}
    capsys.readouterr()
    main(["prior", "inspect", str(out), "--json", str(tmp_path / "i.json")])
    text = capsys.readouterr().out
    assert "qwen2_5_vl" in text and "attn.q" in text and "mlp.down" in text and "int8" in text and "worst tensor" in text
    info = json.loads((tmp_path / "i.json").read_text())
    q = [n for n in _names(range(1, LAYERS), ATTN) if ".q_proj." in n]
    assert info["per_module"]["attn.q"]["tensors"] == len(q) == 6
    ref = math.sqrt(sum(float(_direct(sd, n).double().norm() ** 2) for n in q))
    assert info["per_module"]["attn.q"]["d_norm"] == pytest.approx(ref, rel=SUMS_REL)
    assert info["layers"] == [[1, None]] and info["family"] == "qwen2_5_vl"


def _one_error(argv, capsys, match):
    code, err = _cli(argv, capsys)
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and match in err, err


def test_cli_validation_errors(models, full32, tmp_path, capsys):
    vl, llm = str(models["vl"]), str(models["llm"])
    _one_error(["prior", "inspect", str(models["vl"] / "model.safetensors")], capsys, "not a deltakit prior")
    data = full32.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    _one_error(["prior", "inspect", str(tmp_path / "cut.safetensors")], capsys, "truncated")
    tensors = load_file(full32)
    meta = safe_open(str(full32), "pt").metadata()
    save_file(tensors, tmp_path / "nometa.safetensors", {k: v for k, v in meta.items() if k != "totals"})
    _one_error(["prior", "inspect", str(tmp_path / "nometa.safetensors")], capsys, "lacks 'totals'")
    entries = json.loads(meta["tensors"])
    entries["layers.0.self_attn.rotary.weight"] = entries.pop("layers.0.self_attn.q_proj.weight")
    tensors["layers.0.self_attn.rotary.weight"] = tensors.pop("layers.0.self_attn.q_proj.weight")
    save_file(tensors, tmp_path / "unknown.safetensors", {**meta, "tensors": json.dumps(entries)})
    _one_error(["prior", "inspect", str(tmp_path / "unknown.safetensors")], capsys, "unknown tensor name 'layers.0.self_attn.rotary.weight'")
    extra = load_file(full32)
    extra["layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    save_file(extra, tmp_path / "extra.safetensors", meta)
    _one_error(["prior", "inspect", str(tmp_path / "extra.safetensors")], capsys, "not listed in the prior metadata")
    _one_error(["prior", "--mllm", vl, "--llm", llm, str(tmp_path / "a.safetensors"), "--compress", "svd:3"], capsys, "bad compression")
    _one_error(["prior", "--mllm", vl, "--llm", llm, "--from", llm, str(tmp_path / "b.safetensors")], capsys, "not both")
    _one_error(["prior", "--mllm", llm, "--llm", vl, str(tmp_path / "c.safetensors")], capsys, "text-only")
    _one_error(["prior", "--mllm", vl, "--llm", llm, str(tmp_path / "d.safetensors"), "--modules", "vision"], capsys, "unknown module")
    _one_error(["prior", "--mllm", vl, "--llm", llm, str(tmp_path / "e.safetensors"), "--layers", "5:2"], capsys, "bad layer range")
    wide = save_tiny("qwen2", tmp_path / "wide", intermediate=96, layers=LAYERS)
    _one_error(["prior", "--mllm", vl, "--llm", str(wide), str(tmp_path / "f.safetensors")], capsys,
               "cannot share a base model: intermediate_size 64 vs 96;")
    short = save_partner_llm(save_tiny("qwen2_5_vl", tmp_path / "vl2", layers=2), tmp_path / "short")
    _one_error(["prior", "--mllm", vl, "--llm", str(short), str(tmp_path / "g.safetensors")], capsys, "not in")
    bad = _load(models["llm"])
    bad["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(bad, tmp_path / "nan" / "model.safetensors")
    (tmp_path / "nan" / "config.json").write_bytes((models["llm"] / "config.json").read_bytes())
    _one_error(["prior", "--mllm", vl, "--llm", str(tmp_path / "nan"), str(tmp_path / "g2.safetensors")], capsys,
               "layers.1.mlp.up_proj.weight: NaN or Inf")
    tied = save_tiny("qwen2_5_vl", tmp_path / "tied", layers=2, tie=True)
    _one_error(["prior", "--mllm", str(tied), "--llm", str(tied), str(tmp_path / "h.safetensors"), "--modules", "lm_head"], capsys, "ties lm_head")
    assert not list(tmp_path.glob("[a-h].safetensors")) and not (tmp_path / "g2.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))


def test_interrupted_export_leaves_nothing(models, tmp_path):
    seen = []

    def stop(advance, total=None, description=None, info=""):
        seen.append(info)
        if advance:  # the first report of streamed work: the executor reports from the calling thread
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_prior(models["vl"], models["llm"], tmp_path / "p.safetensors", compress="int8", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_metadata_keeps_tensors_in_place(tmp_path):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("t", torch.float32, (2, 3))], {"k": "x" * 40}) as w:
        w.write("t", t)
        w.rewrite_metadata({"k": "short"})
        with pytest.raises(ValueError, match="only"):
            w.rewrite_metadata({"k": "y" * 200})
    assert torch.equal(load_file(tmp_path / "x.safetensors")["t"], t)
    assert safe_open(str(tmp_path / "x.safetensors"), "pt").metadata() == {"k": "short"}


# ---------------------------------------------------------------------------------------------- binding
def test_bind_to_qwen25_vl_and_wrong_family(models, sd, full32):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(models["vl"], dtype=torch.float32)
    prior = Prior.open(full32)
    bias = DriftBias.bind(model, prior, rule="absolute")
    assert bias.num_tensors == LAYERS * 10
    params = dict(model.named_parameters())
    for t in bias.targets:
        assert t.name == "model.language_model." + t.canonical and t.name not in sd["vl"]
        assert params[t.name] is t.param and torch.equal(t.prior, _direct(sd, t.canonical))
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bias.apply()
    name = "layers.1.mlp.up_proj.weight"
    assert torch.equal(params["model.language_model." + name].grad, -_direct(sd, name))

    other = build_tiny("qwen2_vl", layers=LAYERS)
    with pytest.raises(IncompatibleError, match="built for a qwen2_5_vl model but this model is qwen2_vl"):
        DriftBias.bind(other, prior)

    class NoFamily:  # the same tensors without the family tag bind: the family check is what refuses them
        names, shape, get, alpha = prior.names, prior.shape, prior.get, prior.alpha

    assert DriftBias.bind(other, NoFamily()).num_tensors == LAYERS * 10
    wide = build_tiny("qwen2_5_vl", layers=LAYERS, intermediate=96)
    with pytest.raises(IncompatibleError, match=r"prior tensor 'layers.0.mlp.down_proj.weight' has shape \(32, 64\)"):
        DriftBias.bind(wide, prior)


def test_library_errors_are_deltakit_errors(models, tmp_path):
    with pytest.raises(DeltakitError, match=r"\*\.safetensors"):
        export_prior(models["vl"], models["llm"], tmp_path / "p.bin")
    out = tmp_path / "p.safetensors"
    export_prior(models["vl"], models["llm"], out, modules=("embed",))
    with pytest.raises(DeltakitError, match="no tensor 'layers.0.mlp.up_proj.weight'"):
        Prior.open(out).get("layers.0.mlp.up_proj.weight")
