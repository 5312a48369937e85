"""Checkpoint reader against safetensors' own loader; the sharded writer round-trip; atomic outputs; bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit.errors import CheckpointError, OutputExistsError
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.reader import RowReader
from deltakit.io.writer import SafetensorsWriter, ShardedWriter, TensorSpec, atomic_output_dir


def _load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reader_matches_load_file_on_sharded_checkpoint(tiny_checkpoint, dtype):
    folder = tiny_checkpoint("qwen2_5_vl", dtype=dtype, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    ref = _load_all(folder)
    with Checkpoint.open(folder) as ckpt:
        assert sorted(ckpt.keys()) == sorted(ref)
        assert sorted(ckpt.keys()) == sorted(index["weight_map"])
        for key, want in ref.items():
            meta = ckpt.meta(key)
            assert (meta.dtype, meta.shape) == (want.dtype, tuple(want.shape))
            assert torch.equal(ckpt.get(key), want), key
        key = "model.embed_tokens.weight"
        assert torch.equal(ckpt.rows(key, 100, 137), ref[key][100:137])
        ckpt.release(key)
        assert torch.equal(ckpt.get(key), ref[key])  # released pages fault back in from the file


def test_single_file_and_folder_without_index(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64)}
    save_file(t, tmp_path / "model.safetensors", metadata={"k": "v"})
    for path in (tmp_path, tmp_path / "model.safetensors"):
        with Checkpoint.open(path) as ckpt:
            assert ckpt.metadata() == {"k": "v"}
            for k, v in t.items():
                assert torch.equal(ckpt.get(k), v)


def test_sharded_writer_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "x.weight": torch.randn(40, 16, generator=gen).bfloat16(),
        "y.weight": torch.randn(64, 8, generator=gen),
        "z.bias": torch.randn(7, generator=gen).half(),
        "w.weight": torch.randn(30, 30, generator=gen),
    }
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=3000, metadata={"source": "test"})
        writer.write_rows("y.weight", 32, tensors["y.weight"][32:])  # any order, row ranges
        writer.write("x.weight", tensors["x.weight"])
        writer.write_rows("y.weight", 0, tensors["y.weight"][:32])
        writer.write("w.weight", tensors["w.weight"])
        writer.write("z.bias", tensors["z.bias"])
        assert not list(tmp.glob("model-*.safetensors"))  # shards appear only on close
        writer.close()
        assert not out.exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    loaded = _load_all(out)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    with Checkpoint.open(out) as ckpt:
        assert ckpt.metadata() == {"format": "pt", "source": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


def test_writer_refuses_incomplete_and_leaves_nothing(tmp_path):
    w = SafetensorsWriter(tmp_path / "a.safetensors", [TensorSpec("t", torch.float32, (4, 2))])
    w.write_rows("t", 0, torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="incompletely written"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_error_and_existing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_output_dir(out) as tmp:
            (tmp / "f").write_text("partial")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_pickled_checkpoint_only_when_allowed(tmp_path):
    state = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint.open(tmp_path)
    ckpt = Checkpoint.open(tmp_path, allow_pickle=True)
    assert torch.equal(ckpt.get("model.layers.0.mlp.up_proj.weight"), state["model.layers.0.mlp.up_proj.weight"])
    torch.save(torch.zeros(3), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        Checkpoint.open(tmp_path, allow_pickle=True)


def test_header_validation(tmp_path):
    save_file({"t": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated file"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint.open(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a model folder"):
        Checkpoint.open(tmp_path)


def test_row_reader_matches_load_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 11, generator=gen).bfloat16(), "v": torch.randn(5, generator=gen), "s": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path / "model.safetensors")
    reader = RowReader()
    try:
        want = load_file(tmp_path / "model.safetensors")
        for a, b in ((0, 37), (3, 20), (36, 37)):
            got = reader.read(ckpt, "w", a, b, torch.float64, "x")
            assert got.dtype == torch.float64 and torch.equal(got, want["w"][a:b].double())
        assert torch.equal(reader.read(ckpt, "w", 1, 4, torch.bfloat16, "raw"), want["w"][1:4])
        assert torch.equal(reader.read(ckpt, "v", 1, 3, torch.float32, "x"), want["v"][1:3])
        assert torch.equal(reader.read(ckpt, "s", 0, 1, torch.float64, "x"), torch.tensor([2.5], dtype=torch.float64))
        with open(tmp_path / "model.safetensors", "r+b") as fh:  # cut the data short after opening
            fh.truncate(os.path.getsize(tmp_path / "model.safetensors") - 8)
        last = max(tensors, key=lambda k: ckpt.meta(k).offset)
        with pytest.raises(CheckpointError, match="file ends before byte"):
            reader.read(ckpt, last, 0, tensors[last].reshape(-1, *tensors[last].shape[1:]).shape[0], torch.float64, "x")
    finally:
        reader.close()
        ckpt.close()
