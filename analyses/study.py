"""The miniature reproduction of the DRIFT paper over seeds: docs/study.md's table, docs/study/*.json, the figures.

For each seed, every method on both MLLMs of the miniature family (:func:`deltakit.demo.study.run_config`;
the family is built once, or reused from the cache). Each seed's JSON goes to docs/study/seed-N.json as soon
as it is done, so an interrupted study resumes where it stopped (seeds with a JSON are not rerun); then the
seeds are aggregated into docs/study/study.json, the table between the ``study:table`` markers of
docs/study.md, and the figures docs/figures/study_pairs.png and docs/figures/study_accuracy.png.

    python analyses/study.py [--seeds 0,1,2] [--work DIR]        # run what is missing, then render
    python analyses/study.py --from-json docs/study              # render only, from the seeds' JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from deltakit.demo.study import aggregate, markdown_table, plot_accuracy, plot_pairs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BEGIN, END = "<!-- study:table -->", "<!-- /study:table -->"


def run_seeds(seeds: list[int], json_dir: Path, work: Path) -> None:
    """Run each seed without a JSON in ``json_dir`` (models deleted once scored; data and reports kept in ``work``).

    The first seed runs every method; the others only those whose result depends on the seed (``SEEDED``: DARE
    and the fine-tuning runs), since the MLLMs and the other merges give the same numbers in every seed."""
    from dataclasses import replace

    from deltakit.demo.family import ensure_family
    from deltakit.demo.settings import SEEDED, StudySettings

    family, built = ensure_family()
    print(f"family {'built' if built else 'reused'}: {family.root}", flush=True)
    json_dir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        dest = json_dir / f"seed-{seed}.json"
        if dest.exists():
            print(f"seed {seed}: {dest} exists, kept", flush=True)
            continue
        started = time.perf_counter()
        print(f"seed {seed}:", flush=True)
        settings = StudySettings() if seed == seeds[0] else replace(StudySettings(), methods=SEEDED)
        config = run_config_logged(family, settings, seed, work / f"seed-{seed}")
        config["date"] = datetime.date.today().isoformat()
        config["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores"
        config["threads"] = os.environ.get("OMP_NUM_THREADS", "default")
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1) + "\n")
        tmp.rename(dest)
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s -> {dest}", flush=True)


def run_config_logged(family, settings, seed: int, work: Path) -> dict:
    from deltakit.demo.study import run_config

    work.mkdir(parents=True, exist_ok=True)
    return run_config(family, settings, seed, work, keep_models=False, log=lambda line: print(line, flush=True))


def render(json_dir: Path, page: Path, figures: Path) -> dict:
    """Aggregate every ``seed-*.json`` of ``json_dir`` into ``json_dir/study.json``, the table of ``page`` (between
    the markers) and the two figures in ``figures``; returns the aggregate."""
    configs = [json.loads(p.read_text()) for p in sorted(json_dir.glob("seed-*.json"))]
    if not configs:
        raise SystemExit(f"no seed-*.json in {json_dir}")
    agg = aggregate(configs)
    (json_dir / "study.json").write_text(json.dumps(agg, indent=1) + "\n")
    plot_pairs(agg, figures / "study_pairs.png")
    plot_accuracy(agg, figures / "study_accuracy.png")
    block = f"{BEGIN}\n{verdict_lines(agg)}\n{markdown_table(agg)}{END}"
    text = page.read_text() if page.exists() else f"# Study\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    page.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL))
    return agg


def verdict_lines(agg: dict) -> str:
    """One line per family: the diff verdict, the merges above the MLLM, whether diff predicted it."""
    n = len(agg["seeds"])
    lines = [f"Seeds {', '.join(map(str, agg['seeds']))} ({n}); accuracy in % as mean ± 95% CI (t, {n - 1} df) "
             "where it varies with the seed; {} test questions.".format(agg["settings"]["n_test"]), ""]
    for fam, v in agg["verdicts"].items():
        above = ", ".join(v["merges_above_base"]) or "none"
        lines.append(f"- **{fam}**: diff verdict *{v['diff_verdict']}* (predicts merging "
                     f"{'helps' if v['predicts_merging_helps'] else 'does not help'}); merges above the MLLM beyond the margin (seed CI + 1.96 test-set SE): "
                     f"{above}; prediction **{'right' if v['prediction_right'] else 'wrong'}**.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning / DARE seeds to run (default 0,1,2)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--from-json", type=Path, default=None, help="render only, from this folder's seed-*.json")
    parser.add_argument("--page", type=Path, default=DOCS / "study.md")
    parser.add_argument("--figures", type=Path, default=DOCS / "figures")
    parser.add_argument("--json-dir", type=Path, default=DOCS / "study")
    args = parser.parse_args(argv)
    json_dir = args.from_json or args.json_dir
    if args.from_json is None:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.work is not None:
            run_seeds(seeds, json_dir, args.work)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run_seeds(seeds, json_dir, Path(tmp))
    agg = render(json_dir, args.page, args.figures)
    print(markdown_table(agg), file=sys.stdout)


if __name__ == "__main__":
    main()
