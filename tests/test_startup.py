"""Start-up: help never imports torch or transformers, and the streaming commands never import transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from deltakit.cli import COMMANDS, cli, main
from deltakit.tiny import save_partner_llm

HEAVY = ("torch", "transformers")

# Every help page: `deltakit --help`, `deltakit <command> --help` and, for a group, each of its subcommands'.
HELP_PAGES = """
import click
from deltakit.cli import COMMANDS, cli, main
pages = [["--help"]]
for name in COMMANDS:
    pages.append([name, "--help"])
    command = cli.get_command(click.Context(cli), name)
    if isinstance(command, click.Group):
        pages += [[name, sub, "--help"] for sub in command.commands]
for args in pages:
    main(args)
"""

# The option vocabularies behind the help pages are torch-free beyond import: configs validate without torch.
CONFIGS = """
import deltakit.cli
from deltakit.demo.settings import DemoSettings
from deltakit.merge import MergeConfig
MergeConfig.simple("vl", "llm", out_dtype="bfloat16")
DemoSettings().validated()
"""


def modules_after(code: str) -> set[str]:
    """The names in ``sys.modules`` after a fresh interpreter has run ``code`` (which must succeed)."""
    report = "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.parametrize("code", ["import deltakit.cli", HELP_PAGES, CONFIGS], ids=["import", "help", "configs"])
def test_help_imports_neither_torch_nor_transformers(code):
    loaded = modules_after(code)
    assert "deltakit.cli" in loaded
    assert not [m for m in HEAVY if m in loaded]


def test_listing_keeps_pipeline_order_and_names_real_commands(capsys):
    main(["--help"])
    section = capsys.readouterr().out.split("Commands:\n")[1]
    assert [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line[2] != " "] == list(COMMANDS)
    for name, short_help in COMMANDS.items():
        assert short_help in " ".join(section.split())
        assert cli.get_command(click.Context(cli), name).name == name
    assert cli.get_command(click.Context(cli), "nope") is None


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    vl = tiny_checkpoint("qwen2_5_vl")
    return vl, save_partner_llm(vl, tmp_path_factory.mktemp("startup") / "llm", noise=0.3)


@pytest.mark.parametrize("command", ["diff", "merge", "prior"])
def test_streaming_commands_do_not_import_transformers(pair, tmp_path, command):
    vl, llm = map(str, pair)
    out = tmp_path / "out.json"
    argv = {"diff": [vl, llm],
            "merge": ["--mllm", vl, "--llm", llm, str(tmp_path / "merged")],
            "prior": ["--mllm", vl, "--llm", llm, str(tmp_path / "prior.safetensors")]}[command]
    loaded = modules_after(f"from deltakit.cli import main\nmain({[command, *argv, '--json', str(out)]!r})")
    assert json.loads(out.read_text())
    assert "torch" in loaded and "transformers" not in loaded


def test_public_api_is_lazy_and_complete(tmp_path):
    """``import deltakit`` loads neither torch nor transformers; every name in ``__all__`` is the object of the
    module that defines it, and ``deltakit.merge``/``deltakit.evaluate`` (modules of those names) call their function."""
    code = f"""
import sys, deltakit
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
import deltakit.diagnostics, deltakit.merge.run, deltakit.prior, deltakit.drift, deltakit.train, deltakit.evaluate
import deltakit.integrations.transformers
assert deltakit.diff is deltakit.diagnostics.diff and deltakit.export_prior is deltakit.prior.export_prior
assert deltakit.Prior is deltakit.prior.Prior and deltakit.DriftBias is deltakit.drift.DriftBias
assert deltakit.finetune is deltakit.train.finetune and deltakit.TrainConfig is deltakit.train.TrainConfig
assert deltakit.DriftCallback is deltakit.integrations.transformers.DriftCallback
assert all(callable(getattr(deltakit, n)) for n in deltakit.__all__ if n != '__version__')
seen = []
deltakit.merge.run.merge = lambda *a, **k: seen.append(('merge', a, k))
deltakit.merge.merge = deltakit.merge.run.merge
deltakit.evaluate.evaluate = lambda *a, **k: seen.append(('evaluate', a, k))
deltakit.merge('recipe.yaml', 'out', force=True)
deltakit.evaluate('model', 'bench.jsonl')
assert seen == [('merge', ('recipe.yaml', 'out'), {{'force': True}}), ('evaluate', ('model', 'bench.jsonl'), {{}})], seen
"""
    subprocess.run([sys.executable, "-c", code], check=True)
