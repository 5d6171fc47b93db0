"""Measurement helpers: peak resident memory of this process, and steady-state rates.

Peak memory is the kernel's resident-set high-water mark (`VmHWM` in
/proc/self/status). Writing "5" to /proc/self/clear_refs resets that mark to the
current RSS (Linux >= 4.0), so `reset_peak()` just before the measured work and
`peak_mib()` after it give the exact peak RSS of the work, including memory that
torch allocates outside Python (which tracemalloc cannot see). Where clear_refs is not
writable, the mark is the process-lifetime peak (`getrusage` ru_maxrss), which is
still sound in a fresh process whose imports peak lower than training.
"""

from __future__ import annotations

import resource
import statistics


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_mib() -> float:
    """Current resident set size of this process, MiB."""
    kib = _status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak() -> str:
    """Reset the RSS high-water mark to the current RSS; returns the method in use."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after /proc/self/clear_refs reset"
    except OSError:
        return "ru_maxrss (process-lifetime peak, not reset)"


def peak_mib() -> float:
    """RSS high-water mark since the last `reset_peak()` (or process start), MiB."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def steady_rate(step_ends: list[float], start: float, warmup: int, per_step: int) -> float:
    """Items per second over the steps after the first `warmup` ones.

    step_ends: perf_counter() at the end of each step; start: before the first step.
    """
    if len(step_ends) <= warmup:
        raise ValueError(f"need more than {warmup} steps to measure after the warm-up, got {len(step_ends)}")
    t0 = step_ends[warmup - 1] if warmup > 0 else start
    return per_step * (len(step_ends) - warmup) / (step_ends[-1] - t0)


def step_durations(step_ends: list[float], start: float) -> list[float]:
    """Seconds per step from the end times of the steps."""
    edges = [start, *step_ends]
    return [b - a for a, b in zip(edges, edges[1:])]


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """(max - min) / median: how much the repeats disagree, as a fraction."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def run_side(doc: str, sides: dict, load_settings, warm_imports, argv: list[str] | None = None) -> None:
    """The entry point of one benchmark side in a fresh interpreter: parse --side/--workdir/
    --result, import both stacks (so imports are neither timed nor counted), reset the peak-RSS
    mark, run `sides[side](workdir, settings)` and write its measurements as JSON to --result.
    A side returns {"step_ends", "start", "losses", "setup_s"} and optionally "extra" (a dict
    merged into the result)."""
    import argparse
    import json
    import os
    from importlib.metadata import version
    from pathlib import Path

    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=sorted(sides), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    a = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s = load_settings(a.workdir)
    torch.set_num_threads(s.threads)
    warm_imports()
    baseline = current_mib()
    method = reset_peak()
    out = sides[a.side](a.workdir, s)
    peak = peak_mib()
    durations = step_durations(out["step_ends"], out["start"])
    summary = {
        "side": a.side, "pairs_per_s": steady_rate(out["step_ends"], out["start"], s.warmup, s.batch_size),
        "step_ms": [1000 * d for d in durations], "losses": out["losses"], "setup_s": out["setup_s"],
        "rss_baseline_mib": baseline, "rss_peak_mib": peak, "rss_growth_mib": peak - baseline,
        "memory_method": method, "threads": torch.get_num_threads(), "loadavg_1min_after": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "trl": version("trl"), "transformers": version("transformers")},
    }
    summary.update(out.get("extra", {}))  # a side's own measurements (e.g. a time breakdown)
    a.result.write_text(json.dumps(summary))

