"""Benchmark (issue 8, speed and memory goals): whole `deltakit` and `mergekit-yaml` processes from 0.5B to 7B, side by side.

Models: bf16, seeded random, shape-faithful (analyses/shaped.py on published config.json files), built
once per size into `--work DIR/<size>` and reused while its `recipe.json` marker matches; a size's
folder is deleted once measured unless `--keep`.
- 0.5b, 1.5b, 3b: A = a Qwen2 LLM (3b: `Qwen__Qwen2.5-3B`; 0.5b, 1.5b: that config with the published
  Qwen2.5-0.5B / 1.5B text sizes, reconstructed in QWEN25_TEXT); B = write_partner(A), text cosine ~0.7;
  V = `Qwen__Qwen2.5-VL-3B-Instruct` with A's text sizes by write_partner(A, noise=0): text tower = A bit
  for bit, VL-3B's vision tower.
- 7b: V = `Qwen__Qwen2.5-VL-7B-Instruct`, B = its partner as `deepseek-ai__DeepSeek-R1-Distill-Qwen-7B`
  (cosine ~0.7). No A and no mergekit (it would need ~30 GB RSS; the machine has 24 GiB).
- tiny, tiny7b: the 3b and 7b recipes shrunk to a few MB (shaped.TINY, vocab 4096), for smoke runs.

Each command is a whole process (spawn to exit, imports included) under GNU time (`/usr/bin/time -f
"%e %U %S %M"`: wall, user, sys, max RSS of that process tree alone; this parent's own rusage would carry
its high-water RSS into the child across fork+exec). `--repeats` rounds each run every command once;
an output's size is taken and it is deleted right after its run.
  floor          this script as a child: every matched text tensor of the diff pair read through deltakit's
                 I/O path (`execute` on `plan_diff(pair(...))`'s jobs, diff's threads and block size, no math)
  diff           deltakit diff A B --json F                                    (7b: V B)
  merge          deltakit merge --mllm A --llm B --alpha 0.9 OUT, linear, all text modules (embeddings
                 too, mergekit's work)                                          (7b: --mllm V)
  mergekit       mergekit-yaml, linear 0.9 A + 0.1 B, float32 compute, bf16 out (bench_merge.recipe)
  ties           deltakit merge --method ties --base A --density 0.2, A and B at 0.5      (0.5b, 3b)
  mergekit_ties  mergekit-yaml, the same TIES (skipped by --no-ties-mergekit: ~5 min at 3B)
  prior          deltakit prior --mllm V --llm B OUT.safetensors (bf16, default modules attn,mlp)
  dd_read        (7b) dd if=F of=/dev/null bs=16M over every file of V and B: the disk's read rate
  dd_write       (7b) dd if=/dev/zero of=F bs=16M count=N conv=fdatasync, N x 16 MiB >= V: its write rate
  and `python3 -c "import torch"`, the RSS every command starts from.
Caches: 3b and smaller: the inputs are read once right before each run (warm). 7b: os.sync(), then
`echo 3 > /proc/sys/vm/drop_caches` (then torch and deltakit are imported once, untimed, to bring the
tools' libraries back), or posix_fadvise(DONTNEED) on every input file when that is refused
or with `--drop fadvise` (cold); the method, the fraction still cached (fincore) and the load average
before each run are recorded. Bytes: floor and diff read the matched text tensors of both models, prior
its attn/mlp tensors of both and writes its file, merge/ties/mergekit read all of the MLLM's files plus
the LLM's matched text tensors and write the output. GB/s = (read + written) / best wall.
Goals (same run): mergekit / merge >= 5x, mergekit_ties / ties >= 10x, diff / floor <= 1.3 and prior /
diff <= 1.3 at 3b (best walls); at 7b diff, prior and merge >= 0.8 of the disk floor for their bytes
(read / dd read rate + written / dd write rate, over the best wall) and peak RSS < 2 GiB. deltakit
fsyncs what it writes; mergekit does not.

    python3 analyses/bench_scale.py [--sizes 0.5b,1.5b,3b,7b] [--repeats 2] [--work DIR] [--keep]
        [--only floor,diff,...] [--no-ties-mergekit] [--drop auto|fadvise] [--out docs/benchmarks/scale.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import operator
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_merge import _cpu_model, recipe  # noqa: E402  (analyses/ is this script's folder)

BIN = Path(sys.executable).parent  # this interpreter's console scripts, no version-manager shim in front
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ALL_TEXT = "attn,mlp,norm,embed,lm_head"
COMMANDS = ("floor", "diff", "merge", "mergekit", "ties", "mergekit_ties", "prior", "dd_read", "dd_write")
QWEN25_TEXT = {  # the published Qwen/Qwen2.5-0.5B and -1.5B text sizes (both tie their embeddings), reconstructed
    "0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936),
    "1.5b": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936),
}
TINY_TEXT = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=4096)  # shaped.TINY, small vocab
TINY_VISION = dict(vision_layers=2, vision_hidden=32, vision_heads=2)
VL3B, VL7B, R1_7B = "Qwen__Qwen2.5-VL-3B-Instruct", "Qwen__Qwen2.5-VL-7B-Instruct", "deepseek-ai__DeepSeek-R1-Distill-Qwen-7B"
COSINE = 0.7
drop_refused: str | None = None


@dataclass(frozen=True)
class Size:
    """The configs and shrink() sizes of one size's models, and how it is measured."""

    mllm: str  # V's config
    llm: str | None = "Qwen__Qwen2.5-3B"  # A's config; None: no A, B is V's partner in `partner`'s config
    partner: str | None = None
    text: dict | None = None  # shrink() text sizes (None: as published)
    vision: dict | None = None
    cold: bool = False  # drop the inputs' cached pages before each run; measure the dd floors
    ties: bool = False
    note: str = ""


SIZES = {
    "tiny": Size(VL3B, text=TINY_TEXT, vision=TINY_VISION, ties=True, note="smoke test only"),
    "0.5b": Size(VL3B, text=QWEN25_TEXT["0.5b"], ties=True, note="Qwen2.5-0.5B sizes reconstructed"),
    "1.5b": Size(VL3B, text=QWEN25_TEXT["1.5b"], note="Qwen2.5-1.5B sizes reconstructed"),
    "3b": Size(VL3B, ties=True, note="published configs"),
    "7b": Size(VL7B, None, R1_7B, cold=True, note="published configs; no mergekit: it would need ~30 GB RSS"),
    "tiny7b": Size(VL7B, None, R1_7B, text=TINY_TEXT, vision=TINY_VISION, cold=True, note="smoke test only"),
}


# -- models ------------------------------------------------------------------------------------------
def size_recipe(size: Size, name: str) -> dict:
    """What the generator is asked for: the marker of a built size (another recipe rebuilds it)."""
    from shaped import noise_for_cosine

    def model(config: str, vision: bool, source: str | None, noise: float, seed: int) -> dict:
        return {"config": config, "text": size.text, "vision": size.vision if vision else None, "from": source,
                "noise": noise, "seed": seed}

    noise = noise_for_cosine(COSINE)
    if size.llm:
        models = {"A": model(size.llm, False, None, 0.0, 0), "B": model(size.llm, False, "A", noise, 1),
                  "V": model(size.mllm, True, "A", 0.0, 2)}
    else:
        models = {"V": model(size.mllm, True, None, 0.0, 0), "B": model(size.partner, False, "V", noise, 1)}
    return {"generator": "analyses/shaped.py write_checkpoint/write_partner, bf16, default shards", "size": name,
            "models": models}


def build(name: str, size: Size, folder: Path) -> tuple[dict[str, Path], float]:
    """The models of a size, built or reused; returns their folders and the build seconds (0 when reused)."""
    import shaped

    spec = size_recipe(size, name)
    paths = {k: folder / k for k in spec["models"]}
    marker = folder / "recipe.json"
    if marker.exists() and json.loads(marker.read_text()) == spec and all(p.is_dir() for p in paths.values()):
        return paths, 0.0
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    configs = {}
    for k, m in spec["models"].items():
        sizes = {**(m["text"] or {}), **(m["vision"] or {})}
        configs[k] = shaped.shrink(shaped.load_config(m["config"]), **sizes) if sizes else shaped.load_config(m["config"])
    nbytes = [sum(s.nbytes for s in shaped.plan(c)) for c in configs.values()]
    if shutil.disk_usage(folder).free < sum(nbytes) + max(nbytes):  # the models and the largest output
        raise SystemExit(f"{name}: needs ~{(sum(nbytes) + max(nbytes)) / 1e9:.1f} GB free under {folder}")
    start = time.perf_counter()
    for k, m in spec["models"].items():
        if m["from"] is None:
            shaped.write_checkpoint(configs[k], paths[k], seed=m["seed"])
        else:
            shaped.write_partner(paths[m["from"]], configs[k], paths[k], noise=m["noise"], seed=m["seed"])
        print(f"{name}: built {k} ({_size(paths[k]) / 1e9:.2f} GB)", file=sys.stderr)
    marker.write_text(json.dumps(spec, indent=2) + "\n")
    return paths, time.perf_counter() - start


def _files(*folders: Path) -> list[Path]:
    return [f for d in folders for f in sorted(d.glob("*.safetensors"))]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def text_bytes(x: Path, y: Path, modules: str | None = None) -> tuple[int, int]:
    """Bytes of the matched text tensors (those ``modules`` selects) on each side, as deltakit pairs them."""
    from deltakit.diagnostics import plan_diff
    from deltakit.engine.selection import Selection
    from deltakit.model import open_model
    from deltakit.pairing import pair

    ma, mb = open_model(x), open_model(y)
    try:
        jobs = plan_diff(pair(ma, mb), *([Selection.parse(modules)] if modules else []))
        side = [sum(j.numel * j.reads[i].ckpt.meta(j.reads[i].key).dtype.itemsize for j in jobs) for i in (0, 1)]
        return side[0], side[1]
    finally:
        ma.ckpt.close()
        mb.ckpt.close()


def child_floor(a: str, b: str) -> None:
    """The read floor, in a child: every matched text tensor of ``a`` and ``b`` read as `deltakit diff` does."""
    from deltakit.diagnostics import BLOCK_ELEMENTS, plan_diff
    from deltakit.engine.executor import default_threads, execute
    from deltakit.model import open_model
    from deltakit.pairing import pair

    jobs = [dataclasses.replace(j, compute=lambda block: (block.read(0), block.read(1)) and None)
            for j in plan_diff(pair(open_model(a), open_model(b)))]
    start = time.perf_counter()
    execute(jobs, threads=default_threads(), block_elements=BLOCK_ELEMENTS, description="read floor")
    print(json.dumps({"seconds": time.perf_counter() - start, "tensors": len(jobs)}))


# -- caches and measurement --------------------------------------------------------------------------
def warm(files: list[Path]) -> dict:
    buf = memoryview(bytearray(16 << 20))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return {"method": "warm"}


def drop(files: list[Path], how: str) -> dict:
    """Evict ``files`` from the page cache; the method used and the fraction still cached after it."""
    global drop_refused
    os.sync()
    method = "fadvise"
    if how == "auto" and drop_refused is None:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            method = "drop_caches"  # global: bring the tools' own libraries back, so only the inputs are cold
            subprocess.run([sys.executable, "-c", "import torch, click, rich, deltakit.diagnostics, deltakit.merge, deltakit.prior"],
                           check=True, cwd=ROOT, env=ENV)
        except OSError as exc:
            drop_refused = f"drop_caches refused ({exc}): posix_fadvise(DONTNEED) on every input file instead"
            print(drop_refused, file=sys.stderr)
    if method == "fadvise":
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    cached = None
    if shutil.which("fincore") and files:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
                             capture_output=True, text=True)
        if out.returncode == 0:
            cached = sum(int(v) for v in out.stdout.split()) / max(1, sum(f.stat().st_size for f in files))
    return {"method": method, "cached_fraction_after": cached}


def measure(argv: list[str], log: Path) -> dict:
    """Run ``argv`` under GNU time: wall, user and sys seconds and peak RSS (MiB) of that process tree."""
    stats, load = log.with_suffix(".time"), os.getloadavg()
    with open(log, "w") as out:
        rc = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %U %S %M", *argv], stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=ENV).returncode
    if rc:
        raise RuntimeError(f"{' '.join(argv)} failed ({rc}):\n{log.read_text()[-3000:]}")
    wall, user, sys_s, rss_kb = stats.read_text().splitlines()[-1].split()
    return {"wall_s": float(wall), "user_s": float(user), "sys_s": float(sys_s), "peak_rss_mib": int(rss_kb) / 1024,
            "load_avg_before": load}


def reported(cmd: str, log: Path, report: Path) -> dict:
    """What the tool says of its run: work seconds (imports excluded); diff's bytes and cosine too."""
    try:
        data = json.loads(log.read_text().strip().splitlines()[-1] if cmd == "floor" else report.read_text())
    except (OSError, IndexError, ValueError):
        return {"work_s": None}
    summary = data.get("summary", data)  # diff nests its totals under "summary"
    out = {"work_s": summary.get("seconds")}
    if cmd == "diff":
        out.update(tool_bytes_read=summary.get("bytes_read"), cosine=summary.get("overall", {}).get("cosine"))
    return out


# -- one size ----------------------------------------------------------------------------------------
def plan_commands(size: Size, p: dict[str, Path], folder: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Per command: argv ({out}, {report} filled in per run), inputs (for the caches), bytes it must read."""
    dk, a, b, v = str(BIN / "deltakit"), p.get("A", p["V"]), p["B"], p["V"]  # a: the diff pair's and merge's first
    text_a, text_b = text_bytes(a, b)
    diff_read, merge_read = text_a + text_b, sum(_size(f) for f in _files(a)) + text_b  # merge: the MLLM's files + LLM's text
    cmds = {
        "floor": dict(argv=[sys.executable, __file__, "--child-floor", str(a), str(b)], inputs=[a, b], read=diff_read),
        "diff": dict(argv=[dk, "diff", str(a), str(b), "--json", "{report}"], inputs=[a, b], read=diff_read),
        "merge": dict(argv=[dk, "merge", "--mllm", str(a), "--llm", str(b), "--alpha", "0.9", "--modules", ALL_TEXT,
                            "--json", "{report}", "{out}"], inputs=[a, b], read=merge_read),
        "prior": dict(argv=[dk, "prior", "--mllm", str(v), "--llm", str(b), "{out}", "--json", "{report}"], inputs=[v, b],
                      read=sum(text_bytes(v, b, "attn,mlp")), suffix=".safetensors"),
    }

    def mergekit(method: str) -> dict:
        cfg = folder / f"mergekit_{method}.yml"  # JSON is YAML
        cfg.write_text(json.dumps({**recipe(method, a, b), "dtype": "float32", "out_dtype": "bfloat16"}, indent=2))
        return dict(argv=[str(BIN / "mergekit-yaml"), str(cfg), "{out}", "--no-copy-tokenizer", "--lazy-unpickle", "--quiet",
                          "--out-shard-size", args.mergekit_shard_size], inputs=[a, b], read=merge_read)

    if "A" in p:
        cmds["mergekit"] = mergekit("linear")
        if size.ties:
            cmds["ties"] = dict(argv=[dk, "merge", "--mllm", str(a), "--llm", str(b), "--method", "ties", "--base", str(a),
                                      "--density", "0.2", "--alpha", "0.5", "--modules", ALL_TEXT, "--json", "{report}", "{out}"],
                                inputs=[a, b], read=merge_read)
            if not args.no_ties_mergekit:
                cmds["mergekit_ties"] = mergekit("ties")
    if size.cold:
        files = _files(v, b)
        loop = 'for f; do dd if="$f" of=/dev/null bs=16M status=none || exit 1; done'
        cmds["dd_read"] = dict(argv=["sh", "-c", loop, "sh", *map(str, files)], inputs=[v, b], read=sum(_size(f) for f in files))
        cmds["dd_write"] = dict(argv=["dd", "if=/dev/zero", "of={out}", "bs=16M", f"count={-(-_size(v) // (16 << 20))}",
                                      "conv=fdatasync", "status=none"], inputs=[], read=0)
    return {c: cmds[c] for c in COMMANDS if c in cmds and (not args.only or c in args.only)}


def run_once(cmd: str, spec: dict, size: Size, folder: Path, args: argparse.Namespace) -> dict:
    """One measured run: caches prepared, the command timed, its output's size taken and the output deleted."""
    out, report, log = folder / f"out_{cmd}{spec.get('suffix', '')}", folder / f"out_{cmd}.json", folder / f"out_{cmd}.log"
    _remove(out, report)
    files = _files(*spec["inputs"])
    cache = drop(files, args.drop) if size.cold else warm(files)
    try:
        run = measure([x.replace("{out}", str(out)).replace("{report}", str(report)) for x in spec["argv"]], log)
        run.update(cache=cache, bytes_read=spec["read"], bytes_written=_size(out), **reported(cmd, log, report))
    finally:
        _remove(out, report)
    return run


def summarize(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["wall_s"])
    works = [r["work_s"] for r in runs if r.get("work_s") is not None]
    moved = best["bytes_read"] + best["bytes_written"]
    return {"wall_best_s": best["wall_s"], "wall_median_s": statistics.median(r["wall_s"] for r in runs),
            "user_s": best["user_s"], "sys_s": best["sys_s"], "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "bytes_read": best["bytes_read"], "bytes_written": best["bytes_written"],
            "gb_s": moved / best["wall_s"] / 1e9 if moved else None, "work_best_s": min(works) if works else None}


OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
GOALS = {  # name: (numerator, denominator, op, bound, the size the issue sets it at)
    "merge_speedup_vs_mergekit": ("mergekit", "merge", ">=", 5.0, "3b"),
    "ties_speedup_vs_mergekit": ("mergekit_ties", "ties", ">=", 10.0, "3b"),
    "diff_over_floor": ("diff", "floor", "<=", 1.3, "3b"),
    "prior_over_diff": ("prior", "diff", "<=", 1.3, "3b"),
}


def ratios(s: dict[str, dict], cold: bool) -> dict[str, dict]:
    """The issue's goals from one size's summaries (best walls), each with its bound and whether it is met."""
    out: dict[str, dict] = {}

    def put(name: str, value: float, op: str, bound: float, at: str) -> None:
        out[name] = {"value": value, "goal": f"{op} {bound:g}", "goal_at": at, "met": OPS[op](value, bound)}

    for name, (num, den, op, bound, at) in GOALS.items():
        if num in s and den in s:
            put(name, s[num]["wall_best_s"] / s[den]["wall_best_s"], op, bound, at)
    if "dd_read" in s and "dd_write" in s:
        rate_r = s["dd_read"]["bytes_read"] / s["dd_read"]["wall_best_s"]
        rate_w = s["dd_write"]["bytes_written"] / s["dd_write"]["wall_best_s"]
        out["dd_rates_gb_s"] = {"read": rate_r / 1e9, "write": rate_w / 1e9}
        for c in ("diff", "prior", "merge"):
            if c in s:
                floor = s[c]["bytes_read"] / rate_r + s[c]["bytes_written"] / rate_w
                put(f"{c}_of_disk_floor", floor / s[c]["wall_best_s"], ">=", 0.8, "7b")
    for c in ("diff", "prior", "merge") if cold else ():
        if c in s:
            put(f"{c}_peak_rss_gib", s[c]["peak_rss_mib"] / 1024, "<", 2.0, "7b")
    return out


def machine() -> dict:
    from importlib.metadata import version

    mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    return {"platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(), "ram_gib": round(mem / 2**20, 1),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": version("torch"), "transformers": version("transformers"), "mergekit": version("mergekit"),
            "deltakit_commit": git("rev-parse", "HEAD"), "deltakit_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def render(result: dict) -> str:
    """The markdown tables: every command of every size, then the goals, then notes."""
    t = result["torch_import"]
    torch_rss = statistics.median(r["peak_rss_mib"] for r in t) if t else float("nan")
    lines = ["| size | command | wall s, best / median | user s | sys s | peak RSS MiB | read GB | written GB | GB/s | work s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, sz in result["sizes"].items():
        for c, s in sz["summary"].items():
            gbs, work = (f"{s['gb_s']:.2f}" if s["gb_s"] else "-"), (f"{s['work_best_s']:.2f}" if s["work_best_s"] is not None else "-")
            lines.append(f"| {name} | {c} | {s['wall_best_s']:.2f} / {s['wall_median_s']:.2f} | {s['user_s']:.2f} | {s['sys_s']:.2f} | "
                         f"{s['peak_rss_mib']:.0f} | {s['bytes_read'] / 1e9:.3f} | {s['bytes_written'] / 1e9:.3f} | {gbs} | {work} |")
    if t:
        lines.append(f"| - | `python3 -c \"import torch\"` | {min(r['wall_s'] for r in t):.2f} / "
                     f"{statistics.median(r['wall_s'] for r in t):.2f} | - | - | {torch_rss:.0f} | - | - | - | - |")
    lines += ["", "| size | goal | value | goal (the issue sets it at) | met |", "|---|---|---|---|---|"]
    for name, sz in result["sizes"].items():
        for g, v in sz["ratios"].items():
            if g != "dd_rates_gb_s":
                lines.append(f"| {name} | {g} | {v['value']:.2f} | {v['goal']} ({v['goal_at']}) | {'yes' if v['met'] else '**no**'} |")
    lines.append("")
    for name, sz in result["sizes"].items():
        methods = sorted({r["cache"]["method"] for v in sz["runs"].values() for r in v})
        dd = sz["ratios"].get("dd_rates_gb_s")
        lines.append(f"- {name}: {sz['note']}; caches {', '.join(methods)}" + (f"; dd read {dd['read']:.2f} GB/s, write "
                     f"{dd['write']:.2f} GB/s" if dd else "") + "".join(f"; **{c} failed**" for c in sz["failed"]))
    lines += [f"- {result['drop_refused']}"] if result["drop_refused"] else []
    return "\n".join(lines + [f"- peak RSS of `python3 -c \"import torch\"`: {torch_rss:.0f} MiB"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1.5b,3b,7b", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/deltakit-scale"), help="model cache, one folder per size")
    ap.add_argument("--keep", action="store_true", help="keep the models for the next run (default: delete each size's)")
    ap.add_argument("--only", type=lambda s: s.split(","), help=f"comma-separated commands, from {', '.join(COMMANDS)}")
    ap.add_argument("--no-ties-mergekit", action="store_true", help="skip mergekit's TIES (~5 min at 3B)")
    ap.add_argument("--drop", choices=("auto", "fadvise"), default="auto", help="7b cold caches: auto tries drop_caches first")
    ap.add_argument("--mergekit-shard-size", default="1000M", help="mergekit --out-shard-size in parameters (2 GB bf16, as deltakit)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "scale.json")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    bad = [x for x in sizes if x not in SIZES] + [c for c in args.only or [] if c not in COMMANDS]
    if bad or not Path("/usr/bin/time").exists():
        raise SystemExit(f"unknown size or command: {bad}" if bad else "needs GNU time at /usr/bin/time (apt-get install time)")
    result = {"benchmark": "scale", "machine": machine(), "command": " ".join(["python3", "analyses/bench_scale.py", *sys.argv[1:]]),
              "repeats": args.repeats, "torch_import": [], "sizes": {}, "drop_refused": None}
    args.work.mkdir(parents=True, exist_ok=True)
    torch_argv, torch_log = [sys.executable, "-c", "import torch"], args.work / "torch_import.log"
    measure(torch_argv, torch_log)  # untimed: brings torch's files into the page cache
    result["torch_import"] = [measure(torch_argv, torch_log) for _ in range(args.repeats)]
    for name in sizes:
        size, folder = SIZES[name], args.work / name
        try:
            paths, built = build(name, size, folder)
            cmds = plan_commands(size, paths, folder, args)
            runs: dict[str, list[dict]] = {c: [] for c in cmds}
            failed: dict[str, str] = {}
            for r in range(args.repeats):
                for c, spec in cmds.items():
                    if c in failed:
                        continue
                    try:
                        runs[c].append(x := run_once(c, spec, size, folder, args))
                        print(f"{name} round {r + 1} {c}: {x['wall_s']:.2f} s, {x['peak_rss_mib']:.0f} MiB, {x['cache']['method']}",
                              file=sys.stderr)
                    except RuntimeError as exc:  # e.g. out of memory: recorded, the other commands go on
                        failed[c] = str(exc)[-2000:]
                        print(f"{name} {c} FAILED: {exc}", file=sys.stderr)
            summary = {c: summarize(v) for c, v in runs.items() if v}
            result["sizes"][name] = {"recipe": size_recipe(size, name), "note": size.note, "build_s": built,
                                     "cache": "cold" if size.cold else "warm", "runs": runs, "failed": failed,
                                     "summary": summary, "ratios": ratios(summary, size.cold)}
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        result["drop_refused"] = drop_refused
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "table": render(result)}, indent=2) + "\n")  # after every size
    torch_log.unlink(missing_ok=True)
    torch_log.with_suffix(".time").unlink(missing_ok=True)
    print(render(result))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child-floor":
        child_floor(sys.argv[2], sys.argv[3])
    else:
        main()
