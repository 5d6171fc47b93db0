"""`--protocol reference` of CHAIR (mmalign/evaluation/chair_reference.py, reference_text.py):
the original script's extraction, quirks included, on hand-written captions, and against a
line-for-line copy of the original code (tests/chair_original.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.data.preference import DataError
from mmalign.evaluation.chair import chair
from mmalign.evaluation.chair_reference import ReferenceExtractor
from mmalign.evaluation.objects import load_vocabulary
from mmalign.evaluation.reference_text import sentences, singularize, word_tokenize

from chair_original import CHAIR as OriginalCHAIR

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "coco_sample"
SHARED = next((p / "chair" / "coco_synonyms.txt" for p in (ROOT.parent / "shared" / "data",
                                                          ROOT.parent.parent / "shared" / "data")
               if (p / "chair" / "coco_synonyms.txt").is_file()), None)
# Lines of the original list with its quirks (double space, a capital, a trailing space).
MINI = """person, girl, boy, man, woman, kid, child, people, adult, baby, passenger, rider
bicycle, bike
car, van
motorcycle, scooter,  motor bike, motor cycle, motorbike
airplane, plane, jet, jetliner
bus, minibus
train, locomotive
boat, ship, canoe
bench
bird, duck
dog, puppy
horse
sheep, lamb, goat
cow, cattle, oxen, ox, bison 
tie, bow, bow tie
knife, knive
hot dog
cake,  cheesecake, cupcake
chair, seat, stool
couch, sofa
dining table, table, desk
toilet, urinal
cell phone, phone, iPhone
oven, stove, stove top oven
teddy bear, teddybear
"""


@pytest.fixture(scope="module")
def mini_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chair") / "synonyms.txt"
    path.write_text(MINI)
    return path


@pytest.fixture(scope="module")
def ref(mini_path) -> ReferenceExtractor:
    return ReferenceExtractor.load(mini_path)


@pytest.mark.parametrize("word, singular", [
    ("dogs", "dog"), ("buses", "bus"), ("bus", "bu"), ("ties", "ty"), ("tie", "tie"), ("canoes", "cano"),
    ("knives", "knife"), ("people", "person"), ("children", "child"), ("oxen", "ox"), ("mice", "mouse"),
    ("women", "woman"), ("glasses", "glass"), ("glass", "glas"), ("benches", "bench"), ("puppies", "puppy"),
    ("skis", "ski"), ("scissors", "scissors"), ("sheep", "sheep"), ("four", "fmy"), ("horses", "horse"),
    ("dog-shaped", "dog-shaped"), ("mothers-in-law", "mother-in-law"),
])
def test_singularize_is_patterns(word, singular):
    """Pattern 2.6's rules, applied by hand: 'bus' falls to the final -s rule, 'ties' to
    ([^aeiouy]|qu)ies -> y ('^tie' in its -ie list is a literal caret), 'canoes' to (o)es -> o,
    'four' ends with the irregular 'our' -> 'my'."""
    assert singularize(word) == singular


def test_word_tokenize_follows_nltk():
    assert word_tokenize("A dog. Two cats, a dog's bowl and dogs' toys!") == \
        ["A", "dog", ".", "Two", "cats", ",", "a", "dog", "'s", "bowl", "and", "dogs", "'", "toys", "!"]
    assert word_tokenize("A dog-shaped (man-made) cake... I can't") == \
        ["A", "dog-shaped", "(", "man-made", ")", "cake", "...", "I", "ca", "n't"]
    assert word_tokenize("A 'dog' toy \u2013 a cat") == ["A", "'", "dog", "'", "toy", "\u2013", "a", "cat"]  # NLTK 3.10
    assert sentences("Mr. Smith has a dog. It sleeps! Does it?") == ["Mr. Smith has a dog.", "It sleeps!", "Does it?"]


# (caption, categories the original script finds), each written by hand from its rules.
CASES = [
    ("A passenger jet on the runway.", ["airplane"]),                      # 'passenger jet' -> jet
    ("A passenger train and a passenger plane.", ["train", "person", "airplane"]),  # only jet, train
    ("A baby bird and an adult dog.", ["bird", "dog"]),
    ("Baby elephants near a baby animal.", []),                           # elephant not in MINI; animal no object
    ("A baby goat.", ["person", "sheep"]),                                # goat is not an animal word
    ("A dog-shaped cloud over a man-made lake.", []),                    # one token each, in no list
    ("A double-decker bus.", []),                                          # 'double-decker'; bus -> 'bu'
    ("Two buses and a minibus.", ["bus"]),                               # minibus -> minibu, missed too
    ("Three ties, a tie and a bow tie.", ["tie", "tie"]),                # ties -> ty; bow tie -> tie
    ("Two canoes and a canoe.", ["boat"]),
    ("A man on a motor bike.", ["person"]),                               # ' motor bike' never matches
    ("A cheesecake and a cupcake.", ["cake"]),                            # '  cheesecake' never matches
    ("An iPhone on a desk.", ["dining table"]),                           # 'iPhone' never matches lower-case
    ("A stove top oven.", ["oven", "oven"]),                               # three-word entry: stove + oven
    ("Two hot dogs, a hot-dog and a teddy bear.", ["hot dog", "teddy bear"]),
    ("The seat of the toilet.", ["toilet"]),                               # seat dropped beside toilet
    ("A toilet seat and a chair.", ["toilet", "chair"]),
    ("Two knives and a knive.", ["knife", "knife"]),
    ("Oxen and cattle with a bison.", ["cow", "cow", "cow"]),              # trailing space stripped
    ("People, children and women.", ["person", "person", "person"]),
]


@pytest.mark.parametrize("caption, expected", CASES)
def test_reference_extraction_quirks(ref, caption, expected):
    assert [m.category for m in ref.extract(caption)] == expected


def test_reference_matches_a_copy_of_the_original_code(ref, mini_path):
    """The restructured extractor equals the original's caption_to_words (node words) on every
    hand-written caption, with the mini list and, where present, the real one."""
    captions = [c for c, _ in CASES] + [
        "A man riding a horse next to a bench.", "Two dogs playing with a frisbee on the grass.",
        "A kitchen with a stove, an oven, a sink and a refrigerator.", "A cat sleeping on a sofa.",
        "Several people waiting for a bus at the station.", "A giraffe and two zebras in a field.",
        "A plate with a hot dog, a sandwich and two donuts.", "A woman holding an umbrella in the rain.",
        "A laptop computer and a cell phone on a desk.", "A baby elephant with its mother.",
        "Two adult giraffes eating leaves.", "A wine glass and two wine glasses.", "A teddybear on a bed.",
        "A surfer riding a wave on a surfboard.", "Some kids flying kites on the beach.",
        "A red fire hydrant beside a stop sign.", "A clock tower above the street lights.",
        "A skateboarder doing a trick. A crowd watches.", "Bowls of fruit on the dining table.",
        "A dog's bowl and the dogs' toys.", "An airplane parked at the gate; a passenger jet behind it.",
        "A traffic light over a double decker bus.", "Two motorcycles and a motor cycle.",
    ]
    assert len(captions) >= 40
    for path in [mini_path] + ([SHARED] if SHARED else []):
        mine, original = ReferenceExtractor.load(path), OriginalCHAIR(str(path))
        for caption in captions:
            assert [m.category for m in mine.extract(caption)] == original.caption_to_words(caption)[1], caption


@pytest.mark.skipif(SHARED is None, reason="reference CHAIR synonym list (shared/data/chair) absent")
def test_corrected_and_reference_differ_only_where_documented():
    """On the real list: the corrected extraction fixes the reference's misses and keeps the
    rules the reference has explicitly."""
    ref, corrected = ReferenceExtractor.load(SHARED), load_vocabulary()
    same = ["A passenger jet and a baby bird.", "The seat of the toilet.", "A man made a hot dog for a dog."]
    for caption in same:
        assert [m.category for m in ref.extract(caption)] == [m.category for m in corrected.extract(caption)]
    fixed = {"A red bus.": ([], ["bus"]), "Two canoes.": ([], ["boat"]), "Striped ties.": ([], ["tie"]),
             "A motor bike.": ([], ["motorcycle"]), "A double-decker bus.": ([], ["bus"])}
    for caption, (by_ref, by_corrected) in fixed.items():
        assert [m.category for m in ref.extract(caption)] == by_ref, caption
        assert [m.category for m in corrected.extract(caption)] == by_corrected, caption


def test_chair_numbers_under_the_reference_protocol(ref):
    """Image 1 has {person, bus}, image 2 {dog}. Captions: 'A man next to a bus and a car.'
    -> reference mentions person, car (bus missed): 1 of 2 hallucinated; 'Two canoes and a dog.'
    -> dog: 0 of 1. CHAIR_i = 1/3, CHAIR_s = 1/2, recall = (1 + 1) / 3."""
    truth = {1: {"person", "bus"}, 2: {"dog"}}
    captions = {1: "A man next to a bus and a car.", 2: "Two canoes and a dog."}
    r = chair(captions, truth, ref)
    assert (r["CHAIR_i"], r["CHAIR_s"], r["recall"]) == pytest.approx((1 / 3, 1 / 2, 2 / 3))
    c = chair(captions, truth, load_vocabulary())   # corrected: bus found, canoes a boat
    assert (c["CHAIR_i"], c["CHAIR_s"], c["recall"]) == pytest.approx((2 / 5, 1.0, 1.0))


def test_eval_chair_protocol_reference_from_answers(tmp_path, mini_path, capsys):
    answers = tmp_path / "answers.jsonl"
    rows = [{"image_id": 1, "caption": "A man riding a horse near a bench and a dog."},   # dog hallucinated
            {"image_id": 4, "caption": "A man on a motor bike next to a bus."}]          # nothing matched but man
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chair.json"
    assert main(["eval", "chair", "--protocol", "reference", "--synonyms", str(mini_path),
                 "--annotations", str(SAMPLE / "instances.json"), "--captions", str(SAMPLE / "captions.json"),
                 "--answers", str(answers), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    # mentions: person horse bench dog | person -> 1 of 5 hallucinated, 1 of 2 captions
    assert record["metrics"]["CHAIR_i"] == pytest.approx(20.0) and record["metrics"]["CHAIR_s"] == pytest.approx(50.0)
    assert record["benchmark"] == "chair" and record["settings"]["protocol"] == "reference"
    assert record["data"]["synonyms"] == str(mini_path) and record["model"] == str(answers)
    assert "chair (reference)" in capsys.readouterr().out


def test_reference_protocol_without_synonyms_says_where_to_get_them(capsys):
    assert main(["eval", "chair", "--protocol", "reference", "--annotations", str(SAMPLE / "instances.json"),
                 "--answers", "x.jsonl"]) == 2
    assert "needs --synonyms FILE" in capsys.readouterr().err
    with pytest.raises(DataError, match="not found"):
        ReferenceExtractor.load("/nonexistent/synonyms.txt")
