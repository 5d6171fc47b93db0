"""`mmalign report-run --out report.html [--tables T.json ...] [--curves LABEL=RUN_DIR ...]
[--grid LABEL=MANIFEST ...] [--captions LABEL=CHAIR.json ...] [--rounds LABEL=RUN_DIR ...]
[--evals LABEL=RESULTS.json ...]`: one self-contained HTML page of finished runs: metric tables, eval
results side by side (base vs aligned: one table per benchmark, printed too; mmalign/report/evals.py),
loss / reward-margin curves, the same prompts and seeds sampled by
several models side by side, captions with hallucinated objects highlighted, and an online
run's rounds (guard metrics, samples with scores) (mmalign/report/runs.py, rounds.py)."""

from __future__ import annotations

import argparse


def _labelled(items: list[str], flag: str) -> dict[str, str]:
    from mmalign.errors import ConfigError

    out = {}
    for item in items:
        label, eq, path = item.rpartition("=")
        if not eq or not label or not path:
            raise ConfigError(f"{flag} {item!r}: expected LABEL=PATH")
        out[label] = path
    return out


def _evals_page(page: str, tables: list[dict]) -> str:
    """The eval tables inserted after the page's title (escaped by `table_html`)."""
    from mmalign.report.runs import table_html

    section = "<h2>Evaluations</h2>" + "".join(table_html(t) for t in tables)
    head, sep, rest = page.partition("</h1>")
    return head + sep + section + rest


def _labelled_pairs(items: list[str]) -> list[tuple[str, str]]:
    """LABEL=PATH items in order; a label may repeat (one results file per benchmark)."""
    from mmalign.errors import ConfigError

    out = []
    for item in items:
        label, eq, path = item.partition("=")
        if not eq or not label or not path:
            raise ConfigError(f"--evals {item!r}: expected LABEL=RESULTS.json")
        out.append((label, path))
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmalign.io import atomic_path
    from mmalign.report.evals import eval_tables, tables_text
    from mmalign.report.runs import render_run_report

    evals = list(_labelled_pairs(args.evals))
    tables = eval_tables(evals) if evals else []
    if tables:
        print(tables_text(tables))
    page = render_run_report(args.title, args.tables, _labelled(args.curves, "--curves"), args.curve_keys,
                             _labelled(args.grid, "--grid"), args.grid_column, _labelled(args.captions, "--captions"),
                             args.max_prompts, args.max_samples, args.max_images, _labelled(args.rounds, "--rounds"))
    page = _evals_page(page, tables) if tables else page
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    print(f"[mmalign] report-run: {len(args.tables)} table files, {len(args.curves)} runs, {len(args.grid)} "
          f"manifests, {len(args.captions)} caption sets, {len(args.rounds)} online runs, {len(evals)} eval results; wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report-run", help="HTML page of finished runs: tables, curves, sample grids, captions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--title", default="mmalign runs")
    p.add_argument("--tables", nargs="+", default=[], help="JSON files of tables {title, columns, rows, note}")
    p.add_argument("--curves", action="append", default=[], metavar="LABEL=RUN_DIR",
                   help="a run's output_dir (its metrics.jsonl); repeatable")
    p.add_argument("--curve-keys", nargs="+", default=["loss", "rewards/margins", "rewards/accuracies"],
                   help="metrics to plot, one chart each")
    p.add_argument("--grid", action="append", default=[], metavar="LABEL=MANIFEST",
                   help="sample manifest of one model; samples matched by id across models; repeatable")
    p.add_argument("--grid-column", help="score column printed under each image")
    p.add_argument("--captions", action="append", default=[], metavar="LABEL=CHAIR_JSON",
                   help="result file of mmalign eval chair --out; repeatable")
    p.add_argument("--rounds", action="append", default=[], metavar="LABEL=RUN_DIR",
                   help="an online run's output_dir: per round its guard metrics and samples with scores; repeatable")
    p.add_argument("--evals", nargs="+", action="extend", default=[], metavar="LABEL=RESULTS.json",
                   help="results of mmalign eval ... --out, e.g. base=chair_base.json aligned=chair_dpo.json "
                        "base=pope_base.json aligned=pope_dpo.json: one table per benchmark, labels as columns")
    p.add_argument("--max-prompts", type=int, default=6, help="prompts in the grids (default 6)")
    p.add_argument("--max-samples", type=int, default=8, help="samples per prompt in the grids (default 8)")
    p.add_argument("--max-images", type=int, default=24, help="images in the caption table (default 24)")
    p.set_defaults(func=run)
