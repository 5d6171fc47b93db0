"""`python -m benchmarks`: DPO, mmalign vs TRL's DPOTrainer, side by side.

`--only text` (default): text DPO on a tiny Llama (`benchmarks.text_dpo`); `--only vlm`: VLM
DPO on a tiny LLaVA (`benchmarks.vlm_dpo`); `--only diffusion`: Diffusion-DPO vs the reference recipe's way
(`benchmarks.diffusion_dpo`); `--only all`: the three, one after the other.
For each, prepares one model folder and one pair file, then runs each side in a fresh subprocess
(`python -m benchmarks.text_dpo` / `benchmarks.vlm_dpo`), alternating which side goes first, `--repeats` times.
Prints a table of medians with the mmalign/TRL ratio and writes JSON (`--out`).
Exit status 1 when the first 10 losses of the two sides disagree beyond `--loss-tol`
(then the two sides would not be doing the same math and the timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import measure, vlm_dpo
from benchmarks.text_dpo import Settings, prepare

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("mmalign", "trl")
LOSSES_COMPARED = 10
NOISY = 0.10  # max-min range over repeats, as a fraction of the median, above which the table warns


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    v = vlm_dpo.Settings()
    p.add_argument("--only", choices=("text", "vlm", "diffusion", "all"), default="text",
                   help="which row: text DPO (default), VLM DPO on a tiny LLaVA, Diffusion-DPO vs the reference "
                        "recipe (benchmarks.diffusion_dpo, its own defaults), or all three")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per run (default {d.steps} text, {v.steps} vlm)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="first steps left out of the rate (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side; medians are reported (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step (default %(default)s)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per side (default %(default)s: stable numbers on a shared 2-core machine)")
    p.add_argument("--loss-tol", type=float, default=1e-4, help="max |loss difference| over the first 10 steps")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON to write (default benchmarks/results/text_dpo.json or vlm_dpo.json)")
    a = p.parse_args(argv)
    if a.only == "all" and a.out is not None:
        p.error("--out names one file: use it with --only text or --only vlm")
    if a.steps is not None and a.steps <= max(a.warmup, LOSSES_COMPARED - 1):
        p.error(f"--steps must exceed --warmup and be at least {LOSSES_COMPARED}")
    return a


def run_side(side: str, workdir: Path, threads: int, tag: str, module: str = "benchmarks.text_dpo") -> dict[str, Any]:
    """One side in a fresh interpreter; returns its measurements (see measure.run_side)."""
    result, log = workdir / f"{tag}.json", workdir / f"{tag}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", module, "--side", side, "--workdir", str(workdir), "--result", str(result)]
    before, tic = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - tic
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{side} run failed (exit {proc.returncode}); end of its log:\n{tail}")
    # the whole child process (imports, setup, steps): CPU seconds do not grow with the machine's
    # load as wall time does, so cpu_s / threads estimates the wall time on idle cores
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(result.read_text()), "process_wall_s": wall, "process_cpu_s": cpu}


def settings_from_args(a: argparse.Namespace, bench: str = "text") -> Any:
    if bench == "vlm":
        return vlm_dpo.Settings(steps=a.steps or vlm_dpo.Settings.steps, warmup=a.warmup, batch_size=a.batch_size,
                                lr=a.lr, threads=a.threads)
    return Settings(steps=a.steps or Settings.steps, warmup=a.warmup, batch_size=a.batch_size,
                    hidden_size=a.hidden_size, num_layers=a.num_layers, lr=a.lr, threads=a.threads)


MODULES = {"text": "benchmarks.text_dpo", "vlm": "benchmarks.vlm_dpo"}


def run_all(a: argparse.Namespace, workdir: Path, bench: str = "text") -> dict[str, list[dict[str, Any]]]:
    """Prepare the shared inputs, then alternate the sides `a.repeats` times."""
    if bench == "vlm":
        a.token_check = vlm_dpo.prepare(workdir, settings_from_args(a, bench))
        print(f"[bench] vlm tokens identical (mmalign collate vs TRL collator): {a.token_check['identical']}", flush=True)
    else:
        prepare(workdir, settings_from_args(a, bench))
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for r in range(a.repeats):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            print(f"[bench] repeat {r + 1}/{a.repeats}: {side} ...", flush=True)
            out = run_side(side, workdir, a.threads, f"{side}_{r}", MODULES[bench])
            print(f"[bench]   {out['pairs_per_s']:.1f} pairs/s, peak RSS +{out['rss_growth_mib']:.0f} MiB", flush=True)
            runs[side].append(out)
    return runs


def loss_check(runs: dict[str, list[dict[str, Any]]], tol: float) -> dict[str, Any]:
    """Largest |mmalign - TRL| over the first 10 losses, over every pair of repeats."""
    worst = 0.0
    for mm in runs["mmalign"]:
        for trl in runs["trl"]:
            a, b = mm["losses"][:LOSSES_COMPARED], trl["losses"][:LOSSES_COMPARED]
            if len(a) != LOSSES_COMPARED or len(b) != LOSSES_COMPARED:
                raise RuntimeError(f"expected {LOSSES_COMPARED} losses per side, got {len(a)} and {len(b)}")
            worst = max(worst, *(abs(x - y) for x, y in zip(a, b)))
    whole_run = max(abs(x - y) for x, y in zip(runs["mmalign"][0]["losses"], runs["trl"][0]["losses"]))
    return {"max_abs_diff": worst, "tolerance": tol, "agree": worst <= tol, "max_abs_diff_all_steps": whole_run,
            "mmalign": runs["mmalign"][0]["losses"][:LOSSES_COMPARED], "trl": runs["trl"][0]["losses"][:LOSSES_COMPARED]}


def summarize(runs: dict[str, list[dict[str, Any]]], warmup: int) -> dict[str, dict[str, Any]]:
    """Per metric: the median over repeats for each side, the spread and mmalign/TRL."""
    def steady_step_ms(run: dict[str, Any]) -> float:
        return measure.median(run["step_ms"][warmup:])

    metrics = {
        "pairs_per_s": lambda run: run["pairs_per_s"],
        "step_ms": steady_step_ms,
        "setup_s": lambda run: run["setup_s"],
        "rss_growth_mib": lambda run: run["rss_growth_mib"],
        "rss_peak_mib": lambda run: run["rss_peak_mib"],
    }
    rows = {}
    for name, get in metrics.items():
        row: dict[str, Any] = {}
        for side in SIDES:
            values = [get(run) for run in runs[side]]
            row[side] = measure.median(values)
            row[f"{side}_spread"] = measure.spread(values)
            row[f"{side}_all"] = values
        row["ratio"] = row["mmalign"] / row["trl"]
        rows[name] = row
    return rows


LABELS = {  # metric: (row label, number format)
    "pairs_per_s": ("throughput, pairs/s (after warm-up)", ".1f"),
    "step_ms": ("step time, ms (median step)", ".1f"),
    "setup_s": ("setup, s (load model, build trainer)", ".2f"),
    "rss_growth_mib": ("peak RSS growth, MiB", ".0f"),
    "rss_peak_mib": ("peak RSS incl. imports, MiB", ".0f"),
}


def format_table(rows: dict[str, dict[str, Any]], losses: dict[str, Any], header: str) -> str:
    """Plain-text table: median (spread over repeats) per side, and mmalign/TRL."""
    lines = [header, f"{'metric':<38}{'mmalign':>16}{'TRL':>16}{'mmalign/TRL':>13}"]
    for name, (label, fmt) in LABELS.items():
        r = rows[name]
        cells = [f"{r[s]:{fmt}} (±{100 * r[f'{s}_spread'] / 2:.0f}%)" for s in SIDES]
        lines.append(f"{label:<38}{cells[0]:>16}{cells[1]:>16}{r['ratio']:>13.2f}")
    verdict = "agree" if losses["agree"] else "DISAGREE"
    lines.append(f"{'first 10 losses, max |mmalign - TRL|':<38}{losses['max_abs_diff']:>16.1e}"
                 f"{'':>16}  {verdict} (tol {losses['tolerance']:.0e})")
    noisy = [LABELS[n][0].split(",")[0] for n in ("pairs_per_s", "step_ms")
             if any(rows[n][f"{s}_spread"] > NOISY for s in SIDES)]
    if noisy:
        lines.append(f"note: repeats differ by more than {NOISY:.0%} on {' and '.join(noisy)}: the machine was busy; "
                     "rerun, or add --repeats")
    return "\n".join(lines)


def describe(a: argparse.Namespace, run: dict[str, Any], bench: str = "text") -> str:
    if bench == "vlm":
        v = settings_from_args(a, bench)
        return (f"VLM DPO, mmalign PreferenceTrainer (llava) vs TRL {run['versions']['trl']} DPOTrainer (VLM mode): "
                f"tiny LLaVA (CLIP tower hidden {v.vision_hidden}, Llama hidden {v.text_hidden}, 2+2 layers, "
                f"{(v.image_size // v.patch_size) ** 2} image tokens per {v.image_size}px image), full fine-tune, "
                f"frozen reference, fp32, AdamW lr {v.lr:g}, batch {v.batch_size} pairs, {v.steps} steps "
                f"({v.warmup} warm-up), median of {a.repeats} alternating runs per side, {run['threads']} torch "
                f"thread(s) per side, {os.cpu_count()} CPUs\n"
                f"(±: half the max-min range over repeats, as % of the median; ratio > 1 on throughput = mmalign "
                f"faster, < 1 on time/memory = mmalign cheaper)")
    return (f"text DPO, mmalign PreferenceTrainer vs TRL {run['versions']['trl']} DPOTrainer: tiny Llama "
            f"(hidden {a.hidden_size}, {a.num_layers} layers), frozen reference, fp32, AdamW lr {a.lr:g}, "
            f"batch {a.batch_size} pairs, {settings_from_args(a).steps} steps ({a.warmup} warm-up), median of {a.repeats} "
            f"alternating runs per side, {run['threads']} torch thread(s) per side, {os.cpu_count()} CPUs\n"
            f"(±: half the max-min range over repeats, as % of the median; ratio > 1 on throughput = mmalign faster, "
            f"< 1 on time/memory = mmalign cheaper)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    benches = ("text", "vlm", "diffusion") if a.only == "all" else (a.only,)
    return max(run_bench(a, bench) for bench in benches)


def run_bench(a: argparse.Namespace, bench: str) -> int:
    """One row (text or vlm): run, print the table, write the JSON; 1 if the losses disagree.
    The diffusion row has its own settings: `python -m benchmarks.diffusion_dpo -h`."""
    if bench == "diffusion":
        from benchmarks import diffusion_dpo

        return diffusion_dpo.main([] if a.out is None else ["--out", str(a.out)])
    a.token_check = None
    with tempfile.TemporaryDirectory(prefix="mmalign_bench_") as tmp:
        runs = run_all(a, Path(tmp), bench)
    rows, losses = summarize(runs, a.warmup), loss_check(runs, a.loss_tol)
    first = runs["mmalign"][0]
    table = format_table(rows, losses, describe(a, first, bench))
    if a.token_check is not None:
        same = "identical" if a.token_check["identical"] else "DIFFER"
        table += (f"\n{'tokens (ids, masks, pixel values), first 3 batches':<54}{same} "
                  f"(mmalign LlavaLikelihood.collate vs TRL DataCollatorForVisionPreference)")
    print("\n" + table)
    out = a.out or ROOT / "benchmarks" / "results" / f"{bench}_dpo.json"
    report = {
        "benchmark": f"{bench}_dpo", "date": datetime.date.today().isoformat(), "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": first["versions"], "memory_method": first["memory_method"], "threads_per_side": first["threads"],
        "settings": {**asdict(settings_from_args(a, bench)), "repeats": a.repeats},
        "rows": rows, "losses_first10": losses, "table": table, "runs": runs,
    }
    if a.token_check is not None:
        report["token_check"] = a.token_check
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n[bench] wrote {out}")
    ok = losses["agree"] and (a.token_check is None or a.token_check["identical"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
