"""DDP and FSDP2 on 2 gloo processes give the single-process weights for the same global batch, DRIFT on.

The bias is shown to act (the DRIFT update is more aligned with D than the SFT update of the same data),
and FSDP2 is also run on a model whose prior-carrying parameters have an odd number of rows (uneven
Shard(0) chunks over 2 processes). The same 2 processes then check DriftBias's shard sums directly:
gradients set on FSDP2 shards, biased by the real bind/_sum_over_shards/apply, against the formula on
whole tensors (dense, unevenly split, and fused MoE experts).
"""

import math
import os

import pytest
import torch
import transformers

from deltakit.drift import DriftBias
from deltakit.tiny import build_tiny, save_tiny
from deltakit.train import TrainConfig, finetune
from deltakit.train import loop as loop_module
from test_drift import reference
from train_helpers import DictPrior, collate, free_port, spawn, synthetic_examples

STEPS = 2
# Text sizes of the uneven model: gate/up_proj [63, 32] and embed_tokens/lm_head [511, 32] split 32 + 31 and
# 256 + 255 rows over 2 processes (torch.chunk, as FSDP2's Shard(0) does: the last chunk is the short one).
UNEVEN = {"intermediate": 63, "vocab": 511}


def _config(base, out, **kw) -> TrainConfig:
    kw = {"prior": "prior", "alpha": 1.0, **kw}
    return TrainConfig(model=str(base), data="synthetic.jsonl", out=str(out), rule="adaptive",
                       lr=1e-3, warmup_ratio=0.0, max_steps=STEPS, adam_eps=1e-4, max_grad_norm=0.5, **kw)


def _patch(prior_tensors) -> None:
    loop_module.load_data = lambda config: (synthetic_examples(8, 0), collate, None)
    loop_module.open_prior = lambda path: DictPrior(prior_tensors)


def _worker(rank, world, runs, shard_port, shard_out):
    torch.set_num_threads(1)
    for port, config, prior in runs:
        _patch(prior)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        finetune(config)
    _shard_check(rank, world, shard_port, shard_out)


def _weights(folder):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def _random_prior(base, seed: int, embeddings: bool = False) -> dict[str, torch.Tensor]:
    """A D of N(0, 0.05^2) entries for every decoder-layer weight but the norms (and embed_tokens/lm_head)."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        canonical = n.removeprefix("model.language_model.")
        if (n.startswith("model.language_model.layers.") and "layernorm" not in n) or (
                embeddings and n in ("model.language_model.embed_tokens.weight", "lm_head.weight")):
            out[canonical] = torch.randn(p.shape, generator=gen) * 0.05
    return out


def _name(canonical: str) -> str:
    return canonical if canonical == "lm_head.weight" else "model.language_model." + canonical


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    base = save_tiny("qwen2_5_vl", tmp / "mllm", seed=0)
    uneven = save_tiny("qwen2_5_vl", tmp / "uneven", seed=0, **UNEVEN)
    prior, uneven_prior = _random_prior(base, 11), _random_prior(uneven, 12, embeddings=True)
    distributed = [(free_port(), _config(base, tmp / "ddp", strategy="ddp", batch_size=1, grad_accum=2), prior),
                   (free_port(), _config(base, tmp / "fsdp", strategy="fsdp", batch_size=1, grad_accum=2, save_every=1), prior),
                   (free_port(), _config(uneven, tmp / "uneven_fsdp", strategy="fsdp", batch_size=1, grad_accum=2), uneven_prior)]
    spawn(_worker, 2, distributed, free_port(), str(tmp / "shards.pt"))
    try:
        _patch(prior)
        finetune(_config(base, tmp / "single", batch_size=2, grad_accum=2))
        # Plain SFT of the same data and steps: no prior at all (DriftBias is never built).
        finetune(_config(base, tmp / "sft", batch_size=2, grad_accum=2, prior=None))
        # Resume the 2-process FSDP run's step-1 checkpoint in one process (DCP reshards it).
        finetune(_config(base, tmp / "resumed", batch_size=4, grad_accum=1, save_every=1, resume=True, run_dir=str(tmp / "fsdp.run")))
        _patch(uneven_prior)
        finetune(_config(uneven, tmp / "uneven_single", batch_size=2, grad_accum=2))
    finally:
        loop_module.load_data, loop_module.open_prior = _ORIGINAL
    names = ("single", "sft", "ddp", "fsdp", "resumed", "uneven_fsdp", "uneven_single")
    return {name: _weights(tmp / name) for name in names} | {
        "base": _weights(base), "uneven_base": _weights(uneven), "prior": prior, "uneven_prior": uneven_prior,
        "shards": torch.load(tmp / "shards.pt")}


_ORIGINAL = (loop_module.load_data, loop_module.open_prior)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "resumed"])
def test_two_processes_match_one(runs, name):
    single, other = runs["single"], runs[name]
    moved = [n for n in single if not torch.equal(single[n], runs["base"][n])]
    assert len(moved) > 20
    for n in single:
        torch.testing.assert_close(other[n], single[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _cos(u: torch.Tensor, d: torch.Tensor) -> float:
    u, d = u.double().flatten(), d.double().flatten()
    return float(u @ d / (u.norm() * d.norm()))


def test_prior_tensors_were_biased(runs):
    # g' = g - c D with c >= 0, so each DRIFT step moves theta along +D: the update theta - theta0 of every
    # prior-carrying tensor is more aligned with D than the SFT update of the same data (whose cosine with an
    # independent random D is ~0), and FSDP (equal to the single process, test above) is far from SFT there.
    base, drift, sft, fsdp = runs["base"], runs["single"], runs["sft"], runs["fsdp"]
    gaps = []
    for canonical, d in runs["prior"].items():
        n = _name(canonical)
        c_drift, c_sft = _cos(drift[n] - base[n], d), _cos(sft[n] - base[n], d)
        # Measured: DRIFT 0.29-0.57 per tensor, SFT within +-0.11 on tensors of >= 512 entries (+-0.45 on 16-entry biases).
        assert c_drift > 0.25 and c_drift > c_sft + 0.15, (canonical, c_drift, c_sft)
        if d.numel() >= 512:
            assert abs(c_sft) < 0.15, (canonical, c_sft)
        gaps.append(c_drift - c_sft)
        # 2 Adam steps of lr 1e-3 move an entry by up to 2e-3: the prior changed FSDP's weights far beyond rtol 1e-5
        assert float((fsdp[n] - sft[n]).abs().max()) > 1e-4, canonical
    assert sum(gaps) / len(gaps) > 0.3
    names = [_name(c) for c in runs["prior"]]
    d_all = torch.cat([d.flatten() for d in runs["prior"].values()])
    u_drift, u_sft = (torch.cat([(w[n] - base[n]).flatten() for n in names]) for w in (drift, sft))
    assert _cos(u_drift, d_all) > _cos(u_sft, d_all) + 0.3  # the whole prior-carrying update


def test_fsdp2_uneven_shards_match_one_process(runs):
    single, fsdp, base = runs["uneven_single"], runs["uneven_fsdp"], runs["uneven_base"]
    prior = runs["uneven_prior"]
    odd = {c for c, d in prior.items() if d.shape[0] % 2}
    assert odd == {f"layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up")} | {
        "embed_tokens.weight", "lm_head.weight"}
    for c in odd:  # the bias acted on the unevenly split tensors: the update leans toward D
        n = _name(c)
        assert _cos(single[n] - base[n], prior[c]) > 0.3, c  # measured 0.52-0.83
    for n in single:
        torch.testing.assert_close(fsdp[n], single[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------- DriftBias shard sums (same 2 processes)
# Two tiny models sharded with FSDP2 fully_shard (Shard(0)) over 2 gloo processes: a dense qwen2 whose gate_proj
# has 63 rows (32 + 31 per process), and a qwen3_moe whose fused experts ([4, 96, 32] gate_up, [4, 32, 48] down)
# put experts 0-1 on rank 0 and 2-3 on rank 1, with some experts' tensors left out of the prior. The real
# DriftBias.bind/_distribute/_sum_over_shards/apply run on the shards; the gathered gradients are checked here
# against the formula on whole canonical tensors.
SHARD_PRIORS = {
    "qwen2": {"layers.0.self_attn.q_proj.weight": 1.0, "layers.0.mlp.gate_proj.weight": 1.0,
              "layers.1.self_attn.v_proj.bias": 1.0, "layers.1.mlp.down_proj.weight": 0.5},
    "qwen3_moe": {"layers.0.self_attn.q_proj.weight": 1.0, "layers.1.mlp.gate.weight": 1.0,
                  **{f"layers.0.mlp.experts.{j}.{p}_proj.weight": 2.0 if j == 1 else 1.0 for j in (0, 1, 3) for p in ("gate", "up")},
                  "layers.1.mlp.experts.2.down_proj.weight": 1.0},
}
SHARD_ALPHA = 0.7


def _expert_slice(full: torch.Tensor, canonical: str) -> torch.Tensor:
    """Expert j's gate/up/down of a fused transformers-5 tensor ([E, 2I, H]: gate rows then up rows; [E, H, I])."""
    j, proj = int(canonical.split(".")[4]), canonical.split(".")[5]
    if proj == "down_proj":
        return full[j]
    half = full.shape[1] // 2
    return full[j, :half] if proj == "gate_proj" else full[j, half:]


def _key(family: str, canonical: str) -> str:
    """The in-memory parameter holding ``canonical`` in build_tiny(family) (written out, not via the family table)."""
    if ".mlp.experts." in canonical:
        layer, proj = canonical.split(".")[1], canonical.split(".")[5]
        return f"model.layers.{layer}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
    return "model." + canonical


def _shard_inputs(family: str, params: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The prior (canonical -> D) and every parameter's gradient, drawn from fixed seeds."""
    gen = torch.Generator().manual_seed(21)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    prior = {}
    for c in SHARD_PRIORS[family]:
        full = params[_key(family, c)]
        shape = _expert_slice(full, c).shape if ".mlp.experts." in c else full.shape
        prior[c] = torch.randn(shape, generator=gen) * 3
    return prior, grads


def _shard_check(rank, world, port, out):
    """In each process: shard each tiny model with FSDP2, set whole-tensor gradients as shards, bias, gather."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for family in SHARD_PRIORS:
            kw = {"intermediate": 63} if family == "qwen2" else {}
            model = build_tiny(family, **kw)
            prior, grads = _shard_inputs(family, {n: p.detach() for n, p in model.named_parameters()})
            fully_shard(model, mesh=mesh)
            params = dict(model.named_parameters())
            assert all(isinstance(p, DTensor) for p in params.values())
            for rule in ("absolute", "gradnorm", "adaptive"):
                bias = DriftBias.bind(model, DictPrior(prior, alphas=SHARD_PRIORS[family]), rule=rule, alpha=SHARD_ALPHA)
                assert bias._shard_rows, "no target was sharded: the all-reduce would not run"
                for n, p in params.items():
                    p.grad = distribute_tensor(grads[n], mesh, p.placements)
                step = bias.apply()
                local_rows = {n: p.grad.to_local().shape[0] for n, p in params.items()}
                full = {n: p.grad.full_tensor() for n, p in params.items()}
                results[family, rule] = {"grads": full, "cos": step.cos, "ratio": step.bias_ratio, "rows": local_rows}
            results[family, "inputs"] = {"prior": prior, "grads": grads}
        rank_rows = [None] * world
        dist.all_gather_object(rank_rows, {f: r["rows"] for (f, rule), r in results.items() if rule == "adaptive"})
        if rank == 0:
            torch.save({"results": results, "rows": rank_rows}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", list(SHARD_PRIORS))
@pytest.mark.parametrize("rule", ["absolute", "gradnorm", "adaptive"])
def test_shard_sums_bias_like_whole_tensors(runs, family, rule):
    results, rows = runs["shards"]["results"], runs["shards"]["rows"]
    got, inputs = results[family, rule], results[family, "inputs"]
    prior, grads = inputs["prior"], inputs["grads"]
    # the parameters really were split over the two processes (unevenly for the 63-row gate_proj)
    for n in grads:
        assert rows[0][family][n] + rows[1][family][n] == grads[n].shape[0], n
    if family == "qwen2":
        assert (rows[0][family]["model.layers.0.mlp.gate_proj.weight"], rows[1][family]["model.layers.0.mlp.gate_proj.weight"]) == (32, 31)
    want = {n: g.clone().double() for n, g in grads.items()}
    cosines, bias_sq = [], 0.0
    for c, d in prior.items():
        n, a = _key(family, c), SHARD_ALPHA * SHARD_PRIORS[family][c]
        g = _expert_slice(grads[n], c) if ".mlp.experts." in c else grads[n]
        ref = reference(g, d, a, rule)
        if ".mlp.experts." in c:
            _expert_slice(want[n], c).copy_(ref)
        else:
            want[n] = ref
        g64, d64 = g.double(), d.double()
        cosines.append(float((g64 * d64).sum() / (g64.norm() * d64.norm())))
        bias_sq += float((ref - g64).square().sum())
    for n in grads:  # biased where the prior covers, untouched elsewhere (expert 2's gate/up, other parameters)
        torch.testing.assert_close(got["grads"][n].double(), want[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    uncovered = "layers.0.mlp.experts.2.gate_proj.weight"
    if family == "qwen3_moe":
        n = _key(family, uncovered)
        assert torch.equal(_expert_slice(got["grads"][n], uncovered), _expert_slice(grads[n], uncovered))
    # DriftStep: the mean cosine over the covered tensors and |sum c D| / |g| over the prior-carrying parameters
    g_sq = sum(float(grads[n].double().square().sum()) for n in {_key(family, c) for c in prior})
    assert got["cos"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-6)
    assert got["ratio"] == pytest.approx(math.sqrt(bias_sq / g_sq), rel=1e-5)
