"""The streaming engine: one selection grammar (against sets written out by hand) and the executor (against
direct tensor arithmetic on the loaded files), and the same selection giving the same tensors in diff, merge and prior."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit.diagnostics import diff
from deltakit.engine.executor import Job, Read, execute
from deltakit.engine.selection import DEFAULT_MODULES, PRIOR_MODULES, Selection, SelectionError, parse_layers
from deltakit.families import classify_canonical
from deltakit.engine.sums import dot64, gram64, sq64
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.writer import SafetensorsWriter, TensorSpec
from deltakit.merge import MergeConfig, merge
from deltakit.prior import export_prior
from deltakit.tiny import save_partner_llm

NAMES = [
    "embed_tokens.weight", "norm.weight", "lm_head.weight",
    *(f"layers.{i}.{m}" for i in range(4) for m in (
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight", "mlp.down_proj.weight",
        "input_layernorm.weight", "self_attn.sinks")),
]


def _sel(**kw) -> set[str]:
    s = Selection.parse(**kw)
    return {n for n in NAMES if s(n)}


def _layer(names: set[str], layers, suffixes) -> set[str]:
    return {f"layers.{i}.{s}" for i in layers for s in suffixes} & names


ALL = set(NAMES)
PER_LAYER = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight", "mlp.down_proj.weight",
             "input_layernorm.weight", "self_attn.sinks")


def test_kinds_of_the_2025_towers():
    """What each command's default selection takes from MoE, Qwen3.5 and mllama towers (docs/families.md)."""
    kinds = {
        "layers.0.mlp.experts.7.gate_proj.weight": "mlp.gate", "layers.0.mlp.experts.7.down_proj.weight": "mlp.down",
        "layers.0.mlp.gate.weight": "router", "layers.0.mlp.shared_expert_gate.weight": "router",
        "layers.0.mlp.shared_expert.up_proj.weight": "shared.up", "layers.0.self_attn.q_norm.weight": "norm",
        "layers.0.pre_feedforward_layernorm.weight": "norm", "layers.0.linear_attn.in_proj_qkv.weight": "attn.qkv",
        "layers.0.linear_attn.in_proj_b.weight": "attn.b", "layers.0.linear_attn.out_proj.weight": "attn.out",
        "layers.0.linear_attn.conv1d.weight": "linear_attn.conv", "layers.0.linear_attn.A_log": "linear_attn.A_log",
        "layers.0.linear_attn.norm.weight": "linear_attn.norm", "cross_layers.3.cross_attn.q_proj.weight": "cross",
    }
    assert {n: classify_canonical(n)[1] for n in kinds} == kinds
    prior, merge = Selection.parse(DEFAULT_MODULES["prior"]), Selection.parse(DEFAULT_MODULES["merge"])
    assert {n for n in kinds if prior(n)} == {
        "layers.0.mlp.experts.7.gate_proj.weight", "layers.0.mlp.experts.7.down_proj.weight",
        "layers.0.linear_attn.in_proj_qkv.weight", "layers.0.linear_attn.in_proj_b.weight",
        "layers.0.linear_attn.out_proj.weight"}
    assert {n for n in kinds if not merge(n)} == {"cross_layers.3.cross_attn.q_proj.weight"}
    assert "cross" not in PRIOR_MODULES and "router" in PRIOR_MODULES


def test_layer_grammar():
    assert parse_layers("0:8,12:") == ((0, 8), (12, None))
    assert parse_layers("5") == ((5, 6),)
    assert parse_layers(":3") == ((0, 3),)
    assert parse_layers([[4, 28], 30]) == ((4, 28), (30, 31))
    assert parse_layers(None) is None and parse_layers(" ") is None
    for bad in ("3:3", "5:2", "-1", "a:b", "1:2:3"):
        with pytest.raises(SelectionError, match="bad layer range"):
            parse_layers(bad)
    assert Selection.parse("attn", "0:2,3").layers_text == "0:2,3"


def test_selection_by_module_layer_skip_and_globs():
    assert _sel() == ALL
    assert _sel(modules="attn") == _layer(ALL, range(4), ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight"))
    assert _sel(modules="attn.q,norm") == _layer(ALL, range(4), ("self_attn.q_proj.weight", "self_attn.q_proj.bias",
                                                                 "input_layernorm.weight")) | {"norm.weight"}
    assert _sel(modules="other") == _layer(ALL, range(4), ("self_attn.sinks",))
    # the layer filter leaves tensors outside the decoder layers to the module filter alone
    assert _sel(layers="1:3") == _layer(ALL, (1, 2), PER_LAYER) | {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    assert _sel(modules="mlp", layers="0,2:", skip_first=3) == {"layers.3.mlp.down_proj.weight"}
    assert _sel(modules="attn", include="layers.*.self_attn.q_proj.*", exclude="*.bias") == \
        _layer(ALL, range(4), ("self_attn.q_proj.weight",))
    assert _sel(exclude=["layers.*", "lm_head.*"]) == {"embed_tokens.weight", "norm.weight"}
    with pytest.raises(SelectionError, match="unknown module 'attention'"):
        Selection.parse("attention")
    with pytest.raises(SelectionError, match="skip_first"):
        Selection.parse(skip_first=-1)


# ---------------------------------------------------------------------------------------------- executor
@pytest.fixture()
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 11, generator=g), "b": torch.randn(37, 11, generator=g).to(torch.bfloat16),
               "v": torch.randn(5, generator=g), "s": torch.tensor(3.5)}
    save_file(tensors, tmp_path / "in.safetensors")
    return Checkpoint.open(tmp_path / "in.safetensors"), tensors


def test_executor_blocks_reads_writes_and_order(files, tmp_path):
    ckpt, t = files
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def compute(block):
        a, b = block.read(0), block.read(1)
        with lock:
            seen.append((block.start, block.stop))
        time.sleep(0.001 * (block.stop % 3))  # finish out of order
        block.write("out", block.start, (a + 2 * b).to(torch.float32))
        return float(a.double().sum())

    job = Job("x", [Read(ckpt, "a", torch.float32), Read(ckpt, "b", torch.float32)], 0, 37, 11, compute)
    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, [TensorSpec("out", torch.float32, (37, 11))]) as w:
        [sums] = execute([job], w, threads=3, block_elements=44)
    assert sorted(seen) == [(a, min(a + 4, 37)) for a in range(0, 37, 4)]
    # values come back in block order whatever order the threads finished in
    assert sums == pytest.approx([float(t["a"][a:a + 4].double().sum()) for a in range(0, 37, 4)], rel=1e-12)
    torch.testing.assert_close(load_file(out)["out"], t["a"] + 2 * t["b"].float(), rtol=0, atol=0)


def test_executor_whole_jobs_ranges_vectors_and_scalars(files):
    ckpt, t = files

    def whole(block):
        assert (block.start, block.stop) == (3, 30)
        return [(a, b, torch.equal(block.read(0, a, b), t["a"][a:b])) for a, b in block.sub_blocks()]

    jobs = [Job("w", [Read(ckpt, "a", torch.float32)], 3, 30, 11, whole, whole=True),
            Job("v", [Read(ckpt, "v", torch.float64)], 0, 5, 1, lambda b: b.read(0).clone()),
            Job("s", [Read(ckpt, "s", torch.float32)], 0, 1, 1, lambda b: b.read(0).clone())]
    w, v, s = execute(jobs, threads=2, block_elements=110)
    assert w == [[(a, min(a + 10, 30), True) for a in range(3, 30, 10)]]
    assert torch.equal(v[0], t["v"].double()) and v[0].dtype == torch.float64
    assert s[0].tolist() == [3.5]


def test_executor_raises_the_first_error_and_stops(files):
    ckpt, _ = files
    calls = []

    def compute(block):
        calls.append(block.start)
        if block.start == 0:
            raise ValueError("boom")
        time.sleep(0.01)

    job = Job("x", [Read(ckpt, "a", torch.float32)], 0, 37, 11, compute, block_rows=1)
    with pytest.raises(ValueError, match="boom"):
        execute([job], threads=1)
    assert len(calls) < 37  # the rest was cancelled


# ---------------------------------------------------------------------------------------------- one selection, three commands
def test_one_selection_means_the_same_tensors_everywhere(tiny_checkpoint, tmp_path):
    vl = tiny_checkpoint("qwen2_5_vl", seed=0, layers=4)
    llm = save_partner_llm(vl, tmp_path / "llm", noise=0.3)
    sel = dict(modules="attn,mlp", layers="1:", skip_first=2, exclude="*.bias,*.down_proj.*")
    want = {f"layers.{i}.{m}.weight" for i in (2, 3) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    report = diff(vl, llm, selection=Selection.parse(**sel))
    assert {t.canonical for t in report.tensors} == want

    export_prior(vl, llm, tmp_path / "p.safetensors", **sel)
    assert set(load_file(tmp_path / "p.safetensors")) == want

    merge(MergeConfig.simple(str(vl), str(llm), alpha=0.5, **sel), tmp_path / "m")
    a = {k: v for f in sorted(vl.glob("*.safetensors")) for k, v in load_file(f).items()}
    m = {k: v for f in sorted((tmp_path / "m").glob("*.safetensors")) for k, v in load_file(f).items()}
    changed = {k.removeprefix("model.") for k in a if not torch.equal(a[k], m[k])}
    assert changed == want


def test_dot64_is_within_its_stated_error_of_float64():
    g = torch.Generator().manual_seed(3)
    for n in (1, 511, 512, 5000, 1 << 19):
        a, b = torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) + 0.5
        ref = float(torch.dot(a.double(), b.double()))
        assert abs(dot64(a, b) - ref) <= 1e-7 * float(a.double().norm() * b.double().norm()), n
        assert sq64(a) == pytest.approx(float(a.double().square().sum()), rel=1e-7)
    assert dot64(torch.zeros(0), torch.zeros(0)) == 0.0


def test_gram64_is_within_the_error_of_dot64_for_stacks_views_and_copies():
    g = torch.Generator().manual_seed(4)
    for n in (1, 1023, 1024, 5000, 1 << 19):
        x = torch.randn(3, n, generator=g) * torch.tensor([[3.0], [1.0], [0.01]]) + 0.5
        ref = x.double() @ x.double().T
        bound = 1e-7 * torch.outer(x.double().norm(dim=1), x.double().norm(dim=1))
        for vectors in (x, [x[0], x[1], x[2]], [x[2], x[0]]):  # stacked, views in place, a copy
            idx = [0, 1, 2] if len(vectors) == 3 else [2, 0]
            got = gram64(vectors)
            assert got.dtype == torch.float64 and got.shape == (len(idx), len(idx))
            assert ((got - ref[idx][:, idx]).abs() <= bound[idx][:, idx]).all(), n
    # the positive sums a float32 running sum gets wrong: 512K squares of ~1 within 1e-7 relative
    y = torch.rand(1, 1 << 19, generator=g) + 0.5
    assert float(gram64(y)) == pytest.approx(float(y.double().square().sum()), rel=1e-7)


def test_read_all_stacks_every_input_in_the_read_dtype(files):
    ckpt, t = files

    def compute(block):
        x = block.read_all((11,))
        return x.dtype, x.clone()

    job = Job("x", [Read(ckpt, "a", torch.float32), Read(ckpt, "b", torch.float32)], 0, 37, 11, compute)
    [blocks] = execute([job], threads=2, block_elements=44)
    assert {dtype for dtype, _ in blocks} == {torch.float32}
    torch.testing.assert_close(torch.cat([x for _, x in blocks], dim=1), torch.stack([t["a"], t["b"].float()]), rtol=0, atol=0)


@pytest.mark.parametrize("keep_bytes", [0, 6 * 11 * 2 * 4, 1 << 20])
def test_kept_blocks_fit_the_share_and_hold_their_reads(files, keep_bytes):
    """Block.kept gives buffers for the first blocks up to this thread's share; rows read into them are the file's."""
    ckpt, t = files

    def whole(block):
        blocks = block.sub_blocks()
        kept = block.kept(blocks, (11,))
        for k, (a, b) in enumerate(blocks):
            if kept[k] is not None:
                block.read_all((11,), a, b, kept=kept[k])
        return [None if x is None else x.clone() for x in kept], blocks

    job = Job("w", [Read(ckpt, "a", torch.float32), Read(ckpt, "b", torch.float32)], 0, 37, 11, whole, whole=True)
    [[(kept, blocks)]] = execute([job], threads=1, block_elements=66, keep_bytes=keep_bytes)
    assert blocks == [(a, min(a + 6, 37)) for a in range(0, 37, 6)]
    want = min(len(blocks), keep_bytes // (6 * 11 * 2 * 4))  # 2 inputs of 6 rows of 11 float32 per block
    assert [x is not None for x in kept] == [True] * want + [False] * (len(blocks) - want)
    for x, (a, b) in zip(kept, blocks):
        if x is not None:
            assert torch.equal(x, torch.stack([t["a"][a:b], t["b"][a:b].float()]))


def test_kept_blocks_hold_bf16_inputs_as_stored_and_give_them_back_in_the_read_dtype(tmp_path, monkeypatch):
    """Inputs all stored in bf16 and read in float32 are kept in bf16 (twice the blocks fit the share), read from the
    file once, and come back as the file's values in float32 on every pass."""
    from deltakit.io.reader import RowReader

    g = torch.Generator().manual_seed(5)
    t = {k: torch.randn(37, 11, generator=g).to(torch.bfloat16) for k in ("a", "b")}
    save_file(t, tmp_path / "bf16.safetensors")
    ckpt = Checkpoint.open(tmp_path / "bf16.safetensors")
    pread = RowReader._pread
    read: list[int] = []
    monkeypatch.setattr(RowReader, "_pread", lambda self, file, out, offset: (read.append(out.numel() * out.element_size()),
                                                                             pread(self, file, out, offset))[1])

    def whole(block):
        blocks = block.sub_blocks()
        kept = block.kept(blocks, (11,))
        passes = []
        for _ in range(2):
            passes.append([block.read_all((11,), a, b, kept=kept[k], filled=bool(passes)).clone()
                           for k, (a, b) in enumerate(blocks)])
        return [None if x is None else x.dtype for x in kept], passes, blocks

    job = Job("w", [Read(ckpt, "a", torch.float32), Read(ckpt, "b", torch.float32)], 0, 37, 11, whole, whole=True)
    [[(dtypes, passes, blocks)]] = execute([job], threads=1, block_elements=66, keep_bytes=2 * (6 * 11 * 2 * 2))
    assert dtypes == [torch.bfloat16] * 2 + [None] * (len(blocks) - 2)  # 2 blocks of 2 bf16 inputs of 6 x 11
    want = torch.stack([t["a"].float(), t["b"].float()])
    for rows in passes:
        assert all(x.dtype == torch.float32 for x in rows)
        assert torch.equal(torch.cat(rows, dim=1), want)
    # the kept blocks are read once, the others on both passes: 37 rows of 2 inputs, then 37 - 12 of them again
    assert sum(read) == (37 + 25) * 11 * 2 * 2
