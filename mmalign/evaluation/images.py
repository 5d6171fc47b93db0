"""Base vs aligned model on a fixed-seed prompt set: `mmalign eval images --base M --aligned M`.

Both manifests come from `mmalign generate` with the same prompt file, samples per prompt and
seeds, then `mmalign score`. Samples are matched by (prompt_index, sample, seed), so each
comparison is the same prompt and the same starting noise under the two models. Per scorer
column: the aligned model's win rate (a tie counts 1/2), its 95% percentile-bootstrap interval
(prompts resampled with replacement: the samples of one prompt are not independent), and the
mean score of each model: the table Diffusion-DPO / SPO report on PartiPrompts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.errors import DataError
from mmalign.io import atomic_path


@dataclass
class WinRate:
    rate: float   # mean over samples of 1 (aligned higher), 1/2 (tie), 0 (base higher)
    low: float    # 95% percentile-bootstrap interval
    high: float
    wins: int
    ties: int
    losses: int
    n: int


def win_rate(base_scores: Sequence[float], aligned_scores: Sequence[float], n_boot: int = 1000, seed: int = 0,
             groups: Sequence[Any] | None = None, confidence: float = 0.95, tie_tol: float = 0.0) -> WinRate:
    """Win rate of `aligned` over `base` on matched samples, with a percentile bootstrap CI.

    outcome_i = 1 if aligned_i - base_i > tie_tol, 0 if < -tie_tol, else 1/2; rate = mean(outcome).
    groups: the prompt of each sample; the bootstrap resamples whole prompts (cluster bootstrap)
    and recomputes the mean over the samples they hold. Default: every sample its own group.
    """
    base, aligned = np.asarray(base_scores, dtype=float), np.asarray(aligned_scores, dtype=float)
    if base.shape != aligned.shape or base.ndim != 1 or len(base) == 0:
        raise DataError(f"win_rate: need two equally long non-empty score lists, got {base.shape} and {aligned.shape}")
    if not (np.isfinite(base).all() and np.isfinite(aligned).all()):
        raise DataError("win_rate: scores must be finite numbers")
    diff = aligned - base
    outcome = np.where(diff > tie_tol, 1.0, np.where(diff < -tie_tol, 0.0, 0.5))
    keys = list(range(len(outcome))) if groups is None else list(groups)
    if len(keys) != len(outcome):
        raise DataError(f"win_rate: {len(keys)} group labels for {len(outcome)} samples")
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    group = np.array([index[k] for k in keys])
    sums, counts = np.bincount(group, outcome), np.bincount(group).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), size=(n_boot, len(sums)))  # prompts drawn with replacement
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha]) if n_boot > 0 else (np.nan, np.nan)
    return WinRate(rate=float(outcome.mean()), low=float(low), high=float(high), wins=int((outcome == 1).sum()),
                   ties=int((outcome == 0.5).sum()), losses=int((outcome == 0).sum()), n=len(outcome))


def match_rows(base: list[dict[str, Any]], aligned: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """Pairs of rows with equal (prompt_index, sample, seed), in base order. Every row must match
    and the prompt texts must agree; the error names the unmatched ids."""
    key = lambda r: (int(r["prompt_index"]), int(r["sample"]), int(r["seed"]))  # noqa: E731
    by_key = {key(r): r for r in aligned}
    if len(by_key) != len(aligned):
        raise DataError("aligned manifest: two rows share a (prompt_index, sample, seed)")
    base_keys = {key(r) for r in base}
    lonely_base = [r["id"] for r in base if key(r) not in by_key]
    lonely_aligned = [r["id"] for r in aligned if key(r) not in base_keys]
    if lonely_base or lonely_aligned:
        show = lambda ids: ", ".join(ids[:5]) + (f" (+{len(ids) - 5} more)" if len(ids) > 5 else "")  # noqa: E731
        raise DataError("samples do not match by (prompt_index, sample, seed): "
                        + "; ".join(f"{len(ids)} only in {side}: {show(ids)}" for side, ids in
                                    (("base", lonely_base), ("aligned", lonely_aligned)) if ids)
                        + " (generate both with the same prompts, --samples and --seed)")
    pairs = [(r, by_key[key(r)]) for r in base]
    for b, a in pairs:
        if b["prompt"] != a["prompt"]:
            raise DataError(f"sample {b['id']}: the prompts differ between base and aligned "
                            f"({str(b['prompt'])[:40]!r} vs {str(a['prompt'])[:40]!r})")
    return pairs


def compare(base: list[dict[str, Any]], aligned: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0,
            columns: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """{column: {win_rate, ci, wins, ties, losses, n, mean_base, mean_aligned}} for each score column
    present in every row of both manifests (`score` and each `score_<name>`)."""
    from mmalign.builders.scores import score_of

    pairs = match_rows(base, aligned)
    rows = base + aligned
    present = [c for c in sorted({k for r in rows for k in r}) if (c == "score" or c.startswith("score_"))
               and all(c in r for r in rows)]
    columns = list(columns) if columns else present
    missing = [c for c in columns if c not in present]
    if missing or not columns:
        raise DataError(f"score columns {missing or 'none'} not in every row of both manifests "
                        f"(have {present or 'none'}; run mmalign score on both)")
    table = {}
    for c in columns:
        # `mmalign score` writes null where a scorer gave no number: such a sample leaves the comparison
        kept = [(b, a) for b, a in pairs if b[c] is not None and a[c] is not None]
        if not kept:
            raise DataError(f"column {c}: no sample has a score in both manifests")
        xs, ys = [score_of(b, c) for b, _ in kept], [score_of(a, c) for _, a in kept]
        groups = [int(b["prompt_index"]) for b, _ in kept]
        w = win_rate(xs, ys, n_boot=n_boot, seed=seed, groups=groups)
        table[c] = {"win_rate": w.rate, "ci": [w.low, w.high], "wins": w.wins, "ties": w.ties, "losses": w.losses,
                    "n": w.n, "prompts": len(set(groups)), "unscored": len(pairs) - len(kept),
                    "mean_base": float(np.mean(xs)), "mean_aligned": float(np.mean(ys))}
    return table


def format_table(table: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'scorer':<24} {'win rate':>8}  {'95% CI':<16} {'W/T/L':<14} {'mean base':>10} {'mean aligned':>12}"]
    for c, t in table.items():
        lines.append(f"{c:<24} {t['win_rate']:>8.3f}  [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]   "
                     f"{t['wins']}/{t['ties']}/{t['losses']:<8} {t['mean_base']:>10.4f} {t['mean_aligned']:>12.4f}")
    return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------------

def sampling_settings(items: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` items -> {key: value}, values read as YAML scalars (as `mmalign generate --set`)."""
    import yaml

    from mmalign.errors import ConfigError

    settings: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        settings[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return settings


def generate_and_score(model: str, prompts: str, scorers: Sequence[str], out: Path, samples: int = 1, seed: int = 0,
                       sampling: dict[str, Any] | None = None) -> Path:
    """Sample `model` on `prompts` (`samples` per prompt, seeds from `seed`: the same for every model)
    into the manifest folder `out` and score it with every scorer spec, through the library calls of
    `mmalign generate` and `mmalign score`. Resumable: a rerun reuses what is there. Returns `out`."""
    import os

    from mmalign.generate.run import generate, make_options
    from mmalign.scoring.manifest import score_manifest

    if not prompts or not scorers:
        raise DataError("--base-model / --aligned-model need --prompts and at least one --scorer")
    options = {"model": model, "prompts": prompts, "out": str(out), "num_samples": samples, "seed": seed}
    result = generate(make_options(dict(options, sampling=sampling) if sampling else options))
    if int(os.environ.get("RANK", "0")) == 0:
        first = f" (first failure: {result['failures'][0]})" if result["failures"] else ""
        print(f"[mmalign] generate ({result['kind']}): {result['generated']} generated, {result['reused']} reused, "
              f"{result['failed']} failed{first}; manifest {result['manifest']}")
    if result["failed"]:
        raise DataError(f"generating {model} failed for {result['failed']} samples (see above)")
    print(score_manifest(out, scorers))
    return out


def _generate_and_score(args: argparse.Namespace, model: str, out: Path) -> Path:
    return generate_and_score(model, args.prompts, args.scorer or [], out, args.samples, args.seed,
                              sampling_settings(args.set))


def run(args: argparse.Namespace) -> int:
    from mmalign.generate.manifest import read_manifest

    out = Path(args.out)
    base, aligned = args.base, args.aligned
    if args.base_model:
        base = _generate_and_score(args, args.base_model, out.with_name(f"{out.stem}_base"))
    if args.aligned_model:
        aligned = _generate_and_score(args, args.aligned_model, out.with_name(f"{out.stem}_aligned"))
    if not base or not aligned:
        raise DataError("need --base (a scored manifest) or --base-model, and --aligned or --aligned-model")
    table = compare(read_manifest(base), read_manifest(aligned), args.n_boot, args.seed, args.column or None)
    result = {"base": str(base), "aligned": str(aligned), "n_boot": args.n_boot, "seed": args.seed, "scorers": table}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(table))
    first = next(iter(table.values()))
    print(f"[mmalign] eval images: {first['n']} matched samples of {first['prompts']} prompts, "
          f"{len(table)} scorers; wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="win rate of an aligned vs a base model on matched scored samples",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="scored manifest of the base model (manifest.jsonl or its folder)")
    p.add_argument("--aligned", help="scored manifest of the aligned model")
    p.add_argument("--out", default="eval_images.json", help="results JSON (default: eval_images.json)")
    p.add_argument("--column", action="append", help="score column(s) to compare (default: every one present)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of generation")
    p.add_argument("--base-model", help="generate + score this model first (needs --prompts, --scorer)")
    p.add_argument("--aligned-model", help="generate + score this model first")
    p.add_argument("--prompts", help="prompt file for --*-model (txt, jsonl, tsv)")
    p.add_argument("--scorer", action="append",
                   help="for --*-model: scorer spec of mmalign score, NAME=PATH[:W] (repeatable)")
    p.add_argument("--samples", type=int, default=1, help="samples per prompt for --*-model (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="sampling parameter for --*-model (mmalign generate --set), e.g. guidance_scale=5")
    p.set_defaults(func=run)
