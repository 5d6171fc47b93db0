"""Preference pairs from a scored sample manifest: `mmalign build-pairs scores MANIFEST --out DIR`.

The manifest (mmalign/generate/manifest.py) holds N samples per prompt, each with a `score`
(or `score_<name>`) column written by `mmalign score`. Selection is per prompt:

    best_worst  the highest- vs the lowest-scored sample (one pair per prompt; Diffusion-DPO on
                generated samples, SPIN/on-policy DPO recipes)
    margin      every pair (i, j) with s_i - s_j >= margin (up to N(N-1)/2 pairs per prompt)
    ranked      the samples sorted best first as one ranked list {"prompt", "completions",
                "scores"} for listwise losses (RankDPO); every list has the same length K
    judge       pairwise verdicts of a judge (a manifest column, or a judge object run here):
                each pair judged in both orders, a disagreement counts as a tie (METHODS §5)

Ties (|s_i - s_j| <= TIE_TOL) and pairs below the margin are dropped and counted; scores are
cast to numbers first, so "9" never ranks above "10" as a string would. Output:
image samples -> `write_image_pairs` (Diffusion-DPO reads it unchanged; an edit model's samples keep
their source image: {"source_image", "prompt", "chosen", "rejected"}, builders/edit.py), video and audio
samples -> jsonl with the files copied under videos/ or audio/ (an image-to-video model's samples keep their
first frame's source_image as edit pairs do), text samples -> jsonl
pair records ({"images"?, "prompt", "chosen", "rejected"}), ranked -> ranked records; every
record carries its provenance (ids, seeds, scores, margin, model).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from mmalign.builders.edit import edit_source_fields
from mmalign.errors import DataError
from mmalign.io import atomic_path, write_jsonl_atomic

STRATEGIES = ("best_worst", "margin", "ranked", "judge")
TIE_TOL = 1e-9  # two scores this close are a tie: the scorer cannot tell the samples apart
VERDICTS = ("A", "B", "TIE")


@dataclass
class Selection:
    """What `build_scored_pairs` picked. `items` are pairs {"prompt_index", "chosen": row,
    "rejected": row, "margin"} (+ "verdicts" for judge pairs) or ranked lists {"prompt_index",
    "rows": [row, ...] best first, "scores"}. `counts` holds kept, dropped_tie,
    dropped_low_margin, dropped_disagree, unjudged, dropped_short_list, prompts_lt2 (prompts with fewer
    than 2 usable samples), unscored (samples whose score is null), prompts, samples."""

    strategy: str
    column: str
    margin: float
    items: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        c = self.counts
        unit = "ranked lists" if self.strategy == "ranked" else "pairs"
        parts = [f"{c['dropped_tie']} ties"]
        if self.strategy == "judge":
            parts.append(f"{c['dropped_disagree']} order-disagreements, {c['unjudged']} pairs without a verdict")
        else:
            parts.append(f"{c['dropped_low_margin']} below margin {self.margin:g}")
        if self.strategy == "ranked":
            parts.append(f"{c['dropped_short_list']} prompts with fewer than K samples")
        parts.append(f"{c['prompts_lt2']} prompts with < 2 samples")
        if c["unscored"]:
            parts.append(f"{c['unscored']} samples without a {self.column}")
        return (f"{c['kept']} {unit} ({self.strategy}, by {self.column}) from {c['samples']} samples of "
                f"{c['prompts']} prompts; dropped {', '.join(parts)}")


def score_of(row: dict[str, Any], column: str) -> float:
    """The row's score as a finite float. Numeric strings are cast (never compared as text)."""
    if column not in row:
        have = sorted(k for k in row if k == "score" or k.startswith("score_"))
        raise DataError(f"sample {row.get('id')}: no score column {column!r} (has {have or 'none'}; run mmalign score)")
    value = row[column]
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"sample {row.get('id')}: {column} = {value!r} is not a number") from None
    if not math.isfinite(number):
        raise DataError(f"sample {row.get('id')}: {column} = {value!r} is not finite")
    return number


def group_by_prompt(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """prompt_index -> its rows ordered by sample index."""
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[int(row["prompt_index"])].append(row)
    return {k: sorted(v, key=lambda r: int(r["sample"])) for k, v in sorted(groups.items())}


def _judge_pair(selection: Selection, x: dict, y: dict, column: str) -> dict[str, Any] | None:
    """Combine the verdicts of (x shown first) and (y shown first). None when unjudged or dropped."""
    def verdict(a: dict, b: dict) -> str | None:
        table = a.get(column) or {}
        if not isinstance(table, dict):
            raise DataError(f"sample {a['id']}: {column} must map other sample ids to 'A' / 'B' / 'tie'")
        v = table.get(b["id"])
        if v is None:
            return None
        if not isinstance(v, str) or v.strip().upper() not in VERDICTS:
            raise DataError(f"sample {a['id']}: verdict {v!r} against {b['id']} is not 'A', 'B' or 'tie'")
        v = v.strip().upper()
        # who won, as a sample id (or "tie"): A is the row that holds the verdict
        return a["id"] if v == "A" else b["id"] if v == "B" else "tie"

    seen = [v for v in (verdict(x, y), verdict(y, x)) if v is not None]
    if not seen:  # never asked, or the judge's answers did not parse
        selection.counts["unjudged"] += 1
        return None
    if len(set(seen)) > 1:  # the judge changed its mind with the order: position bias, no signal
        selection.counts["dropped_disagree"] += 1
        return None
    if seen[0] == "tie":
        selection.counts["dropped_tie"] += 1
        return None
    chosen, rejected = (x, y) if seen[0] == x["id"] else (y, x)
    return {"prompt_index": int(x["prompt_index"]), "chosen": chosen, "rejected": rejected,
            "verdicts": [x.get(column, {}).get(y["id"]), y.get(column, {}).get(x["id"])]}


def _keep_pair(selection: Selection, hi: tuple[float, dict], lo: tuple[float, dict]) -> bool:
    """Count and keep a (better, worse) candidate pair when it clears the tie and the margin."""
    gap = hi[0] - lo[0]
    if gap <= TIE_TOL:
        selection.counts["dropped_tie"] += 1
    elif gap < selection.margin:
        selection.counts["dropped_low_margin"] += 1
    else:
        selection.items.append({"prompt_index": int(hi[1]["prompt_index"]), "chosen": hi[1], "rejected": lo[1],
                                "margin": gap, "scores": [hi[0], lo[0]]})
        return True
    return False


def _spread(n: int, k: int) -> list[int]:
    """k distinct ranks out of n (k <= n) evenly spaced from best (0) to worst (n-1)."""
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]


def build_scored_pairs(rows: list[dict[str, Any]], strategy: str = "best_worst", margin: float = 0.0,
                       score_column: str = "score", list_size: int | None = None,
                       verdict_column: str = "verdicts") -> Selection:
    """Select preference pairs (or ranked lists) per prompt from scored manifest rows.

    strategy: best_worst | margin | ranked | judge (see the module docstring). margin: a kept
    pair's score gap must be >= margin (ranked: the list's best-minus-worst gap). list_size:
    K for ranked lists (default: the most samples any prompt has; prompts with fewer samples
    are dropped, prompts with more keep K evenly spaced ranks, best and worst included).
    Ordering inside a prompt is by score, then sample index, so the result is deterministic.
    """
    if strategy not in STRATEGIES:
        raise DataError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if margin < 0:
        raise DataError(f"margin must be >= 0, got {margin}")
    selection = Selection(strategy, verdict_column if strategy == "judge" else score_column, float(margin))
    selection.counts.update(prompts=len({int(r["prompt_index"]) for r in rows}), samples=len(rows))
    if strategy != "judge":  # `mmalign score` writes null where a scorer gave no number (unparsed judge)
        scored = [r for r in rows if r.get(score_column, 0) is not None]
        selection.counts["unscored"] = len(rows) - len(scored)
        rows = scored
    groups = group_by_prompt(rows)
    usable = {k: g for k, g in groups.items() if len(g) >= 2}
    selection.counts["prompts_lt2"] = selection.counts["prompts"] - len(usable)
    if strategy == "ranked":
        k = list_size or max((len(g) for g in usable.values()), default=2)
        if k < 2:
            raise DataError(f"list_size must be >= 2, got {k}")
    for group in usable.values():
        if strategy == "judge":
            for x, y in combinations(group, 2):
                pair = _judge_pair(selection, x, y, verdict_column)
                if pair is not None:
                    selection.items.append(pair)
            continue
        # best first; ties broken by sample index so the pick does not depend on file order
        ranked = sorted(((score_of(r, score_column), r) for r in group), key=lambda t: (-t[0], int(t[1]["sample"])))
        if strategy == "best_worst":
            _keep_pair(selection, ranked[0], ranked[-1])
        elif strategy == "margin":
            for i, j in combinations(range(len(ranked)), 2):
                _keep_pair(selection, ranked[i], ranked[j])
        else:
            if len(ranked) < k:
                selection.counts["dropped_short_list"] += 1
                continue
            picked = [ranked[i] for i in _spread(len(ranked), k)]
            gap = picked[0][0] - picked[-1][0]
            if gap <= TIE_TOL:
                selection.counts["dropped_tie"] += 1
            elif gap < selection.margin:
                selection.counts["dropped_low_margin"] += 1
            else:
                selection.items.append({"prompt_index": int(group[0]["prompt_index"]), "rows": [r for _, r in picked],
                                        "scores": [s for s, _ in picked], "margin": gap})
    selection.counts["kept"] = len(selection.items)
    return selection


# -- judge object ---------------------------------------------------------------------------

_MIRROR = {"first": ("A", "B"), "second": ("B", "A"), "tie": ("tie", "tie"), "inconsistent": ("A", "A")}


def _absolute(path: str, root: Path) -> str:
    return path if Path(path).is_absolute() else str(root / path)


def judge_rows(rows: list[dict[str, Any]], judge: Any, column: str = "verdicts", root: str | Path = ".",
               progress: bool = True) -> list[dict[str, Any]]:
    """Fill `row[column] = {other_id: "A"|"B"|"tie"}` (this row shown first) for every pair of
    samples of a prompt. `judge` is either a JudgeScorer-like object whose
    `compare(conditions, first, second, images=, kind=)` asks both orders itself and returns
    'first' | 'second' | 'tie' | 'inconsistent' | 'unparsed' (one call per prompt), or a function
    `judge(prompt, first_row, second_row) -> "A"|"B"|"tie"` asked for each order. An
    inconsistent pair is stored as two "A"s (each won when shown first: dropped as a
    disagreement); an unparsed one is left unjudged. Returns new rows (input order)."""
    from tqdm.auto import tqdm

    root = Path(root)
    out = {r["id"]: dict(r, **{column: dict(r.get(column) or {})}) for r in rows}
    groups = [g for g in group_by_prompt(list(out.values())).values() if len(g) >= 2]
    for group in tqdm(groups, desc="judge", unit="prompt", disable=not progress):
        # a pair judged in both orders already (an earlier run) is not asked again
        pairs = [(a, b) for a, b in combinations(group, 2) if not (b["id"] in a[column] and a["id"] in b[column])]
        if not pairs:
            continue
        if hasattr(judge, "compare"):
            kind = group[0]["kind"]
            outputs = {r["id"]: r["text"] if kind == "text" else _absolute(r["path"], root) for r in group}
            images = [_absolute(p, root) for p in group[0].get("images") or []]
            outcomes = judge.compare([str(group[0]["prompt"])] * len(pairs), [outputs[a["id"]] for a, _ in pairs],
                                     [outputs[b["id"]] for _, b in pairs], images=[images] * len(pairs), kind=kind)
            for (a, b), outcome in zip(pairs, outcomes):
                if outcome in _MIRROR:
                    a[column][b["id"]], b[column][a["id"]] = _MIRROR[outcome]
        else:
            for a, b in pairs:
                a[column][b["id"]] = judge(a["prompt"], a, b)
                b[column][a["id"]] = judge(b["prompt"], b, a)
    return [out[r["id"]] for r in rows]


def load_judge(spec: str, device: str = "cpu") -> Any:
    """A pairwise JudgeScorer from `PATH[,key=value...]` or `judge=PATH[,...]` (mmalign score's
    spec syntax); disagreements between the two orders are kept apart, not merged into ties."""
    from mmalign.scoring import load_scorer, parse_spec

    parsed = parse_spec(spec if spec.startswith("judge=") else f"judge={spec}")
    parsed.options = {"mode": "pairwise", "on_disagreement": "drop", **parsed.options}
    return load_scorer(parsed, device=device)


# -- writing --------------------------------------------------------------------------------

def _kind(selection: Selection) -> str:
    rows = [r for item in selection.items for r in item.get("rows", (item.get("chosen"), item.get("rejected")))]
    kinds = {r["kind"] for r in rows}
    if len(kinds) > 1:
        raise DataError(f"the manifest mixes sample kinds {sorted(kinds)}: pairs need one kind")
    return kinds.pop()


def _provenance(item: dict[str, Any], rows: list[dict[str, Any]], selection: Selection) -> dict[str, Any]:
    record = {"prompt_index": item["prompt_index"], "ids": [r["id"] for r in rows], "seeds": [r["seed"] for r in rows]}
    if "verdicts" in item:
        record["verdicts"] = item["verdicts"]
    else:
        record.update(scores=item["scores"], score_column=selection.column, margin=item["margin"])
    models = sorted({str(r["model"]) for r in rows if "model" in r})
    if models:
        record["model"] = models[0] if len(models) == 1 else models
    return record


def _media(row: dict[str, Any], root: Path) -> Path:
    path = Path(row["path"])
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"sample {row['id']}: media file {path} not found")
    return path


def _copy(src: Path, out_dir: Path, relative: str) -> str:
    with atomic_path(out_dir / relative) as tmp:
        shutil.copyfile(src, tmp)
    return relative


def _condition_images(row: dict[str, Any], root: Path, out_dir: Path) -> list[str]:
    """A VLM prompt's images, as paths relative to out_dir (the jsonl's folder)."""
    paths = []
    for p in row.get("images") or []:
        src = Path(p) if Path(p).is_absolute() else root / p
        paths.append(Path(os.path.relpath(src.resolve(), out_dir.resolve())).as_posix())
    return paths


def _record(item: dict[str, Any], selection: Selection, kind: str, root: Path, out_dir: Path,
            name: str, index: int) -> dict[str, Any]:
    rows = item.get("rows") or [item["chosen"], item["rejected"]]
    if kind == "text":
        outputs: list[Any] = [r["text"] for r in rows]
    elif kind == "image" and "rows" not in item:
        outputs = [_media(r, root) for r in rows]  # write_image_pairs copies them
    else:  # audio pairs and ranked media lists: copy the files beside the jsonl
        sub = {"image": "images", "video": "videos"}.get(kind, "audio")
        outputs = [_copy(_media(r, root), out_dir, f"{sub}/{name}-{index:06d}-{k}{Path(r['path']).suffix}")
                   for k, r in enumerate(rows)]
    record = item_record(item, selection, outputs, _condition_images(rows[0], root, out_dir))
    return {**edit_source_fields(rows[0], root, out_dir, name, index), **record}  # an edit model's source


def item_record(item: dict[str, Any], selection: Selection, outputs: list[Any],
                images: list[str] | None = None) -> dict[str, Any]:
    """The training record of one selected item (pure): {"images"?, "prompt", "chosen", "rejected"}
    for a pair or {"prompt", "completions"} for a ranked list, with `outputs` the item's outputs
    in order (chosen, rejected / best first) as the trainer reads them (text, or a media path),
    `images` the prompt's condition images, plus the provenance (ids, seeds, scores, margin)."""
    rows = item.get("rows") or [item["chosen"], item["rejected"]]
    record: dict[str, Any] = {"prompt": rows[0]["prompt"]}
    if images:
        record = {"images": images, **record}
    if "rows" in item:
        record.update(completions=outputs)
    else:
        record.update(chosen=outputs[0], rejected=outputs[1])
    return {**record, **_provenance(item, rows, selection)}


def write_scored_pairs(selection: Selection, root: str | Path, out_dir: str | Path, name: str = "pairs") -> Path:
    """Write the selection to `out_dir/<name>.jsonl` (+ media). root: the manifest's folder,
    which media paths are relative to. Image pairs go through `write_image_pairs`."""
    from mmalign.data.image_pairs import write_image_pairs

    if not selection.items:
        raise DataError(f"no pairs to write: {selection.summary()}")
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = _kind(selection)
    records = [_record(item, selection, kind, root, out_dir, name, i) for i, item in enumerate(selection.items)]
    if kind == "image" and selection.strategy != "ranked":
        return write_image_pairs(records, out_dir, name=name)
    target = out_dir / f"{name}.jsonl"
    write_jsonl_atomic(target, records, ensure_ascii=False)  # the jsonl last: a reader never sees a partial dataset
    return target


# -- CLI ------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from mmalign.generate.manifest import manifest_path, read_manifest, write_manifest

    path = manifest_path(args.manifest)
    rows = read_manifest(path)
    if args.strategy == "judge" and args.judge:
        rows = judge_rows(rows, load_judge(args.judge, args.device), args.verdict_column, path.parent)
        write_manifest(rows, path)  # keep the verdicts: inspectable, and a rerun does not ask again
    selection = build_scored_pairs(rows, args.strategy, args.margin, args.column, args.list_size, args.verdict_column)
    out = write_scored_pairs(selection, path.parent, args.out, args.name)
    print(f"[mmalign] build-pairs scores: {selection.summary()}; wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scores", help="pairs from a scored sample manifest (best-vs-worst, margin, ranked, judge)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest.jsonl or the folder holding it (written by mmalign generate / score)")
    p.add_argument("--out", required=True, help="output folder (gets <name>.jsonl and media)")
    p.add_argument("--strategy", choices=STRATEGIES, default="best_worst")
    p.add_argument("--margin", type=float, default=0.0, help="minimum score gap of a kept pair (default 0: drop ties only)")
    p.add_argument("--column", default="score", help="score column to rank by (default: score, the combined one)")
    p.add_argument("--list-size", type=int, default=None, help="K of ranked lists (default: most samples per prompt)")
    p.add_argument("--verdict-column", default="verdicts",
                   help="judge strategy: row column {other_id: 'A'|'B'|'tie'}, this row shown first")
    p.add_argument("--judge", default=None, metavar="PATH[,key=value...]",
                   help="judge strategy: ask this local LLM/VLM judge (mmalign.scoring.judge, both orders) for the "
                        "verdicts, or openai:MODEL@URL, a judge over an OpenAI-compatible chat API")
    p.add_argument("--device", default="cpu", help="device of the --judge model (default cpu)")
    p.add_argument("--name", default="pairs", help="output file stem (default: pairs -> pairs.jsonl)")
    p.set_defaults(func=run)
