"""Fuzzing the parsers of user files (``analyses/fuzz.py``): a bounded, derandomized run of every target, and
the inputs the longer runs found, each pinned to the one-line error it now gets.

Property: every input parses or raises :class:`deltakit.errors.DeltakitError` (or a subclass) with a
one-line message; nothing else escapes. ``python analyses/fuzz.py --examples N`` runs the targets longer.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from hypothesis import given, settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analyses import fuzz  # noqa: E402
from deltakit.data import DataError, load_examples  # noqa: E402
from deltakit.errors import CheckpointError, DeltakitError  # noqa: E402
from deltakit.evaluate import load_bench  # noqa: E402
from deltakit.io.checkpoint import INDEX_NAME  # noqa: E402
from deltakit.io.format import parse_header  # noqa: E402
from deltakit.merge.config import MergeConfig, MergeConfigError  # noqa: E402

# Examples per target in the suite: about 25 s for all six on 2 busy cores (most of it hypothesis drawing inputs).
EXAMPLES = {"safetensors_header": 200, "safetensors_file": 150, "safetensors_index": 120, "merge_config": 120,
            "training_jsonl": 100, "bench_jsonl": 100}
@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_parser_raises_only_one_line_deltakit_errors(name, tmp_path):
    target = fuzz.TARGETS[name]
    target.setup(tmp_path)

    @settings(max_examples=EXAMPLES[name], derandomize=True, deadline=None, database=None,
              suppress_health_check=fuzz.SUPPRESS, report_multiple_bugs=False)
    @given(target.strategy)
    def run(value):
        fuzz.check(target, value, tmp_path)

    run()


def _rejected(fn, error=DeltakitError) -> str:
    """The message of the one-line ``error`` that ``fn()`` raises."""
    with pytest.raises(error) as err:
        fn()
    fuzz.check_message(err.value)
    return str(err.value)


# -- safetensors header: inputs that escaped before the fix ------------------------------------------------
def _file(header: bytes | dict, data: bytes = b"") -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _entry(**kw):
    return {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **kw}}


HEADERS = [  # (header, what the message says); the old exception in the comment
    (b"[" * 5000 + b"]" * 5000, "JSON nested too deeply"),                        # RecursionError
    (b'{"t": ' + b"9" * 5000 + b"}", "a number with too many digits"),            # ValueError
    (b'{"t": "\xff"}', "not valid UTF-8"),                                         # (was caught, kept)
    (_entry(data_offsets=[0, float("inf")]), "data_offsets"),                    # OverflowError
    (_entry(data_offsets=["0", "8"]), "data_offsets"),                           # parsed; TypeError in Checkpoint.open
    (_entry(shape=[2.0]), "shape"),                                               # parsed as [2]
    (_entry(shape=[-1, -2]), "shape"),                                            # parsed; RuntimeError in get()
    (_entry(shape=[0, 2**64], data_offsets=[0, 0]), "too large to index"),       # parsed; TypeError (multi-line) in get()
    (_entry(shape=[0, 2**62, 2**62], data_offsets=[0, 0]), "too large to index"),  # parsed; RuntimeError in get()
    ({**_entry(), "__metadata__": [["a", "b"]]}, "__metadata__"),                # parsed as {"a": "b"}
    ({**_entry(), "__metadata__": 5}, "__metadata__"),                            # TypeError
    ({**_entry(), "__metadata__": "ab"}, "__metadata__"),                         # ValueError
    ({**_entry(), "__metadata__": {"a": 1}}, "__metadata__"),                     # parsed: not str -> str
    (_entry(dtype="F8_E4M3"), "unsupported dtype 'F8_E4M3'"),
    (_entry(dtype=["F32"]), "unsupported dtype"),
    ({"t": [1, 2]}, "needs dtype, shape and data_offsets"),
]


@pytest.mark.parametrize("header,message", HEADERS, ids=[str(i) for i in range(len(HEADERS))])
def test_bad_safetensors_headers_are_one_line_errors(tmp_path, header, message):
    raw = _file(header, b"\0" * 8)
    msg = _rejected(lambda: parse_header(raw, len(raw), "x.safetensors"), CheckpointError)
    assert msg.startswith("x.safetensors: ") and message in msg
    (tmp_path / "x.safetensors").write_bytes(raw)
    assert message in _rejected(lambda: fuzz.run_file(raw, tmp_path), CheckpointError)


def test_valid_headers_parse_and_overlapping_ones_do_not(tmp_path):
    ok = _file({"__metadata__": {"format": "pt"}, **_entry(), "u": {"dtype": "U8", "shape": [0, 5], "data_offsets": [8, 8]}},
               b"\0" * 8)
    entries, metadata, _ = parse_header(ok, len(ok), "x")
    assert sorted(entries) == ["t", "u"] and metadata == {"format": "pt"}
    # Overlapping ranges are refused, as the reference reader refuses them; a zero-sized tensor overlaps nothing.
    overlap = _file({**_entry(), "v": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8)
    assert "overlap (their data_offsets share bytes [0, 4))" in _rejected(lambda: parse_header(overlap, len(overlap), "x"),
                                                                           CheckpointError)


# -- merge YAML -------------------------------------------------------------------------------------------
GOOD = "merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 0.9}\n  - model: B\n    parameters: {weight: 0.1}\n"
YAMLS = [  # (YAML bytes, what the message says); the old exception in the comment
    (b"merge_method: lin\xe9ar\n", "not valid UTF-8"),                               # UnicodeDecodeError
    (GOOD.encode() + b"seed: 2001-13-45\n", "invalid YAML value (month must be in 1..12)"),  # ValueError
    (GOOD.encode() + b"seed: 1" + b"0" * 5000 + b"\n", "invalid YAML value"),        # ValueError (4300 digits)
    (b"[" * 1100, "nested too deeply"),                                              # RecursionError
    (GOOD.encode() + b"1: x\n~: y\n", "unknown key"),                                # TypeError (sorting 1 and None)
    (GOOD.encode() + b"parameters: [1]\n", "parameters: must be a mapping"),         # TypeError
    (GOOD.encode() + b"parameters: ab\n", "parameters: must be a mapping"),          # ValueError
    (GOOD.encode() + b"modules: 5\n", "modules: expected"),                          # TypeError
    (GOOD.encode() + b"layers: 5\n", "layers: expected"),                            # TypeError
    (GOOD.encode() + b"include: 5\n", "include: expected"),                          # TypeError
    (GOOD.encode() + b"modules: !!set {attn}\n", "modules: expected"),               # parsed (set order random)
    (GOOD.replace("model: B\n", "model: B\n    family: [x]\n").encode(), "family of 'B'"),  # parsed; fails at open
    (GOOD.replace("{weight: 0.1}", "{weight: [{filter: 5, value: 1}]}").encode(), "a filter must be"),  # TypeError in plan
    (GOOD.replace("0.1}", "1" + "0" * 400 + "}").encode(), "too large for a float"),  # OverflowError in plan
    (b"merge_method: linear\nmodels: [\"a\\nb\"]\n", "model 'a\\nb' has no 'weight'"),  # two-line message
]


@pytest.mark.parametrize("text,message", YAMLS, ids=[str(i) for i in range(len(YAMLS))])
def test_bad_merge_yaml_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "m.yaml"
    path.write_bytes(text)
    msg = _rejected(lambda: MergeConfig.from_yaml(path), MergeConfigError)
    assert msg.startswith(f"{path}: ") and message in msg


def test_merge_dict_with_odd_keys_is_one_line_error():
    assert "unknown key" in _rejected(lambda: MergeConfig.from_dict({"merge_method": "linear", "models": ["A"], 1: 0, None: 0}))
    big = {"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 10**5000}}]}
    assert "more than 4300 digits" in _rejected(lambda: MergeConfig.from_dict(big))


def test_empty_layer_list_is_refused():
    """``layers: []`` would select no layer, which the ``--layers`` grammar cannot write back: refused, one line."""
    assert "empty list selects no layer" in _rejected(
        lambda: MergeConfig.from_dict({**__import__("yaml").safe_load(GOOD), "layers": []}))


# -- training and benchmark JSONL ---------------------------------------------------------------------------
@pytest.fixture
def jsonl_dir(tmp_path):
    fuzz.setup_images(tmp_path)
    return tmp_path


def _train(user="<image>hi", images=("images/ok.png",), **kw):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}],
            "images": list(images), **kw}


TRAINING = [  # (second line, what the message says); the old exception in the comment
    (b'{"messages": "\xff"}', ":2: not valid UTF-8"),                                      # UnicodeDecodeError
    (b"[" * 5000 + b"]" * 5000, ":2: not valid JSON (nested too deeply)"),                 # RecursionError
    (b'{"a": ' + b"9" * 5000 + b"}", ":2: not valid JSON (a number with too many digits)"),  # ValueError
    (json.dumps({"messages": [{"role": {}, "content": "x"}]}).encode(), "unknown role {}"),  # TypeError (unhashable)
    (json.dumps(_train(images=["a" * 300])).encode(), "File name too long"),               # OSError
    (json.dumps(_train(images=["images/bomb.png"])).encode(), "decompression bomb"),       # DecompressionBombError
    (json.dumps(_train(images=["a\nb.png"])).encode(), "image not found: '"),              # two-line message
]


@pytest.mark.parametrize("line,message", TRAINING, ids=[str(i) for i in range(len(TRAINING))])
def test_bad_training_lines_are_one_line_errors(jsonl_dir, line, message):
    path = jsonl_dir / "train.jsonl"
    path.write_bytes(json.dumps(_train()).encode() + b"\n" + line + b"\n")
    msg = _rejected(lambda: load_examples(path), DataError)
    assert msg.startswith(f"{path}:2: ") and message in msg


def test_crlf_and_blank_lines_still_read(jsonl_dir):
    path = jsonl_dir / "train.jsonl"
    line = json.dumps(_train()).encode()
    path.write_bytes(line + b"\r\n\r\n  \n" + line + b"\r\n")
    assert [ex.where.rsplit(":", 1)[1] for ex in load_examples(path)] == ["1", "4"]


BENCH = [  # (record, what the message says); the old exception in the comment
    (b'{"question": "q", "answer": "1", "answer_type": "float", "precision": NaN}', "'precision' must be"),  # ValueError
    (b'{"question": "q", "answer": "1", "answer_type": "float", "precision": Infinity}', "'precision' must be"),  # OverflowError
    (b'{"question": "q", "answer": "1", "answer_type": "integer", "query": ["x"]}', "'query' must be a string"),  # prompt a list
    (b'{"question": "\xe9", "answer": "1", "answer_type": "integer"}', "not valid UTF-8"),     # UnicodeDecodeError
    (b'{"question": "q", "answer": "1", "answer_type": "text", "image": "' + b"d/" * 2100 + b'x.png"}',
     "File name too long"),                                                                    # OSError
]


@pytest.mark.parametrize("line,message", BENCH, ids=[str(i) for i in range(len(BENCH))])
def test_bad_bench_lines_are_one_line_errors(jsonl_dir, line, message):
    path = jsonl_dir / "bench.jsonl"
    path.write_bytes(line + b"\n")
    msg = _rejected(lambda: load_bench(path), DataError)
    assert msg.startswith(f"{path}:1: ") and message in msg


# -- model.safetensors.index.json (deltakit/io/checkpoint.py, not edited here) ------------------------------
RIGHT = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}
INDEXES = [  # what still escapes, as found; each must become a one-line CheckpointError
    json.dumps({"weight_map": {**RIGHT, "c": "x" * 300}}).encode(),               # OSError: File name too long
    json.dumps({"weight_map": {**RIGHT, "c": "a\x00b.safetensors"}}).encode(),    # ValueError: embedded null byte
    json.dumps({"weight_map": {**RIGHT, "c": "\ud800.safetensors"}}).encode(),    # UnicodeEncodeError: surrogates
    json.dumps({"weight_map": {**RIGHT, "c": "a\nb.safetensors"}}).encode(),      # CheckpointError on two lines
    b'{"weight_map": ' + b"9" * 5000 + b"}",                                       # ValueError: 4300 digits
]


@pytest.mark.parametrize("raw", INDEXES, ids=["long-name", "nul", "surrogate", "newline", "digits"])
def test_index_escapes_found_by_the_fuzzer(tmp_path, raw):
    fuzz.setup_index(tmp_path)
    assert fuzz.check(fuzz.TARGETS["safetensors_index"], raw, tmp_path) == "rejected"


def test_index_rejections_that_already_hold(tmp_path):
    fuzz.setup_index(tmp_path)
    for raw in (b"\xff", b"[" * 5000, json.dumps({"weight_map": {**RIGHT, "c": 1.5}}).encode(),
                json.dumps({"weight_map": {**RIGHT, "c": "sub.safetensors"}}).encode()):
        assert fuzz.check(fuzz.TARGETS["safetensors_index"], raw, tmp_path) == "rejected"
    (tmp_path / "model" / INDEX_NAME).write_text(json.dumps({"weight_map": RIGHT}))
    assert fuzz.check(fuzz.TARGETS["safetensors_index"], json.dumps({"weight_map": RIGHT}).encode(), tmp_path) == "parsed"


# -- what the CLI prints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["[/x]", "[red]x"])
def test_cli_prints_messages_with_brackets_verbatim(tmp_path, capsys, model):
    from deltakit.cli import main

    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"merge_method": "linear", "models": [model]}))
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err == f"error: {path}: model {model!r} has no 'weight' (set it under its parameters: or the shared parameters:)\n"
