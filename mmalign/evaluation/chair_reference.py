"""`--protocol reference`: the mention extraction of the original CHAIR script (Rohrbach et
al. 2018, LisaAnne/Hallucination `utils/chair.py::CHAIR.caption_to_words`), reproduced exactly,
quirks included, so that numbers compare with published CHAIR tables.

Per caption: lower-case; `word_tokenize`; `singularize` every token (both in
`reference_text`); join two-word phrases left to right (`double_words`); drop "seat" when
"toilet" is there; keep the words that are in the synonym file; each maps to its category.
The synonym file is read as the script reads it: `line.strip().split(', ')`, the first entry
names the category, a word listed twice belongs to the later line.

The reference's quirks, each reproduced (and fixed by `--protocol corrected`, the default):

1. "bus" -> "bu", "minibus" -> "minibu", "ties" -> "ty", "canoes" -> "cano" (Pattern's
   singulariser): a bus, a minibus, ties, canoes are never mentions; "buses", "tie", "canoe" are.
2. "motor bike" is listed as " motor bike" (double space after a comma), so it never matches;
   "cake,  cheesecake" likewise makes "cheesecake" unmatchable; "iPhone" is listed with a capital
   and captions are lower-cased: never matches.
3. Only two-word phrases are joined: "stove top oven" (listed) is "stove" + "top" + "oven", i.e.
   two ovens; three-word names never match as such.
4. Hyphenated words are one token: "dog-shaped", "man-made" name nothing (correct), but neither
   do "hot-dog", "teddy-bear", "double-decker".
5. "baby X" / "adult X" is X only for X in bird, cat, dog, horse, sheep, cow, elephant, bear,
   zebra, giraffe, animal, cub ("baby animal" names nothing); "baby goat" is a person and a
   sheep. "passenger X" is X only for X = jet, train: "passenger plane" is a person and a plane.
6. A two-word join consumes its second word: "baby hot dog" is "baby hot" + "dog" -> person, dog.
7. "seat" is dropped whenever "toilet" is in the caption, whatever the seat belongs to.
8. Every word whose singular ends in "our" loses it ("four" -> "fmy"), "glass" -> "glas": no
   COCO word is affected, listed for completeness.
"""

from __future__ import annotations

from pathlib import Path

from mmalign.errors import DataError
from mmalign.evaluation.objects import Mention
from mmalign.evaluation.reference_text import singularize, word_tokenize

COCO_DOUBLE_WORDS = ['motor bike', 'motor cycle', 'air plane', 'traffic light', 'street light', 'traffic signal',
                     'stop light', 'fire hydrant', 'stop sign', 'parking meter', 'suit case', 'sports ball',
                     'baseball bat', 'baseball glove', 'tennis racket', 'wine glass', 'hot dog', 'cell phone',
                     'mobile phone', 'teddy bear', 'hair drier', 'potted plant', 'bow tie', 'laptop computer',
                     'stove top oven', 'hot dog', 'teddy bear', 'home plate', 'train track']
ANIMAL_WORDS = ['bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'animal', 'cub']
VEHICLE_WORDS = ['jet', 'train']
WHERE_TO_GET = ("the synonym list of the original CHAIR code: data/synonyms.txt of the public "
                "LisaAnne/Hallucination repository (not shipped: it carries no licence)")


def double_word_dict() -> dict[str, str]:
    """Two-word phrase -> the word it counts as, built as the script's CHAIR.__init__ does."""
    out = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        out[f'baby {animal}'] = animal
        out[f'adult {animal}'] = animal
    for vehicle in VEHICLE_WORDS:
        out[f'passenger {vehicle}'] = vehicle
    out['bow tie'] = 'tie'
    out['toilet seat'] = 'toilet'
    out['wine glas'] = 'wine glass'
    return out


class ReferenceExtractor:
    """The original script's extraction over its synonym file. `extract` returns `Mention`s
    whose `word` is the matched (singularised) word and whose start/end are token positions
    in the joined word list (the script's output has no character spans)."""

    def __init__(self, lines: list[str], source: str = "<synonyms>") -> None:
        self.source = source
        self.synonyms: dict[str, tuple[str, ...]] = {}
        self.inverse: dict[str, str] = {}
        for line in lines:
            if not line.strip():  # the script maps '' to '': no token is ever empty
                continue
            synonym = line.strip().split(', ')
            self.synonyms.setdefault(synonym[0], ())
            self.synonyms[synonym[0]] += tuple(synonym)
            for s in synonym:
                self.inverse[s] = synonym[0]
        self.categories = list(self.synonyms)
        self.double_words = double_word_dict()

    @classmethod
    def load(cls, path: str | Path | None) -> "ReferenceExtractor":
        if path is None:
            raise DataError(f"--protocol reference needs --synonyms FILE: {WHERE_TO_GET}")
        path = Path(path)
        if not path.is_file():
            raise DataError(f"CHAIR synonym list not found: {path} ({WHERE_TO_GET})")
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not any(line.strip() for line in lines):
            raise DataError(f"{path}: no categories")
        return cls(lines, source=str(path))

    def caption_words(self, caption: str) -> list[str]:
        """The script's word list after singularising, joining two-word phrases and the toilet rule."""
        words = [singularize(w) for w in word_tokenize(caption.lower())]
        joined, i = [], 0
        while i < len(words):
            double = ' '.join(words[i:i + 2])
            if double in self.double_words:
                joined.append(self.double_words[double])
                i += 2
            else:
                joined.append(words[i])
                i += 1
        if 'toilet' in joined and 'seat' in joined:
            joined = [w for w in joined if w != 'seat']
        return joined

    def extract(self, text: str) -> list[Mention]:
        return [Mention(w, self.inverse[w], n, n + 1, w) for n, w in enumerate(self.caption_words(text))
                if w in self.inverse]

    def objects(self, text: str) -> set[str]:
        return {m.category for m in self.extract(text)}

    def category_of(self, word: str) -> str | None:
        return self.inverse.get(word)

    def __contains__(self, category: str) -> bool:
        return category in self.synonyms

    def __len__(self) -> int:
        return len(self.categories)
