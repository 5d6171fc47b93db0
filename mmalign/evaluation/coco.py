"""COCO-format inputs shared by CHAIR, POPE and the injection builder, and the small
model-running helpers of `mmalign eval chair|pope` (loading, resumable answer caches).

COCO instances json: {"images": [{"id", "file_name", ...}], "categories": [{"id", "name"}],
"annotations": [{"image_id", "category_id", ...}]}. COCO captions json: the same "images",
"annotations": [{"image_id", "caption"}]. Heavy imports stay inside functions.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from mmalign.data.jsonl import read_json as read_json_file, read_jsonl_rows
from mmalign.errors import DataError
from mmalign.evaluation.chair_reference import ReferenceExtractor
from mmalign.evaluation.objects import ObjectVocabulary

Extractor = ObjectVocabulary | ReferenceExtractor


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return read_json_file(path)


def read_jsonl(path: str | Path, what: str, tolerate_torn_end: bool = False) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a bad line is a `DataError` naming it, except a torn LAST line
    when `tolerate_torn_end` (a cache a killed run was appending to)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return read_jsonl_rows(path, tolerate_torn_end)


def _category_names(data: dict[str, Any], path: Path, vocab: Extractor | None) -> dict[Any, str]:
    """category id -> vocabulary category (the COCO name itself when the vocabulary lacks it)."""
    names = {}
    for c in data.get("categories", []):
        if "id" not in c or "name" not in c:
            raise DataError(f"{path}: a category has no 'id' or 'name': {c}")
        name = c["name"].lower()
        names[c["id"]] = (vocab.category_of(name) if vocab and name not in vocab else None) or name
    return names


def load_instances(path: str | Path, vocab: Extractor | None = None
                   ) -> tuple[dict[Any, str], dict[Any, set[str]]]:
    """Read a COCO instances json -> (file_name of each image id, annotated categories of each
    image id). Every listed image gets an entry, possibly empty."""
    path = Path(path)
    data = read_json(path, "annotations")
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}: expected a COCO-format json with 'images' (and 'annotations', 'categories')")
    files = {}
    for im in data["images"]:
        if "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: an image has no 'id' or 'file_name': {im}")
        files[im["id"]] = im["file_name"]
    names = _category_names(data, path, vocab)
    objects: dict[Any, set[str]] = {i: set() for i in files}
    for n, a in enumerate(data.get("annotations", [])):
        if a.get("image_id") not in objects:
            raise DataError(f"{path}: annotation {n} names image_id {a.get('image_id')!r}, not in 'images'")
        if a.get("category_id") not in names:
            raise DataError(f"{path}: annotation {n} names category_id {a.get('category_id')!r}, "
                            "not in 'categories'")
        objects[a["image_id"]].add(names[a["category_id"]])
    return files, objects


def load_captions(path: str | Path) -> dict[Any, list[str]]:
    """Read a COCO captions json -> the reference captions of each image id."""
    path = Path(path)
    data = read_json(path, "captions")
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataError(f"{path}: expected a COCO-format captions json with 'annotations'")
    captions: dict[Any, list[str]] = defaultdict(list)
    for n, a in enumerate(data["annotations"]):
        if "image_id" not in a or not isinstance(a.get("caption"), str):
            raise DataError(f"{path}: caption annotation {n} has no 'image_id' or text 'caption'")
        captions[a["image_id"]].append(a["caption"])
    return dict(captions)


def ground_truth_objects(instances: dict[Any, set[str]], captions: dict[Any, list[str]] | None,
                         vocab: Extractor, ids: Iterable[Any] | None = None) -> dict[Any, set[str]]:
    """CHAIR ground truth: annotated categories ∪ categories mentioned by reference captions,
    for every annotated image or only `ids` (COCO val2014 has 200k reference captions)."""
    keep = set(instances) if ids is None else set(ids) & set(instances)
    truth = {i: set(instances[i]) for i in keep}
    for i, texts in (captions or {}).items():
        if i in truth:
            truth[i].update(*(vocab.objects(t) for t in texts))
    return truth


def object_statistics(object_sets: Iterable[Iterable[str]]) -> tuple[Counter, dict[str, Counter]]:
    """(images containing each object, co-occurrence counts) over images' object sets:
    co[a][b] = number of images holding both a and b (a != b)."""
    frequency: Counter = Counter()
    co: dict[str, Counter] = defaultdict(Counter)
    for objs in object_sets:
        objs = set(objs)
        frequency.update(objs)
        for a in objs:
            co[a].update(b for b in objs if b != a)
    return frequency, dict(co)


# -- running a model -----------------------------------------------------------------
def load_vlm(path: str | Path, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """An image-text-to-text model and its processor from a local folder or pkg://NAME, as
    `mmalign.modalities.llava.build` loads them (no download, no remote code)."""
    from mmalign.generate.text import load_text_model

    return load_text_model(path, dtype=dtype, device=device)


class AnswerCache:
    """Append-only jsonl of generated answers keyed by `key`, so a killed eval resumes: rows
    whose `settings` differ from this run's (another model, prompt, token budget) are ignored.
    `path=None` keeps nothing on disk."""

    def __init__(self, path: Path | None, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        self.done: dict[str, str] = {}
        if path is not None and path.is_file():
            rows = read_jsonl(path, "answer cache", tolerate_torn_end=True)
            if not path.read_bytes().endswith(b"\n"):  # drop a torn last line before appending
                from mmalign.io import write_jsonl_atomic

                write_jsonl_atomic(path, rows)
            for row in rows:
                if row.get("settings") == settings:
                    self.done[str(row["key"])] = row["answer"]

    def add(self, keys: list[Any], answers: list[str]) -> None:
        for k, a in zip(keys, answers):
            self.done[str(k)] = a
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"key": k, "answer": a, "settings": self.settings}) + "\n"
                             for k, a in zip(keys, answers))
                f.flush()


def generate_cached(model: Any, processor: Any, items: list[tuple[Any, dict[str, Any]]], cache: AnswerCache, *,
                    max_new_tokens: int, batch_size: int, roots: list[Path], desc: str) -> dict[str, str]:
    """Greedy answers for (key, record) items not yet in `cache`, a batch at a time (each batch
    appended to the cache as it finishes); returns {str(key): answer} for all items."""
    from tqdm.auto import tqdm

    from mmalign.generate.text import generate_answers

    todo = [(k, r) for k, r in items if str(k) not in cache.done]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="answer") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            answers = generate_answers(model, processor, [r for _, r in chunk], max_new_tokens=max_new_tokens,
                                       do_sample=False, batch_size=batch_size, roots=roots)
            cache.add([k for k, _ in chunk], answers)
            bar.update(len(chunk))
    return {str(k): cache.done[str(k)] for k, _ in items}


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write a results json atomically."""
    from mmalign.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return Path(path)
