"""Hub model IDs: a real huggingface_hub cache layout (models--org--name/{blobs,snapshots/<hash>,refs/main}, files
as relative symlinks to blobs, as huggingface_hub writes them) built from tiny checkpoints, offline. diff, merge,
prior and eval give the same result by ID as by path; a missing model offline is one error line; a download
asks only for safetensors/config/tokenizer files (huggingface_hub's snapshot_download replaced by a fake: no network)."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from deltakit.cli import main
from deltakit.hub import ALLOW_PATTERNS, HubError, cached_snapshot, parse_model_id, resolve_model
from deltakit.tiny import save_partner_llm
from deltakit.tiny_processor import save_tiny_processor


def add_to_cache(cache: Path, repo_id: str, folder: Path, ref: str = "main") -> Path:
    """``folder`` as huggingface_hub caches a snapshot: content-addressed blobs, relative links, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{ref}@{folder}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / f.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding a tiny Qwen2.5-VL (with processor) as org/vl and its partner LLM as org/llm."""
    from deltakit.tiny import save_tiny

    root = tmp_path_factory.mktemp("hub")
    vl = save_tiny("qwen2_5_vl", root / "vl", seed=3)
    save_tiny_processor(vl)
    llm = save_partner_llm(vl, root / "llm", noise=0.5)
    cache = root / "cache"
    add_to_cache(cache, "org/vl", vl)
    add_to_cache(cache, "org/llm", llm)
    return {"cache": cache, "vl": vl, "llm": llm}


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def test_parse_ids():
    assert parse_model_id("Qwen/Qwen2.5-VL-7B-Instruct") == ("Qwen/Qwen2.5-VL-7B-Instruct", None)
    assert parse_model_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_id in ("./org/name", "/abs/path", "name", "a/b/c", "../x/y"):
        assert parse_model_id(not_id) is None


def test_resolution(offline, tmp_path, monkeypatch):
    snap = resolve_model("org/vl")
    assert snap.parent.parent.name == "models--org--vl" and (snap / "config.json").is_symlink()
    assert resolve_model("org/vl@main") == snap == cached_snapshot("org/vl")
    local = tmp_path / "org" / "vl"  # an existing local path wins over the ID it looks like
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/vl") == Path("org/vl")
    with pytest.raises(HubError, match=r"org/missing: not a local path and not \(completely\) in the Hugging Face cache .*HF_HUB_OFFLINE"):
        resolve_model("org/missing")
    with pytest.raises(HubError, match="revision 'a' in the ID and --revision 'b' disagree"):
        resolve_model("org/other@a", revision="b")


def test_incomplete_snapshot_is_not_used(offline, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    (half / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    add_to_cache(offline["cache"], "org/half", half)
    assert cached_snapshot("org/half") is None
    with pytest.raises(HubError, match="org/half: not a local path"):
        resolve_model("org/half")


def test_download_asks_only_for_safe_files(hub, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, Path(cache_dir), list(allow_patterns)))
        return str(add_to_cache(Path(cache_dir), repo_id, hub["vl"], revision or "main"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    snap = resolve_model("org/new@dev")
    assert calls == [("org/new", "dev", tmp_path / "empty-cache", ALLOW_PATTERNS)]
    assert "*.bin" not in ALLOW_PATTERNS and "*.safetensors" in ALLOW_PATTERNS and "*.json" in ALLOW_PATTERNS
    assert resolve_model("org/new@dev") == snap and len(calls) == 1  # now cached: no second download
    resolve_model("org/pickled", allow_pickle=True)
    assert "*.bin" in calls[-1][3]


def _json(path: Path) -> dict:
    """A diff report without what names the inputs or times the run."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in ("a", "b") and not any(
                w in k for w in ("second", "path", "per_s", "gbps", "throughput", "elapsed"))}
        return [clean(v) for v in x] if isinstance(x, list) else x

    return clean(json.loads(path.read_text()))


def test_diff_merge_prior_by_id_equal_by_path(offline, tmp_path):
    vl, llm = str(offline["vl"]), str(offline["llm"])
    main(["diff", vl, llm, "--json", str(tmp_path / "p.json")])
    main(["diff", "org/vl", "org/llm@main", "--json", str(tmp_path / "i.json")])
    assert _json(tmp_path / "p.json") == _json(tmp_path / "i.json")
    main(["merge", "--mllm", vl, "--llm", llm, "--method", "linear", "--alpha", "0.9", str(tmp_path / "mp")])
    main(["merge", "--mllm", "org/vl", "--llm", "org/llm", "--method", "linear", "--alpha", "0.9", str(tmp_path / "mi")])
    for f in sorted((tmp_path / "mp").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "mi" / f.name).read_bytes()
    assert (tmp_path / "mi" / "tokenizer.json").is_file()  # the MLLM's files were copied from the snapshot
    main(["prior", "--mllm", vl, "--llm", llm, str(tmp_path / "pp.safetensors")])
    main(["prior", "--mllm", "org/vl", "--llm", "org/llm", str(tmp_path / "pi.safetensors")])
    with safe_open(tmp_path / "pp.safetensors", "pt") as a, safe_open(tmp_path / "pi.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 0
        for k in a.keys():
            assert a.get_tensor(k).equal(b.get_tensor(k))


def test_eval_by_id_equal_by_path(offline, tmp_path, capsys):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": "4", "answer_type": "integer"}) + "\n"
                             for i, q in enumerate(["What is 2 + 2?", "How many sides has a square?"])))
    main(["eval", str(offline["vl"]), "--data", str(bench), "--max-new-tokens", "3", "--json", str(tmp_path / "p.json")])
    main(["eval", "org/vl", "--revision", "main", "--data", str(bench), "--max-new-tokens", "3", "--json", str(tmp_path / "i.json")])
    p, i = json.loads((tmp_path / "p.json").read_text()), json.loads((tmp_path / "i.json").read_text())
    assert [r["prediction"] for r in p["predictions"]] == [r["prediction"] for r in i["predictions"]]
    assert i["model"] == "org/vl"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["eval", "org/absent", "--data", str(bench)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: org/absent: not a local path") and len(err.strip().splitlines()) <= 2


def test_finetune_loading_sites_take_ids(offline):
    # finetune loads through open_model (its mapped.path), model_class and load_processor: each resolves the ID.
    import transformers

    from deltakit.hf import load_processor, model_class
    from deltakit.model import open_model

    snap = resolve_model("org/vl")
    assert open_model("org/vl").path == snap
    assert model_class("org/vl") is model_class(offline["vl"]) is transformers.Qwen2_5_VLForConditionalGeneration
    by_id, by_path = load_processor("org/vl@main", "for the test"), load_processor(offline["vl"], "for the test")
    assert by_id.tokenizer.get_vocab() == by_path.tokenizer.get_vocab()
    assert by_id.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        by_path.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
