"""deltakit merge: every method against formulas written here, the output's layout, a forward pass, bad input."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltakit.cli import main
from deltakit.errors import DeltakitError
from deltakit.merge import MergeConfig, MergeConfigError, merge
from deltakit.merge.methods import TopK, dare_block_rows, linear, merge_tensor, random_mask, task_arithmetic
from deltakit.merge.plan import dare_seed
from deltakit.tiny import SPECIAL, save_partner_llm, save_tiny

LAYERS = 4
MLLM_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "preprocessor_config.json",
              "chat_template.jinja", "special_tokens_map.json")


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2.5-VL (4 text layers), two partner LLMs (the 'reasoning' model and a 'base')."""
    root = tmp_path_factory.mktemp("merge")
    vl = save_tiny("qwen2_5_vl", root / "vl", layers=LAYERS)
    llm = save_partner_llm(vl, root / "llm", noise=0.5, seed=1)
    base = save_partner_llm(vl, root / "base", noise=0.2, seed=2)
    for name in MLLM_FILES:  # stand-ins for the processor, tokenizer and template files of a real MLLM
        (vl / name).write_text(f"{name} of the MLLM\n")
    (vl / "README.md").write_text("the MLLM's own model card\n")
    (llm / "tokenizer.json").write_text("the LLM's tokenizer\n")
    return {"root": root, "vl": vl, "llm": llm, "base": base}


@pytest.fixture(scope="module")
def tensors(pair) -> dict[str, dict[str, torch.Tensor]]:
    return {k: _load(pair[k]) for k in ("vl", "llm", "base")}




# ---------------------------------------------------------------------------------------------- pure methods
def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_linear_and_task_arithmetic_formulas():
    a, b, c = _rand(5, 7, seed=1), _rand(5, 7, seed=2), _rand(5, 7, seed=3)
    torch.testing.assert_close(linear([a, b], [0.9, 0.1]), 0.9 * a + 0.1 * b)
    torch.testing.assert_close(linear([a, b], [3.0, 1.0]), (3 * a + b) / 4)
    torch.testing.assert_close(linear([a, b], [0.6, 0.6], normalize=False), 0.6 * a + 0.6 * b)
    got = task_arithmetic(c, [a, b], [0.7, 0.4], lambda_=0.5)
    torch.testing.assert_close(got, c + 0.5 * (0.7 * (a - c) + 0.4 * (b - c)))
    got = task_arithmetic(c, [a, b], [0.7, 0.4], normalize=True)
    torch.testing.assert_close(got, c + (0.7 * (a - c) + 0.4 * (b - c)) / 1.1)


def _ties_reference(base, xs, weights, densities, lam=1.0, normalize=True):
    """TIES written out with numpy: top-k by |delta| (argsort), sign of the weighted sum, disjoint mean."""
    base = base.numpy().astype(np.float64)
    deltas = []
    for x, w, rho in zip(xs, weights, densities):
        d = x.numpy().astype(np.float64) - base
        k = max(1, int(rho * d.size))
        keep = np.zeros(d.size, bool)
        keep[np.argsort(-np.abs(d).ravel(), kind="stable")[:k]] = True
        deltas.append(w * d * keep.reshape(d.shape))
    total = sum(deltas)
    sign = np.where(total >= 0, 1.0, -1.0)
    agree = [np.sign(d) == sign for d in deltas]
    mixed = sum(d * m for d, m in zip(deltas, agree))
    div = sum(w * m for w, m in zip(weights, agree))
    div[div == 0] = 1
    if normalize:
        mixed = mixed / div
    return torch.from_numpy(base + lam * mixed).float()


def _topk_reference(a: torch.Tensor, density: float) -> torch.Tensor:
    """The k largest entries of ``a`` (ties in row-major order) by a stable sort, as a bool mask."""
    k = max(1, int(density * a.numel()))
    keep = np.zeros(a.numel(), bool)
    keep[np.argsort(-a.numpy().ravel(), kind="stable")[:k]] = True
    return torch.from_numpy(keep.reshape(a.shape))


@pytest.mark.parametrize("bracket", ["sampled", "too_low", "too_high"])
def test_streamed_topk_is_exact_across_blocks_even_when_the_bracket_misses(bracket):
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(40, 25, generator=g) * 8).round().abs()  # few distinct magnitudes: many ties at the k-th
    sample = {"sampled": a.reshape(-1)[::3],
              "too_low": torch.zeros(50), "too_high": torch.full((50,), 100.0)}[bracket]
    top = TopK(sample, a.numel(), 0.3)
    scans = 0
    while not top.done:
        for r in range(0, 40, 7):
            top.observe(a[r:r + 7])
        top.finish()
        scans += 1
    assert scans == (1 if bracket == "sampled" else 2)
    got = torch.cat([top.keep(a[r:r + 7]) for r in range(0, 40, 7)])
    assert got.dtype == a.dtype and torch.equal(got.bool(), _topk_reference(a, 0.3))


def test_dare_mask_does_not_depend_on_chunking():
    shape, rows = (2500, 1000), dare_block_rows((2500, 1000))
    assert rows == 1048  # DARE_BLOCK = 2**20 elements per block
    whole = random_mask(shape, 0.4, seed=9)
    parts = [random_mask((min(rows, 2500 - r), 1000), 0.4, seed=9, first_row=r) for r in range(0, 2500, rows)]
    assert torch.equal(whole, torch.cat(parts))
    want = torch.cat([torch.rand((min(rows, 2500 - r), 1000), generator=torch.Generator().manual_seed(9 + j)) < 0.4
                      for j, r in enumerate(range(0, 2500, rows))])
    assert torch.equal(whole.bool(), want)
    with pytest.raises(ValueError):
        random_mask((10, 1000), 0.4, seed=9, first_row=5)


def test_dare_formulas_with_documented_seeded_mask():
    base, a, b = _rand(64, 32, seed=7), _rand(64, 32, seed=8), _rand(64, 32, seed=9)
    seeds = [11, 12]
    masks = []
    for s, rho in zip(seeds, (0.3, 0.6)):
        g = torch.Generator().manual_seed(s)
        masks.append(torch.rand(64, 32, generator=g) < rho)
    def l1_rescaled(d, m):  # mergekit 0.1.5's rescale: the kept entries scaled back to the delta's L1 norm
        return d * m * (d.abs().sum() / (d * m).abs().sum())

    da, db = l1_rescaled(a - base, masks[0]), l1_rescaled(b - base, masks[1])
    got = merge_tensor("dare_linear", base, [a, b], seeds, weight=[0.5, 0.8], density=[0.3, 0.6], lambda_=0.7)
    torch.testing.assert_close(got, base + 0.7 * (0.5 * da + 0.8 * db), atol=1e-5, rtol=1e-5)
    wa, wb = 0.5 * da, 0.8 * db
    sign = torch.where(wa + wb >= 0, 1.0, -1.0)
    ka, kb = torch.sign(wa) == sign, torch.sign(wb) == sign
    got = merge_tensor("dare_ties", base, [a, b], seeds, weight=[0.5, 0.8], density=[0.3, 0.6], normalize=True)
    div = 0.5 * ka + 0.8 * kb
    div[div == 0] = 1
    torch.testing.assert_close(got, base + (wa * ka + wb * kb) / div, atol=1e-5, rtol=1e-5)
    assert abs(masks[0].float().mean().item() - 0.3) < 0.03  # the drop rate is the density's complement


# ---------------------------------------------------------------------------------------------- whole merges
def _vision_keys(t: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in t if k.startswith("visual.")]


def test_linear_br2v_output_layout_copies_and_forward_pass(pair, tensors):
    out = pair["root"] / "br2v"
    report = merge(MergeConfig.simple(str(pair["vl"]), str(pair["llm"]), alpha=0.9), out, max_shard_bytes=40_000)
    vl, llm = tensors["vl"], tensors["llm"]
    got = _load(out)
    # The output keeps the MLLM's keys in the MLLM's file order: plan_merge makes one job per key of
    # Checkpoint.keys() (file order), ShardedWriter fills shards in that order and SafetensorsWriter lays out
    # each shard's header and data in it; the index lists them in it too. (safetensors' load_file and _load
    # keep header order, shards in name order.)
    assert list(got) == list(vl)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == list(vl)
    shards = sorted(out.glob("model-*.safetensors"))
    assert [index["weight_map"][k] for k in vl] == sorted(index["weight_map"][k] for k in vl)  # shards fill in key order
    assert [k for f in shards for k in load_file(f)] == list(vl)
    merged = [k for k in vl if k.startswith("model.layers.") or k == "model.norm.weight"]
    assert len(merged) == 12 * LAYERS + 1  # q,k,v,o weights + q,k,v biases + gate,up,down + 2 norms; final norm
    for k in merged:
        torch.testing.assert_close(got[k], 0.9 * vl[k] + 0.1 * llm[k], atol=1e-6, rtol=1e-6)
        assert not torch.equal(got[k], vl[k])
    for k in set(vl) - set(merged):  # vision, projector, embeddings, lm_head: bit-for-bit
        assert torch.equal(got[k].view(torch.uint8), vl[k].view(torch.uint8)), k
    assert len(_vision_keys(vl)) >= 20
    for name in ("config.json", "generation_config.json", *MLLM_FILES):
        assert (out / name).read_bytes() == (pair["vl"] / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("model-")) == sorted(
        ["config.json", "generation_config.json", *MLLM_FILES, "model.safetensors.index.json", "merge_report.json", "README.md"])
    rep = json.loads((out / "merge_report.json").read_text())
    actions = {t["key"]: t["action"] for t in rep["tensors"]}
    assert actions["visual.blocks.0.attn.qkv.weight"] == "copied" and actions[merged[0]] == "merged"
    assert rep["config"]["models"][0]["parameters"]["weight"] == 0.9 and report.merged == len(merged)
    card = (out / "README.md").read_text()
    exact = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert MergeConfig.from_dict(exact).to_dict() == rep["config"] == report.config
    assert exact["models"][1] == {"model": str(pair["llm"]), "parameters": {"weight": 0.1}}
    assert rep["inputs"] == [{"path": str(pair["vl"]), "family": "qwen2_5_vl", "role": "model+mllm"},
                             {"path": str(pair["llm"]), "family": "qwen2", "role": "model"}]

    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(model.model.language_model.layers[1].mlp.up_proj.weight.detach(),
                               got["model.layers.1.mlp.up_proj.weight"])
    image = SPECIAL["image"]
    ids = torch.tensor([[SPECIAL["im_start"], 17, SPECIAL["vision_start"], image, image, image, image,
                         SPECIAL["vision_end"], 42, 99, SPECIAL["im_end"]]])
    pixel_values = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                       image_grid_thw=torch.tensor([[1, 4, 4]])).logits
    assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all()


def test_task_arithmetic_all_modules_with_gradient_and_filter(pair, tensors):
    cfg = MergeConfig.from_dict({
        "merge_method": "task_arithmetic",
        "mllm": str(pair["vl"]),
        "base_model": str(pair["base"]),
        "models": [
            {"model": str(pair["vl"]), "parameters": {"weight": [{"filter": "self_attn", "value": [1.0, 0.0]}, {"value": 0.6}]}},
            {"model": str(pair["llm"]), "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": 0.8},
        "modules": ["attn", "mlp", "norm", "embed", "lm_head"],
    })
    out = pair["root"] / "ta"
    merge(cfg, out)
    vl, llm, base, got = tensors["vl"], tensors["llm"], tensors["base"], _load(out)
    for k in vl:
        if k.startswith("visual."):
            assert torch.equal(got[k], vl[k])
            continue
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else None
        w = 1.0 - layer / (LAYERS - 1) if layer is not None and "self_attn" in k else 0.6
        want = base[k] + 0.8 * (w * (vl[k] - base[k]) + 0.3 * (llm[k] - base[k]))
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-5)


def test_task_arithmetic_with_the_mllm_as_base(pair, tensors):
    """MLLM + lambda * w * (LLM - MLLM): the MLLM only as base_model is still the output's layout."""
    cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": str(pair["vl"]),
                                 "models": [{"model": str(pair["llm"]), "parameters": {"weight": 0.5}}],
                                 "parameters": {"lambda": 0.4}})
    merge(cfg, pair["root"] / "ta_base")
    got, vl, llm = _load(pair["root"] / "ta_base"), tensors["vl"], tensors["llm"]
    assert set(got) == set(vl)
    k = "model.layers.3.self_attn.v_proj.bias"
    torch.testing.assert_close(got[k], vl[k] + 0.4 * 0.5 * (llm[k] - vl[k]))
    assert torch.equal(got["visual.merger.mlp.0.weight"], vl["visual.merger.mlp.0.weight"])


def test_ties_and_dare_on_checkpoints(pair, tensors):
    vl, llm, base = tensors["vl"], tensors["llm"], tensors["base"]
    common = {"mllm": str(pair["vl"]), "base_model": str(pair["base"]), "seed": 3,
              "models": [{"model": str(pair["vl"]), "parameters": {"weight": 0.6}},
                         {"model": str(pair["llm"]), "parameters": {"weight": 0.4}}],
              "parameters": {"density": 0.3}}
    merge(MergeConfig.from_dict({**common, "merge_method": "ties"}), pair["root"] / "ties")
    merge(MergeConfig.from_dict({**common, "merge_method": "dare_linear"}), pair["root"] / "dare")
    got_t, got_d = _load(pair["root"] / "ties"), _load(pair["root"] / "dare")
    k = "model.layers.2.mlp.down_proj.weight"
    want = _ties_reference(base[k], [vl[k], llm[k]], [0.6, 0.4], [0.3, 0.3])
    torch.testing.assert_close(got_t[k], want, atol=1e-5, rtol=1e-5)
    masks = []
    for i in range(2):
        g = torch.Generator().manual_seed(dare_seed(3, "layers.2.mlp.down_proj.weight", i))
        masks.append(torch.rand(vl[k].shape, generator=g) < 0.3)
    da, db = vl[k] - base[k], llm[k] - base[k]
    da, db = da * masks[0] * (da.abs().sum() / (da * masks[0]).abs().sum()), db * masks[1] * (db.abs().sum() / (db * masks[1]).abs().sum())
    want = base[k] + 0.6 * da + 0.4 * db
    torch.testing.assert_close(got_d[k], want, atol=1e-5, rtol=1e-5)
    k = "model.norm.weight"  # norms are merged by default, embeddings are not
    torch.testing.assert_close(got_t[k], _ties_reference(base[k], [vl[k], llm[k]], [0.6, 0.4], [0.3, 0.3]), atol=1e-5, rtol=1e-5)
    assert torch.equal(got_t["model.embed_tokens.weight"], vl["model.embed_tokens.weight"])


@pytest.mark.parametrize("case", ["per_model_density_lambda", "unnormalized"])
def test_ties_through_merge_matches_the_numpy_reference(pair, tensors, case):
    """Per-model densities, lambda and normalize: false, through merge() (the streamed top-k and combine)."""
    vl, llm, base = tensors["vl"], tensors["llm"], tensors["base"]
    if case == "per_model_density_lambda":
        weights, densities, lam, normalize = [0.7, 0.4], [0.5, 0.2], 0.9, True
    else:
        weights, densities, lam, normalize = [1.0, 1.0], [0.3, 0.3], 1.0, False
    cfg = MergeConfig.from_dict({
        "merge_method": "ties", "mllm": str(pair["vl"]), "base_model": str(pair["base"]),
        "models": [{"model": str(pair["vl"]), "parameters": {"weight": weights[0], "density": densities[0]}},
                   {"model": str(pair["llm"]), "parameters": {"weight": weights[1], "density": densities[1]}}],
        "parameters": {"lambda": lam, "normalize": normalize}})
    merge(cfg, pair["root"] / f"ties_{case}")
    got = _load(pair["root"] / f"ties_{case}")
    merged = [k for k in vl if k.startswith("model.layers.") or k == "model.norm.weight"]
    assert len(merged) == 12 * LAYERS + 1
    for k in merged:
        want = _ties_reference(base[k], [vl[k], llm[k]], weights, densities, lam, normalize)
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    for k in set(vl) - set(merged):
        assert torch.equal(got[k], vl[k]), k


def test_ties_streamed_in_small_blocks_on_bf16_checkpoints(tmp_path):
    """bf16 deltas tie a lot at the k-th magnitude: the streamed top-k must still pick them in row-major order."""
    base = save_tiny("qwen2", tmp_path / "base", layers=2, dtype=torch.bfloat16)
    a = save_partner_llm(base, tmp_path / "a", noise=0.3, seed=1, dtype=torch.bfloat16)
    b = save_partner_llm(base, tmp_path / "b", noise=0.3, seed=2, dtype=torch.bfloat16)
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": str(base), "out_dtype": "float32",
                                 "models": [{"model": str(a), "parameters": {"weight": 0.7, "density": 0.3}},
                                            {"model": str(b), "parameters": {"weight": 0.5, "density": 0.1}}],
                                 "modules": ["attn", "mlp", "norm", "embed", "lm_head"]})
    merge(cfg, tmp_path / "out", block_elements=100, threads=2)
    got = _load(tmp_path / "out")
    ta, tb, tbase = _load(a), _load(b), _load(base)
    ties_at_threshold = 0
    for k in got:
        d = (ta[k].float() - tbase[k].float()).abs()
        t = torch.kthvalue(d.reshape(-1), d.numel() - max(1, int(0.3 * d.numel())) + 1).values
        ties_at_threshold += int((d == t).sum()) > 1
        want = _ties_reference(tbase[k].float(), [ta[k].float(), tb[k].float()], [0.7, 0.5], [0.3, 0.1])
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert ties_at_threshold > 10


def test_layer_swap_keeps_first_layers_and_layers(pair, tensors):
    vl, llm = tensors["vl"], tensors["llm"]
    merge(MergeConfig.simple(str(pair["vl"]), str(pair["llm"]), method="layer_swap", alpha=0.9, keep_layers=2),
          pair["root"] / "swap")
    merge(MergeConfig.simple(str(pair["vl"]), str(pair["llm"]), alpha=0.5, modules=("mlp.down", "norm"), layers="1:3"),
          pair["root"] / "range")
    swap, rng = _load(pair["root"] / "swap"), _load(pair["root"] / "range")
    for i in range(LAYERS):
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        want = vl[k] if i < 2 else 0.9 * vl[k] + 0.1 * llm[k]
        torch.testing.assert_close(swap[k], want, atol=1e-6, rtol=1e-6)
        for name in ("mlp.down_proj.weight", "input_layernorm.weight", "mlp.up_proj.weight"):
            k = f"model.layers.{i}.{name}"
            picked = 1 <= i < 3 and "up_proj" not in name
            torch.testing.assert_close(rng[k], 0.5 * vl[k] + 0.5 * llm[k] if picked else vl[k], atol=1e-6, rtol=1e-6)
    k = "model.norm.weight"  # outside the layers: follows the module selection only
    torch.testing.assert_close(rng[k], 0.5 * vl[k] + 0.5 * llm[k])


def test_vocab_mismatch_merges_overlapping_rows_only(pair, tensors):
    small = pair["root"] / "llm_small_vocab"
    small.mkdir()
    llm = dict(tensors["llm"])
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[k] = llm[k][:480].clone()
    save_file(llm, small / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((pair["llm"] / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 480}))
    out = pair["root"] / "vocab"
    report = merge(MergeConfig.simple(str(pair["vl"]), str(small), alpha=0.75, modules=("embed", "lm_head")), out)
    got, vl = _load(out), tensors["vl"]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[k][:480], 0.75 * vl[k][:480] + 0.25 * llm[k])
        assert torch.equal(got[k][480:], vl[k][480:])
    assert any("vocab sizes differ" in n for n in report.notes)


def test_out_dtype_and_weight_sum_warning(pair, tensors, caplog):
    cfg = MergeConfig.from_dict({"merge_method": "linear", "mllm": str(pair["vl"]), "out_dtype": "bfloat16",
                                 "models": [{"model": str(pair["vl"]), "parameters": {"weight": 0.9}},
                                            {"model": str(pair["llm"]), "parameters": {"weight": 0.3}}]})
    with caplog.at_level(logging.WARNING):
        report = merge(cfg, pair["root"] / "bf16")
    assert any("sum to 1.2" in w for w in report.warnings) and "sum to 1.2" in caplog.text
    got, vl, llm = _load(pair["root"] / "bf16"), tensors["vl"], tensors["llm"]
    k = "model.layers.0.mlp.gate_proj.weight"
    assert got[k].dtype == torch.bfloat16
    assert torch.equal(got[k], ((0.9 * vl[k] + 0.3 * llm[k]) / 1.2).to(torch.bfloat16))
    assert torch.equal(got["visual.patch_embed.proj.weight"], vl["visual.patch_embed.proj.weight"].to(torch.bfloat16))
    assert json.loads((pair["root"] / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def _plan_warnings(data: dict | MergeConfig) -> list[str]:
    from deltakit.merge.plan import plan_merge

    plan = plan_merge(MergeConfig.from_dict(data) if isinstance(data, dict) else data)
    try:
        return list(plan.warnings)
    finally:
        plan.close()


def _extrapolation(method: str, weight: str, model: Path, name: str) -> str:
    return (f"{method} weight {weight} on {model} is outside [0, 1] (e.g. on {name}): "
            f"the merge extrapolates instead of interpolating")


def test_weights_outside_zero_one_warn_once_per_model_and_value(pair, tmp_path, capsys):
    vl, llm = pair["vl"], pair["llm"]
    # BR2V alpha 1.2: the MLLM weighted 1.2, the LLM 1 - 1.2 = -0.2; they sum to 1, so no sum warning.
    assert _plan_warnings(MergeConfig.simple(str(vl), str(llm), alpha=1.2)) == [
        _extrapolation("linear", "1.2", vl, "layers.0.input_layernorm.weight"),
        _extrapolation("linear", "-0.2", llm, "layers.0.input_layernorm.weight")]
    assert _plan_warnings(MergeConfig.simple(str(vl), str(llm), alpha=0.9)) == []
    assert _plan_warnings(MergeConfig.simple(str(vl), str(llm), alpha=1.0)) == []  # the ends of [0, 1] are fine
    # layer_swap: layers 0-1 keep the MLLM (weights 1, 0); layers 2-3 get 1.5 and -0.5.
    assert _plan_warnings(MergeConfig.simple(str(vl), str(llm), method="layer_swap", alpha=1.5, keep_layers=2)) == [
        _extrapolation("layer_swap", "1.5", vl, "layers.2.input_layernorm.weight"),
        _extrapolation("layer_swap", "-0.5", llm, "layers.2.input_layernorm.weight")]
    # A per-layer gradient over 4 layers: layer i weighs 1 + 0.3 i / 3 and -0.3 i / 3, so layers 1-3 give three
    # distinct values per model, each named once though every layer has many tensors.
    grad = {"merge_method": "linear", "mllm": str(vl),
            "models": [{"model": str(vl), "parameters": {"weight": [1.0, 1.3]}},
                       {"model": str(llm), "parameters": {"weight": [0.0, -0.3]}}]}
    warnings = _plan_warnings(grad)
    assert sorted(warnings) == sorted(
        [_extrapolation("linear", f"{1 + 0.1 * i:g}", vl, f"layers.{i}.input_layernorm.weight") for i in (1, 2, 3)]
        + [_extrapolation("linear", f"{-0.1 * i:g}", llm, f"layers.{i}.input_layernorm.weight") for i in (1, 2, 3)])
    # Normalized weights are judged after division: 3 and -1 (sum 2) act as 1.5 and -0.5; 2 and 2 as 0.5 and 0.5.
    two = lambda a, b: {"merge_method": "linear", "mllm": str(vl), "models": [
        {"model": str(vl), "parameters": {"weight": a}}, {"model": str(llm), "parameters": {"weight": b}}]}
    assert [w for w in _plan_warnings(two(3, -1)) if "outside" in w] == [
        _extrapolation("linear", "1.5 (3 divided by the weights' sum 2)", vl, "layers.0.input_layernorm.weight"),
        _extrapolation("linear", "-0.5 (-1 divided by the weights' sum 2)", llm, "layers.0.input_layernorm.weight")]
    assert not [w for w in _plan_warnings(two(2, 2)) if "outside" in w]
    # The CLI prints it and the report stores it.
    main(["merge", "--mllm", str(vl), "--llm", str(llm), "--alpha", "1.2", "--json", str(tmp_path / "r.json"),
          str(tmp_path / "out")])
    assert "linear weight 1.2 on" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert _extrapolation("linear", "-0.2", llm, "layers.0.input_layernorm.weight") in report["warnings"]


# ---------------------------------------------------------------------------------------------- bad input
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_bad_input_one_error_line(pair, tmp_path, capsys):
    vl, llm = str(pair["vl"]), str(pair["llm"])
    out = tmp_path / "out"
    out.mkdir()
    code, err = _cli(["merge", "--mllm", vl, "--llm", llm, str(out)], capsys)
    assert code == 1 and "already exists" in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
    wide = save_tiny("qwen2", tmp_path / "wide", intermediate=96, layers=LAYERS)
    code, err = _cli(["merge", "--mllm", vl, "--llm", str(wide), str(tmp_path / "o1")], capsys)
    assert code == 1 and "cannot share a base model: intermediate_size 64 vs 96;" in err.strip().splitlines()[-1]
    models = [{"model": vl, "parameters": {"weight": 0.5}}, {"model": llm, "parameters": {"weight": 0.5}}]
    bad = {
        "unknown merge_method": {"merge_method": "slerpy", "models": models},
        "unknown parameter 'gamma'": {"merge_method": "linear", "models": models, "parameters": {"gamma": 1}},
        "needs a base_model": {"merge_method": "task_arithmetic", "models": models},
        "density must be in (0, 1]": {"merge_method": "ties", "models": models, "base_model": vl, "parameters": {"density": 1.5}},
        "unknown module": {"merge_method": "linear", "models": models, "modules": ["vision"]},
    }
    for i, (msg, data) in enumerate(bad.items()):
        code, err = _cli(["merge", _yaml(tmp_path / f"c{i}.yaml", data), str(tmp_path / f"o{i}")], capsys)
        assert code == 1 and msg in err and err.startswith("error:"), (msg, err)
    code, err = _cli(["merge", "--mllm", vl, "--llm", llm, "--method", "ties", str(tmp_path / "o9")], capsys)
    assert code == 1 and "needs a base_model" in err
    code, err = _cli(["merge", "--mllm", vl, "--llm", llm, "--force", llm], capsys)
    assert code == 1 and "would replace one of the inputs" in err and (pair["llm"] / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.yaml", "c1.yaml", "c2.yaml", "c3.yaml", "c4.yaml", "out", "wide"]
    with pytest.raises(MergeConfigError, match="no 'weight'"):
        MergeConfig.from_dict({"merge_method": "linear", "models": [vl, llm]})


def test_cli_runs_and_force_replaces(pair, tmp_path, capsys):
    out = tmp_path / "m"
    main(["merge", "--mllm", str(pair["vl"]), "--llm", str(pair["llm"]), "--alpha", "0.8", str(out)])
    first = _load(out)["model.layers.0.mlp.up_proj.weight"]
    main(["merge", "--mllm", str(pair["vl"]), "--llm", str(pair["llm"]), "--alpha", "0.6", "--force",
          "--json", str(tmp_path / "r.json"), str(out)])
    second = _load(out)["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(first, second)
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "linear"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r.json"]


def test_cli_full_disk_one_line_and_no_output(pair, tmp_path, capsys, monkeypatch):
    import deltakit.io.writer as writer

    real, calls = writer.os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    code, err = _cli(["merge", "--mllm", str(pair["vl"]), "--llm", str(pair["llm"]), str(tmp_path / "out")], capsys)
    assert code == 1 and err.startswith("error:") and "disk full" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_recipe_flags_with_a_yaml_and_the_weight_warning(pair, tmp_path, capsys):
    recipe = _yaml(tmp_path / "r.yaml", {"merge_method": "linear", "mllm": str(pair["vl"]),
                                        "models": [{"model": str(pair["vl"]), "parameters": {"weight": 0.9}},
                                                   {"model": str(pair["llm"]), "parameters": {"weight": 0.2}}]})
    code, err = _cli(["merge", recipe, "--alpha", "0.5", "--lambda", "2", str(tmp_path / "o")], capsys)
    assert code == 1 and "--alpha, --lambda cannot be combined with CONFIG.yaml" in err
    main(["merge", recipe, str(tmp_path / "o")])
    assert "weights sum to 1.1, not 1" in capsys.readouterr().out
    assert (tmp_path / "o" / "merge_report.json").exists()


def test_interrupted_merge_leaves_nothing(pair, tmp_path):
    calls = []

    def interrupt(advance, total=None, description=None, info=""):
        calls.append(advance)
        if advance:  # the first report of streamed work: the executor reports from the calling thread
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(MergeConfig.simple(str(pair["vl"]), str(pair["llm"])), tmp_path / "out", progress=interrupt,
              block_elements=64)
    assert list(tmp_path.iterdir()) == []


def test_missing_tensor_in_llm_is_an_error(pair, tmp_path):
    short = save_partner_llm(save_tiny("qwen2_5_vl", tmp_path / "vl2", layers=2), tmp_path / "llm2")
    with pytest.raises(DeltakitError, match="has no layers.2"):
        merge(MergeConfig.simple(str(pair["vl"]), str(short)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
