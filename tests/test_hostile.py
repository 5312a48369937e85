"""Hostile and broken model folders: one clear error line each, and nothing read outside the model folder.

Every case starts from a real tiny checkpoint (``deltakit.tiny.save_tiny("qwen2", ...)``) and breaks one
thing: the safetensors header (offsets, shapes, names, dtypes), the index (shards outside the folder),
links (out of the folder; the Hugging Face cache's links into its blobs must keep working), remote code
(``auto_map``: never imported) and pickles (``.bin``: only with ``--allow-pickle``, then only
``torch.load(weights_only=True)``). The library raises a :class:`DeltakitError` with a one-line message;
``deltakit diff A B`` prints ``error: ...`` on one line and exits 1. Reads outside the folder are caught by
an audit hook that records every file opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltakit.cli import main
from deltakit.errors import CheckpointError, DeltakitError
from deltakit.io.checkpoint import Checkpoint
from deltakit.model import open_model

ROOT = Path(__file__).resolve().parents[1]
SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------------ helpers
class Opened:
    """Every path this process opens (``open`` audit events: builtins.open, os.open, io.open) while watching."""

    def __init__(self):
        self.paths: list[str] = []
        self.watching = False

    def hook(self, event: str, args: tuple) -> None:
        if self.watching and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.path.realpath(os.fsdecode(args[0])))

    def of(self, *files: Path) -> list[str]:
        real = {os.path.realpath(f) for f in files}
        return [p for p in self.paths if p in real]


_OPENED = Opened()
sys.addaudithook(_OPENED.hook)  # audit hooks cannot be removed; this one does nothing unless watching


@pytest.fixture
def opened():
    _OPENED.paths.clear()
    _OPENED.watching = True
    try:
        yield _OPENED
    finally:
        _OPENED.watching = False


@pytest.fixture(scope="module")
def base(tiny_checkpoint) -> Path:
    """The intact tiny Qwen2 (read-only)."""
    return tiny_checkpoint("qwen2")


@pytest.fixture
def copy(base, tmp_path) -> Callable[[str], Path]:
    """``copy(name)`` -> a fresh copy of the tiny model to break."""
    def make(name: str = "model") -> Path:
        return Path(shutil.copytree(base, tmp_path / name))
    return make


def _header(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(f: Path, header_text: str, data: bytes) -> None:
    body = header_text.encode()
    body += b" " * (-len(body) % 8)
    f.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """``deltakit ARGS`` in this process: exit code (0 when it returned) and stderr."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def _refused(folder: Path, base: Path, capsys, *parts: str, allow_pickle: bool = False) -> str:
    """Both ways in: the library raises one CheckpointError line, ``deltakit diff`` prints one error line and exits 1;
    each names every one of ``parts``. Returns the library's message."""
    with pytest.raises(DeltakitError) as exc:
        Checkpoint.open(folder, allow_pickle=allow_pickle)
    message = str(exc.value)
    assert isinstance(exc.value, CheckpointError) and "\n" not in message, message
    code, err = _cli(["diff", str(folder), str(base), *(["--allow-pickle"] if allow_pickle else [])], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0] == f"error: {message}", err
    for part in parts:
        assert part in message, (part, message)
    return message


# ------------------------------------------------------------------------------------ broken safetensors headers
def _same_size_pair(header: dict) -> tuple[str, str]:
    by_size: dict[int, list[str]] = {}
    for k in _tensors(header):
        begin, end = header[k]["data_offsets"]
        by_size.setdefault(end - begin, []).append(k)
    return next((v[0], v[1]) for v in by_size.values() if len(v) >= 2)


def overlapping_offsets(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    a, b = _same_size_pair(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b's bytes are a's: two names, one range
    _write(f, json.dumps(header), data)
    return (b, "overlap")


def offsets_past_the_end(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    name = _tensors(header)[0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data) + 4096, len(data) + 4096 + end - begin]
    _write(f, json.dumps(header), data)
    return (name, "ends at byte")


def offsets_reversed(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    name = _tensors(header)[0]
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]
    _write(f, json.dumps(header), data)
    return (name,)


def byte_count_overflows(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    name = _tensors(header)[0]
    header[name]["shape"] = [2**62, 2**62]  # 2^124 elements: wraps any 64-bit size computation
    _write(f, json.dumps(header), data)
    return (name,)


def zero_sized_but_huge(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    name = _tensors(header)[0]
    header[name]["shape"] = [0, 2**62, 2**62]  # 0 bytes, yet strides past int64
    header[name]["data_offsets"] = [0, 0]
    _write(f, json.dumps(header), data)
    return (name,)


def negative_dims(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    name = next(k for k in _tensors(header) if len(header[k]["shape"]) == 2)
    header[name]["shape"] = [-d for d in header[name]["shape"]]  # same product, same byte count
    _write(f, json.dumps(header), data)
    return (name,)


def duplicate_names(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    a, b = _same_size_pair(header)
    text = json.dumps(header)  # JSON with a repeated key: a second "a" pointing at b's bytes
    text = text[:-1] + f", {json.dumps(a)}: {json.dumps(header[b])}" + "}"
    _write(f, text, data)
    return (a, "duplicate")


def undefined_dtype(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    name = _tensors(header)[0]
    header[name]["dtype"] = "Q4_K"
    _write(f, json.dumps(header), data)
    return (name, "Q4_K")


def header_length_past_the_file(f: Path) -> tuple[str, ...]:
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    return ("header length",)


def metadata_not_strings(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    header["__metadata__"] = ["not", "a", "map"]
    _write(f, json.dumps(header), data)
    return ("__metadata__",)


def deeply_nested(f: Path) -> tuple[str, ...]:
    header, data = _header(f)
    name = _tensors(header)[0]
    text = json.dumps(header).replace(json.dumps(header[name]), "[" * 200_000 + "]" * 200_000, 1)
    _write(f, text, data)
    return ("nested",)


@pytest.mark.parametrize("breaks", [
    overlapping_offsets,
    offsets_past_the_end, offsets_reversed, byte_count_overflows, zero_sized_but_huge, negative_dims,
    duplicate_names,
    undefined_dtype, header_length_past_the_file, metadata_not_strings, deeply_nested,
], ids=lambda f: f.__name__)
def test_broken_header_is_one_error_line(copy, base, capsys, breaks):
    folder = copy()
    parts = breaks(folder / SHARD)
    _refused(folder, base, capsys, str(folder / SHARD), *parts)


def test_a_shard_that_is_a_fifo_is_refused_not_waited_on(copy, base, capsys):
    folder = copy()
    (folder / SHARD).unlink()
    os.mkfifo(folder / SHARD)
    done = threading.Event()

    def unblock() -> None:  # should the check regress, a writer end lets a blocked open() return
        while not done.wait(2):
            try:
                os.close(os.open(folder / SHARD, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=unblock, daemon=True).start()
    try:
        _refused(folder, base, capsys, str(folder / SHARD), "not a regular file")
    finally:
        done.set()


# --------------------------------------------------------------------------------------------- out of the folder
@pytest.fixture
def outside(base, tmp_path) -> dict[str, Path]:
    """Real files outside any model folder: a valid shard (so a refusal is not a parse failure) and a 'secret'."""
    root = tmp_path / "elsewhere"
    root.mkdir()
    shutil.copy(base / SHARD, root / "x.safetensors")
    (root / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n" * 64)
    return {"shard": root / "x.safetensors", "secret": root / "passwd"}


def _index_to(folder: Path, shard_name: str) -> None:
    """Replace the folder's shard by an index that maps every tensor to ``shard_name``."""
    header, _ = _header(folder / SHARD)
    (folder / SHARD).unlink()
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: shard_name for k in _tensors(header)}}))


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_index_naming_a_shard_outside_the_folder_is_refused_unread(copy, base, outside, opened, capsys, how):
    folder = copy()
    name = f"../elsewhere/{outside['shard'].name}" if how == "dotdot" else str(outside["shard"])
    assert (folder / name).resolve() == outside["shard"].resolve()  # the index really points at a readable shard
    _index_to(folder, name)
    message = _refused(folder, base, capsys, str(folder / INDEX), repr(name), "outside the model folder")
    assert "relative paths inside the folder" in message
    assert opened.of(outside["shard"]) == []


def test_index_with_a_non_string_shard_name(copy, base, capsys):
    folder = copy()
    _index_to(folder, SHARD)
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = ["a", "list"]
    (folder / INDEX).write_text(json.dumps(index))
    _refused(folder, base, capsys, str(folder / INDEX), "not a file name")


@pytest.mark.parametrize("target", ["shard", "secret"])
@pytest.mark.parametrize("link", [SHARD, "config.json", "tokenizer.json"])
def test_link_out_of_the_folder_is_refused_unread(copy, base, outside, opened, capsys, target, link):
    """A shard, config or any other file of the folder linked to a file elsewhere (a valid shard, a secret)."""
    folder = copy()
    (folder / link).unlink(missing_ok=True)
    (folder / link).symlink_to(os.path.relpath(outside[target], folder))
    message = _refused(folder, base, capsys, str(folder / link), f"links to {outside[target]}", "outside the model folder",
                       "refusing to read it", "models--*/blobs")
    assert "root:x" not in message
    assert opened.of(outside[target]) == []


def test_links_inside_the_folder_and_to_folders_are_fine(copy, base, capsys):
    folder = copy()
    (folder / "weights").mkdir()
    (folder / SHARD).rename(folder / "weights" / SHARD)
    (folder / SHARD).symlink_to(Path("weights") / SHARD)  # inside: fine
    (folder / "images").symlink_to(base.parent)  # a link to a folder is never read: fine
    with Checkpoint.open(folder) as ckpt:
        assert len(ckpt) == len(Checkpoint.open(base))
    assert _cli(["diff", str(folder), str(base)], capsys)[0] == 0


# ------------------------------------------------------------------------------------- the Hugging Face cache
def _sha256(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _cache(src: Path, cache: Path, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``src`` out as the hub does: ``models--ORG--NAME/{blobs/<sha256>, refs/main, snapshots/REV/<file> ->
    ../../blobs/<sha256>}``. Returns the repo folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / _sha256(f)
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return repo


@pytest.fixture(scope="module")
def hub(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A sharded tiny model and its partner in a Hugging Face cache, as the hub lays it out (read-only)."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    cache = tmp_path_factory.mktemp("hub")
    sharded = tiny_checkpoint("qwen2", max_shard_size="40KB")
    assert (sharded / INDEX).exists()
    _cache(sharded, cache, "org/tiny")
    _cache(tiny_checkpoint("qwen2", seed=1), cache, "org/other")
    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {"org/tiny", "org/other"}  # the hub reads it as its own
    snapshot = Path(snapshot_download("org/tiny", cache_dir=cache, local_files_only=True))
    return {"cache": cache, "snapshot": snapshot, "other": Path(snapshot_download("org/other", cache_dir=cache,
                                                                                   local_files_only=True))}


def test_hugging_face_cache_snapshots_work(hub, base, capsys):
    snapshot = hub["snapshot"]
    assert (snapshot / INDEX).is_symlink() and os.readlink(snapshot / INDEX).startswith("../../blobs/")
    with Checkpoint.open(snapshot) as ckpt:
        assert sorted(ckpt.keys()) == sorted(Checkpoint.open(base).keys())
        assert all(p.is_symlink() for p in ckpt.files())
    assert _cli(["diff", str(snapshot), str(hub["other"])], capsys)[0] == 0


def test_local_dir_linked_to_cache_blobs_works(hub, tmp_path, capsys):
    """``huggingface-cli download --local-dir`` (hub < 0.23) linked large files to absolute cache blob paths."""
    local = tmp_path / "local"
    local.mkdir()
    for f in hub["snapshot"].iterdir():
        (local / f.name).symlink_to(os.path.realpath(f))
    with Checkpoint.open(local) as ckpt:
        assert len(ckpt) and all(os.path.realpath(p).startswith(str(hub["cache"])) for p in ckpt.files())
    assert _cli(["diff", str(local), str(hub["other"])], capsys)[0] == 0


def test_cache_snapshot_linked_elsewhere_is_refused_unread(hub, base, outside, opened, tmp_path, capsys):
    """In a cache snapshot, a link to another repo's blob or out of the cache is refused (copy of the repo, broken)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(hub["snapshot"].parents[1], repo, symlinks=True)
    snapshot = repo / "snapshots" / hub["snapshot"].name
    other_blob = next((hub["other"].parents[1] / "blobs").iterdir())
    for target in (other_blob, outside["shard"]):
        shard = next(p for p in sorted(snapshot.iterdir()) if p.name.endswith(".safetensors"))
        shard.unlink()
        shard.symlink_to(target)
        _refused(snapshot, base, capsys, str(shard), f"links to {target}", "that repo's models--*/blobs")
        assert opened.of(target) == []


# -------------------------------------------------------------------------------------------------- remote code
EVIL = textwrap.dedent("""
    import pathlib
    pathlib.Path({marker!r}).write_text("remote code ran")
    from transformers import PretrainedConfig, ProcessorMixin
    class EvilConfig(PretrainedConfig):
        model_type = "evil"
    class EvilProcessor(ProcessorMixin):
        pass
""")


def _with_remote_code(folder: Path, marker: Path, **config) -> Path:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                         "AutoProcessor": "evil.EvilProcessor"}, **config)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_auto_map_is_never_imported_and_diff_merge_prior_ignore_it(copy, base, tiny_checkpoint, tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = _with_remote_code(copy(), marker)
    assert _cli(["diff", str(folder), str(base)], capsys)[0] == 0
    assert _cli(["merge", "--mllm", str(tiny_checkpoint("qwen2_5_vl")), "--llm", str(folder), str(tmp_path / "m")], capsys)[0] == 0
    assert not marker.exists() and "evil" not in sys.modules


def test_an_architecture_only_remote_code_provides_is_one_error_line(copy, tmp_path, capsys):
    """finetune and eval load the class ``architectures`` names from transformers itself, never ``auto_map``'s."""
    marker = tmp_path / "marker"
    folder = _with_remote_code(copy(), marker, architectures=["EvilForCausalLM"])
    from deltakit.demo.samples import write_demo_data

    data = write_demo_data(tmp_path / "data", n=2, n_bench=1)
    for args in (["finetune", "--model", str(folder), "--data", str(data.train), "--out", str(tmp_path / "o")],
                 ["eval", str(folder), "--data", str(data.bench)]):
        code, err = _cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert "EvilForCausalLM" in lines[0] and str(folder) in lines[0]
    assert not marker.exists() and "evil" not in sys.modules


PROCESSOR = textwrap.dedent("""
    import sys
    from deltakit.errors import DeltakitError
    from deltakit.hf import load_processor
    try:
        load_processor(sys.argv[1], "for the test")
    except DeltakitError as exc:
        print(exc)
""")


@pytest.mark.slow
def test_processor_with_remote_code_is_refused_without_asking(copy, tmp_path):
    """A folder whose processor exists only as remote code (unknown model_type, ``auto_map``): refused, whatever
    stdin says. Run apart, with the hub's module cache under tmp_path, as a failure would import the code."""
    marker = tmp_path / "marker"
    folder = _with_remote_code(copy(), marker, model_type="evil")
    (folder / "processor_config.json").write_text(json.dumps({"auto_map": {"AutoProcessor": "evil.EvilProcessor"}}))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROCESSOR, str(folder)], input="y\ny\ny\n", capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert not marker.exists(), "the folder's Python code was imported"
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert proc.returncode == 0 and str(folder) in proc.stdout and "custom code" in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------ pickles
class Payload:
    """Unpickling this runs a shell command: what ``weights_only=True`` must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_bin(folder: Path, state: dict) -> Path:
    (folder / SHARD).unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_bin_needs_allow_pickle(copy, base, capsys):
    folder = _as_bin(copy(), load_file(base / SHARD))
    _refused(folder, base, capsys, str(folder), "refusing to unpickle", "--allow-pickle", "weights_only=True")
    assert _cli(["diff", str(folder), str(base), "--allow-pickle"], capsys)[0] == 0  # a plain state dict loads


def test_allow_pickle_still_refuses_arbitrary_objects(copy, base, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    folder = _as_bin(copy(), {**load_file(base / SHARD), "payload": Payload(marker)})
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    _refused(folder, base, capsys, str(folder / "pytorch_model.bin"), "refused by torch.load(weights_only=True)",
             "posix.system", allow_pickle=True)
    assert not marker.exists()
    assert calls and all(kw.get("weights_only") is True for kw in calls)


def test_open_model_and_checkpoint_agree_on_a_refusal(copy, outside):
    """The entry point of every command refuses as Checkpoint.open does."""
    folder = copy()
    (folder / SHARD).unlink()
    (folder / SHARD).symlink_to(outside["shard"])
    with pytest.raises(CheckpointError, match="outside the model folder"):
        open_model(folder)
