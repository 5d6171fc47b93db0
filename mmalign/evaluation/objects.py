"""Object vocabulary and mention extraction for CHAIR, POPE and hallucination injection.

A vocabulary file has one line per category, `category, synonym, synonym, ...` (the category
name is itself a mention; `#` lines and blank lines are ignored). The shipped list
(`mmalign/data/vocab/coco_objects.txt`) holds the 80 COCO categories; a toy world passes its
own list (e.g. `circle, ring` / `square, box`).

Extraction (`ObjectVocabulary.extract`) follows the CHAIR reference code (Rohrbach et al.
2018) in what it counts, with a tokeniser of its own:

- words are runs of letters/digits, matched case-insensitively;
- words joined by hyphens form one unit: it is a mention only when the whole of it is an entry
  ("Hot-dog" = "hot dog", "double-decker" a bus), so hyphenated modifiers name nothing
  ("dog-shaped", "man-made", "bus-like"), and a match never starts or ends inside such a unit;
- plural forms of every entry are derived (`plural_forms`: dogs, buses, puppies, knives,
  people, mice, oxen ...), so the file lists singulars only;
- the longest entry wins at each position, left to right: "hot dog" is a hot dog and not a
  dog, "teddy bear" not a bear, "motor bike" a motorcycle, "love seat" a couch;
- "baby"/"adult" in front of another category's word is a modifier, not a person:
  "baby bird" is a bird, "adult elephant" an elephant; "passenger" in front of a vehicle's word
  likewise ("passenger jet" is an airplane, "passenger train" a train);
- a few compounds name no object ("train track", "home plate", "baby animal", "adult cub")
  and are skipped;
- a compound followed by its own head word counts once ("double decker bus": one bus, an entry);
- "seat" is dropped from a caption that mentions a toilet ("the seat of the toilet").

Every mention counts (a caption saying "dog" twice has two dog mentions), as in the
reference; `objects(text)` gives the distinct categories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from mmalign.errors import DataError

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "vocab" / "coco_objects.txt"
# "baby bird" is a bird, "passenger jet" a jet: these person words act as modifiers in front of
# a word of another category (None: any other category) or of the listed categories.
MODIFIERS: dict[str, tuple[str, ...] | None] = {"baby": None, "adult": None,
                                                "passenger": ("airplane", "train", "bus", "boat", "car")}
# Compounds that contain an object word but name no object.
NOT_OBJECTS = ("train track", "home plate", "baby animal", "adult animal", "baby cub", "adult cub")
# (word, category): drop mentions of `word` when the caption also mentions `category`.
CONTEXT_DROPS = (("seat", "toilet"),)

_WORD = re.compile(r"[^\W_]+")
IRREGULAR = {"person": ("people", "persons"), "child": ("children",), "man": ("men",), "woman": ("women",),
             "mouse": ("mice",), "goose": ("geese",), "foot": ("feet",), "tooth": ("teeth",), "ox": ("oxen",),
             "sheep": ("sheep",), "fish": ("fish",), "deer": ("deer",), "bison": ("bison",),
             "cattle": ("cattle",), "skis": ("skis",), "scissors": ("scissors",)}
PLURAL_WORDS = {f for forms in IRREGULAR.values() for f in forms} - set(IRREGULAR)  # people, mice ...
F_TO_VES = {"knife", "pocketknife", "wife", "life", "calf", "half", "leaf", "loaf", "shelf", "wolf", "scarf", "thief"}


def plural_forms(word: str) -> set[str]:
    """English plural forms of one lower-case word ("bus" -> {"buses", "buss"} ...). Generous
    on purpose: an extra form that is not a real word never matches anything."""
    if word in IRREGULAR:
        return set(IRREGULAR[word])
    forms = {word + "s"}
    if word.endswith("man") and len(word) > 3:  # policeman -> policemen (and "humans" via +s)
        forms.add(word[:-3] + "men")
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(word + "es")
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    if word in F_TO_VES:
        forms.add(word[:-2] + "ves" if word.endswith("fe") else word[:-1] + "ves")
    return forms


def plural_of(phrase: str) -> str:
    """The usual plural of a lower-case word or phrase (its last word): "hot dog" -> "hot dogs",
    "knife" -> "knives", "person" -> "people"."""
    head, _, last = phrase.rpartition(" ")
    if last in IRREGULAR:
        form = IRREGULAR[last][0]
    elif last in F_TO_VES:
        form = last[:-2] + "ves" if last.endswith("fe") else last[:-1] + "ves"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        form = last[:-1] + "ies"
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        form = last + "es"
    else:
        form = last + "s"
    return f"{head} {form}" if head else form


def words(text: str) -> list[tuple[str, int, int]]:
    """(lower-case word, start, end) for every word of `text`; spans index the original text."""
    return [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]


@dataclass(frozen=True)
class Mention:
    """One object mention: `word` is the text as written (`text[start:end]`), `synonym` the
    vocabulary entry it matched, `plural` whether it matched a derived plural form."""

    word: str
    category: str
    start: int
    end: int
    synonym: str
    plural: bool = False

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


class ObjectVocabulary:
    """Categories with their synonyms, and a longest-match extractor over them.

    synonyms: {category: [words that mean it]}; the category name is added as a mention.
    A word claimed by two categories is a `DataError` (the mention would be ambiguous)."""

    def __init__(self, synonyms: dict[str, Iterable[str]], source: str = "<vocabulary>") -> None:
        self.source = source
        self.synonyms: dict[str, tuple[str, ...]] = {}
        explicit: dict[tuple[str, ...], tuple[str, str, bool]] = {}  # phrase -> (category, entry, plural)
        for category, entries in synonyms.items():
            category = " ".join(w for w, _, _ in words(category))
            uniq = list(dict.fromkeys(" ".join(w for w, _, _ in words(e)) for e in (category, *entries)))
            self.synonyms[category] = tuple(u for u in uniq if u)
            for entry in self.synonyms[category]:
                key = tuple(entry.split())
                if key in explicit and explicit[key][0] != category:
                    raise DataError(f"{source}: {entry!r} is listed under both "
                                          f"{explicit[key][0]!r} and {category!r}")
                explicit[key] = (category, entry, entry in PLURAL_WORDS)
        self.categories: list[str] = list(self.synonyms)
        self._lookup = self._build_lookup(explicit)
        self._longest = max((len(k) for k in self._lookup), default=1)

    def _build_lookup(self, explicit: dict) -> dict[tuple[str, ...], tuple[str, str, bool] | None]:
        """Phrase (word tuple) -> (category, entry, plural), or None for a non-object compound.
        Explicit entries win over derived plurals and modifier compounds."""
        lookup: dict[tuple[str, ...], tuple[str, str, bool] | None] = {}
        for key, (category, entry, _) in explicit.items():
            if entry in PLURAL_WORDS:
                continue
            for form in plural_forms(key[-1]):
                lookup.setdefault(key[:-1] + (form,), (category, entry, True))
        for mod, targets in MODIFIERS.items():
            owner = explicit.get((mod,))
            for key, value in list(explicit.items()) + [(k, v) for k, v in lookup.items() if v]:
                if owner and value[0] != owner[0] and (targets is None or value[0] in targets):
                    lookup.setdefault((mod,) + key, value)
        for phrase in NOT_OBJECTS:
            key = tuple(phrase.split())
            if key[-1:] and key not in explicit:
                for form in {key[-1]} | plural_forms(key[-1]):
                    lookup[key[:-1] + (form,)] = None
        lookup.update(explicit)
        return lookup

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ObjectVocabulary":
        """Read a vocabulary file (None = the shipped COCO list)."""
        path = Path(path) if path is not None else DEFAULT_PATH
        if not path.is_file():
            raise DataError(f"object vocabulary not found: {path}")
        synonyms: dict[str, list[str]] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            entries = [e.strip() for e in line.split(",") if e.strip()]
            if not entries or not words(entries[0]):
                raise DataError(f"{path}: line {n} has no category name")
            if entries[0].lower() in synonyms:
                raise DataError(f"{path}: line {n} repeats category {entries[0]!r}")
            synonyms[entries[0].lower()] = entries[1:]
        if not synonyms:
            raise DataError(f"{path}: no categories")
        return cls(synonyms, source=str(path))

    def extract(self, text: str) -> list[Mention]:
        """Object mentions of `text`, in order, longest match first (see module docstring)."""
        toks = words(text)
        # hyphen[k]: token k is joined to token k + 1 by one "-" (the two are one unit)
        hyphen = [text[a[2]:b[1]] == "-" for a, b in zip(toks, toks[1:])] + [False]
        mentions: list[Mention] = []
        i = 0
        while i < len(toks):
            for n in range(min(self._longest, len(toks) - i), 0, -1):
                key = tuple(w for w, _, _ in toks[i:i + n])
                if not hyphen[i + n - 1] and key in self._lookup:
                    hit = self._lookup[key]
                    if hit is not None:
                        start, end = toks[i][1], toks[i + n - 1][2]
                        mentions.append(Mention(text[start:end], hit[0], start, end, hit[1], hit[2]))
                    i += n
                    break
            else:  # no match: skip the whole hyphenated unit
                while hyphen[i]:
                    i += 1
                i += 1
        present = {m.category for m in mentions}
        drops = {w for w, cat in CONTEXT_DROPS if cat in present}
        return [m for m in mentions if m.synonym not in drops]

    def objects(self, text: str) -> set[str]:
        """The distinct categories mentioned in `text`."""
        return {m.category for m in self.extract(text)}

    def category_of(self, word: str) -> str | None:
        """The category a single word or phrase names (singular or plural), else None."""
        hit = self._lookup.get(tuple(w for w, _, _ in words(word)))
        return hit[0] if hit else None

    def __contains__(self, category: str) -> bool:
        return category in self.synonyms

    def __len__(self) -> int:
        return len(self.categories)


@lru_cache(maxsize=None)
def _cached(path: str | None) -> ObjectVocabulary:
    return ObjectVocabulary.load(path)


def load_vocabulary(path: str | Path | None = None) -> ObjectVocabulary:
    """`ObjectVocabulary.load`, cached per path (the COCO list is read once per process)."""
    return _cached(str(path) if path is not None else None)


def objects(text: str, vocab: ObjectVocabulary | None = None) -> set[str]:
    """The distinct categories mentioned in `text` (default: the shipped COCO vocabulary)."""
    return (vocab or load_vocabulary()).objects(text)
