"""The VLM tool chain with every VLM family's tiny model (tests/vlm_family_fixtures.py): each family's
model + processor folder, built once per module, goes through `mmalign generate` (answers),
`build-pairs corrupt | onpolicy` (answers generated with the model), `build-pairs inject |
existence` (no model; their records then train one DPO step with that family: loss = log 2 at
policy == reference), `mmalign eval chair | pope --model`, the judge scorers with the family as
the judge (`judge=`: verdicts on attached images; `claims=`: P(yes) vs P(no) per mentioned
object) and one step of an online DPO round scored by annotations + the family's claim judge, on
3 toy-world scenes with COCO-style annotations (mmalign.toyworld.world.write_world).

Real values: batched answers (left padding; prompts of different lengths, 1 or 2 images, a
64x32 image among 32x32 ones; greedy and per-row seeded sampling) equal one-at-a-time answers;
the corrupt builder's rejected answers equal the model's answers on the same seeded corrupted
images; on-policy pairs are ordered by the annotation counts, recounted here; CHAIR / POPE
counts account for every image / question; the pointwise judge's scores are the parsed verdicts
of the model's own answers to the judge prompts; the claim judge's left-padded first-token
P(yes), P(no) equal an unpadded forward; the online samples' scores are the weighted sums.

Every family runs every part (about 65 s for the whole file on one core, one torch thread)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import vlm_family_fixtures
from vlm_family_fixtures import allow_smolvlm_without_num2words, save_family

from mmalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
VOCAB = str(ROOT / "mmalign/data/vocab/toyworld_objects.txt")
NAMES = ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm", "llava_onevision"]
MODALITY = {"llava_next": "llava"}  # the fixture name -> the family (modality) that loads it
JUDGE_WORDS = ["yes", "Yes", "no", "No", "Is", "there", "in", "?", "Please", "answer", "or"]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.log_every=1"]

allow_smolvlm_without_num2words()  # SmolVLM folders load through AutoProcessor in-process


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module (restored after): the tiny models gain nothing from
    threads, and on a loaded machine thread contention made the file ~6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """3 toy-world scenes (32x32) with COCO instances / captions, and a pair source file."""
    from mmalign.toyworld.world import write_world

    root = tmp_path_factory.mktemp("toolchain_world")
    paths = write_world(root, 3, seed=0, split="train", kind="scenes")
    rows = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
    source = [{"images": [r["image"]], "prompt": r["prompt"], "chosen": r["caption"],
               "objects": sorted({o["shape"] for o in r["objects"]})} for r in rows]
    paths["source"] = root / "source.jsonl"
    paths["source"].write_text("".join(json.dumps(r) + "\n" for r in source))
    return paths


def judge_llava(next_style: bool = False):
    """The toy LLaVA-1.5 (or NeXT) of mmalign.toyvlm with the judge's words in its vocabulary."""
    from mmalign.toyvlm import VLM_WORDS, build_tiny_llava, build_tiny_llava_processor, build_vlm_tokenizer

    tok = build_vlm_tokenizer(VLM_WORDS + JUDGE_WORDS)
    return build_tiny_llava(tok, next_style=next_style), build_tiny_llava_processor(tok, next_style=next_style)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model + processor folder, saved once per module on first use. Its
    generation config suppresses EOS and the special tokens as the FIRST new token
    (`begin_suppress_tokens`, read by `generate`): a random tiny model's greedy answer would
    otherwise often be empty (special tokens are skipped), and the builders drop empty answers."""
    from transformers import AutoProcessor, GenerationConfig

    class Folders(dict):
        def __missing__(self, name: str) -> Path:
            with pytest.MonkeyPatch.context() as patch:  # yes / no words: the claim judge asks yes-no questions
                patch.setattr(vlm_family_fixtures, "WORDS", vlm_family_fixtures.WORDS + JUDGE_WORDS)
                patch.setitem(vlm_family_fixtures.BUILDERS, "llava", judge_llava)
                patch.setitem(vlm_family_fixtures.BUILDERS, "llava_next", lambda: judge_llava(next_style=True))
                folder = save_family(name, tmp_path_factory.mktemp(name))
            tok = AutoProcessor.from_pretrained(folder).tokenizer
            special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
            config = GenerationConfig.from_pretrained(folder)
            config.begin_suppress_tokens = sorted(special)
            config.save_pretrained(folder)
            self[name] = folder
            return folder

    return Folders()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def load(folder: Path):
    from mmalign.generate.text import load_text_model

    return load_text_model(folder, device="cpu")


def images_of(world: dict[str, Path]) -> list[str]:
    return [str(world["jsonl"].parent / r["image"]) for r in read(world["jsonl"])]


def wide_image(world: dict[str, Path]) -> str:
    """A 64x32 image (two scenes side by side): a grid / tile count unlike the 32x32 scenes'."""
    from PIL import Image

    path = world["jsonl"].parent / "wide.png"
    if not path.exists():
        a, b = (Image.open(p).convert("RGB") for p in images_of(world)[:2])
        wide = Image.new("RGB", (64, 32))
        wide.paste(a, (0, 0))
        wide.paste(b, (32, 0))
        wide.save(path)
    return str(path)


# -- mmalign generate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_generate_answers_batched_equal_single_and_the_cli(name, folders, world, tmp_path):
    from mmalign.generate.text import generate_answers

    model, processor = load(folders[name])
    a, b, c = images_of(world)
    records = [{"prompt": "describe the image .", "images": [a]},
               {"prompt": "what is in the first image and the second image .", "images": [b, c]},
               {"prompt": "describe .", "images": [c]},
               {"prompt": "describe the image .", "images": [wide_image(world)]}]
    for sample in (False, True):  # left padding: each row's answer is the one it gets alone
        batched = generate_answers(model, processor, records, max_new_tokens=4, batch_size=4, do_sample=sample)
        single = generate_answers(model, processor, records, max_new_tokens=4, batch_size=1, do_sample=sample)
        assert batched == single
    assert any(batched)  # the tiny random model says something (not only special tokens)
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(folders[name]), "--prompts", str(world["jsonl"]), "--out", str(out),
                 "--num-samples", "1", "--no-progress", "--set", "max_new_tokens=3", "--set", "do_sample=false"]) == 0
    rows = read(out / "manifest.jsonl")
    assert [r["kind"] for r in rows] == ["text"] * 3 and [r["images"] for r in rows] == [[x] for x in images_of(world)]
    greedy = generate_answers(model, processor, [{"prompt": r["prompt"], "images": r["images"]} for r in rows],
                              max_new_tokens=3)
    assert [r["text"] for r in rows] == greedy


# -- build-pairs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_build_pairs_corrupt(name, folders, world, tmp_path, capsys):
    from mmalign.builders.corrupt import corrupted_records
    from mmalign.generate.text import generate_answers

    out = tmp_path / "corrupt"
    assert main(["build-pairs", "corrupt", str(world["source"]), "--model", str(folders[name]), "--out", str(out),
                 "--chosen", "ground_truth", "--corruption", "mask", "--mask-ratio", "0.5", "--mask-patch", "4",
                 "--seed", "3", "--max-new-tokens", "3"]) == 0
    rows, source = read(out / "pairs.jsonl"), read(world["source"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        f"[mmalign] build-pairs corrupt: {len(rows)} pairs kept of 3 prompts")
    model, processor = load(folders[name])
    corrupted = corrupted_records(source, "mask", {"ratio": 0.5, "patch": 4}, 3, [world["source"].parent])
    expected = generate_answers(model, processor, corrupted, max_new_tokens=3)
    for r in rows:
        i = r["source_index"]
        assert r["rejected"] == expected[i] and r["chosen"] == source[i]["chosen"]
    for i in set(range(3)) - {r["source_index"] for r in rows}:
        assert expected[i].strip() in ("", source[i]["chosen"])


@pytest.mark.parametrize("name", NAMES)
def test_build_pairs_onpolicy(name, folders, world, tmp_path, capsys):
    from mmalign.evaluation.objects import ObjectVocabulary

    out = tmp_path / "onpolicy"
    argv = ["build-pairs", "onpolicy", str(world["source"]), "--model", str(folders[name]), "--out", str(out),
            "--num-samples", "4", "--max-new-tokens", "8", "--vocabulary", VOCAB]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rows = read(out / "pairs.jsonl")
    assert f"{len(rows)} pairs kept of 3 prompts" in line
    vocab, source = ObjectVocabulary.load(VOCAB), read(world["source"])
    for r in rows:  # chosen: fewer hallucinated objects (then more recall) than rejected, recounted here
        present = set(source[r["source_index"]]["objects"])
        counts = [(len(vocab.objects(t) - present), -len(vocab.objects(t) & present)) for t in (r["chosen"],
                                                                                                   r["rejected"])]
        assert counts[0] < counts[1] and [c[0] for c in counts] == r["hallucinations"]
    assert main(argv) == 0 and read(out / "pairs.jsonl") == rows  # seeded: a rerun writes the same pairs


def train_one_step(name: str, folder: Path, data: Path, out: Path) -> list[dict]:
    config = ROOT / "configs/tiny/llava_dpo.yaml"
    assert main(["train", str(config), f"modality={MODALITY.get(name, name)}", f"model.path={folder}",
                 f"data.train={data}", "data.eval=", f"train.output_dir={out}", "train.max_steps=1",
                 "train.batch_size=2", "loss.sft_weight=0", "optim.warmup_steps=0", "data.max_length=160",
                 *QUIET]) == 0
    return [r for r in read(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("name", NAMES)
def test_build_pairs_inject_and_existence_records_train_with_the_family(name, folders, world, tmp_path, capsys):
    root = world["jsonl"].parent  # beside images/: the trainer keeps media inside the data folder
    inject, existence = root / f"{name}_inject.jsonl", root / f"{name}_existence.jsonl"
    assert main(["build-pairs", "inject", "--captions", str(world["captions"]), "--images", str(world["images"]),
                 "--annotations", str(world["instances"]), "--vocabulary", VOCAB, "--prompt", "describe the image .",
                 "--out", str(inject), "--seed", "0"]) == 0
    assert main(["build-pairs", "existence", "--annotations", str(world["instances"]), "--images",
                 str(world["images"]), "--out", str(existence), "--num-images", "3", "--seed", "0"]) == 0
    capsys.readouterr()
    both = root / f"{name}_both.jsonl"  # one record of each builder: one batch of 2
    rows = [read(inject)[0], read(existence)[0]]
    assert rows[0]["chosen"] != rows[0]["rejected"] and {rows[1]["chosen"], rows[1]["rejected"]} == {"Yes", "No"}
    both.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = train_one_step(name, folders[name], both, tmp_path / "run")
    assert len(metrics) == 1 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# -- eval chair | pope --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_eval_chair_and_pope_with_the_family(name, folders, world, tmp_path):
    from mmalign.evaluation.objects import ObjectVocabulary
    from mmalign.generate.text import generate_answers

    chair, pope = tmp_path / "chair.json", tmp_path / "pope.json"
    assert main(["eval", "chair", "--model", str(folders[name]), "--images", str(world["images"]),
                 "--annotations", str(world["instances"]), "--captions", str(world["captions"]),
                 "--vocabulary", VOCAB, "--prompt", "describe the image .", "--max-new-tokens", "4",
                 "--batch-size", "2", "--device", "cpu", "--out", str(chair)]) == 0
    result = json.loads(chair.read_text())
    # the captions are the family's greedy answers; CHAIR recounted from them and the scenes' objects
    model, processor = load(folders[name])
    truth = {Path(r["image"]).name: {o["shape"] for o in r["objects"]} for r in read(world["jsonl"])}
    names = sorted(truth)  # image ids 1, 2, 3 in file order
    answers = generate_answers(model, processor, [{"prompt": "describe the image .", "images": [
        str(world["images"] / n)]} for n in names], max_new_tokens=4)
    assert [c["caption"] for c in sorted(result["captions"], key=lambda c: c["image_id"])] == answers
    vocab = ObjectVocabulary.load(VOCAB)
    mentioned = [vocab.objects(a) for a in answers]
    wrong = sum(len(m - truth[n]) for m, n in zip(mentioned, names))
    assert result["CHAIR_i"] == pytest.approx(wrong / max(sum(map(len, mentioned)), 1))
    assert result["CHAIR_s"] == pytest.approx(sum(bool(m - truth[n]) for m, n in zip(mentioned, names)) / 3)
    assert main(["eval", "pope", "--model", str(folders[name]), "--images", str(world["images"]),
                 "--annotations", str(world["instances"]), "--setting", "random", "--num-images", "3",
                 "--per-image", "1", "--max-new-tokens", "2", "--device", "cpu", "--out", str(pope)]) == 0
    result = json.loads(pope.read_text())["sets"]["random"]
    for a in result["answers"]:  # labels from the scenes; one present and one absent object per image
        shape = a["text"].removeprefix("Is there a ").removesuffix(" in the image?")
        assert a["label"] == ("yes" if shape in truth[a["image"]] else "no")
    pairs = [(a["pred"], a["label"]) for a in result["answers"]]
    assert result["counts"] == {"tp": pairs.count(("yes", "yes")), "fp": pairs.count(("yes", "no")),
                                "tn": pairs.count(("no", "no")), "fn": pairs.count(("no", "yes")), "n": 6}
    assert sorted(label for _, label in pairs) == ["no"] * 3 + ["yes"] * 3


# -- judge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_judge_scorer_with_the_family_as_judge(name, folders, world):
    from mmalign.generate.text import generate_answers
    from mmalign.scoring.judge import JudgeScorer, parse_pointwise

    model, processor = load(folders[name])
    a, b, c = images_of(world)
    judge = JudgeScorer(str(folders[name]), mode="pointwise", max_new_tokens=3, batch_size=2, device="cpu")
    scores = judge.score(["a red circle", "a blue square"], [a, b], images=[[c], []], kind="image")
    records = [judge.pointwise_record("a red circle", a, [c], "image"),
               judge.pointwise_record("a blue square", b, [], "image")]
    assert [len(r["images"]) for r in records] == [2, 1]  # the request's image + the judged image
    answers = generate_answers(model, processor, records, max_new_tokens=3, batch_size=1)
    expected = [parse_pointwise(x) for x in answers]
    assert [None if math.isnan(s) else s for s in scores.tolist()] == expected
    assert judge.stats()["answers"] == 2
    pairwise = JudgeScorer(mode="pairwise", max_new_tokens=3, model=model, processor=processor)
    outcomes = pairwise.compare(["a red circle"], [a], [b], kind="image")
    assert outcomes[0] in ("first", "second", "tie", "unparsed") and pairwise.stats()["answers"] == 2


@pytest.mark.parametrize("name", NAMES)
def test_claim_judge_probabilities_equal_an_unpadded_forward(name, folders, world):
    """The claim judge's first-token P(yes), P(no) from a left-padded batch (1 and 2 images,
    questions of different lengths) equal an unpadded forward of each question alone."""
    from mmalign.generate.text import _likelihood
    from mmalign.scoring.claims import QUESTION, ClaimJudgeScorer

    model, processor = load(folders[name])
    a, b, c = images_of(world)
    judge = ClaimJudgeScorer(vocabulary=VOCAB, model=model, processor=processor, batch_size=2)
    records = [{"prompt": QUESTION.format(object="circle"), "images": [a]},
               {"prompt": QUESTION.format(object="dark triangle"), "images": [b, c]}]
    got = judge.probabilities(records)
    likelihood, vocab = _likelihood(model, processor, None, ()), processor.tokenizer.get_vocab()
    for row, record in zip(got, records):
        with torch.no_grad():
            logits = model(**likelihood.encode_prompt(record)).logits[0, -1].double()
        p = torch.softmax(logits, -1)
        want = [p[vocab["yes"]] + p[vocab["Yes"]], p[vocab["no"]] + p[vocab["No"]]]
        assert row.tolist() == pytest.approx([float(w) for w in want], rel=1e-4, abs=1e-7)
    scores = judge.score(["describe"] * 2, ["a circle and a square", "nothing"], images=[[a], [b]])
    assert scores[1] == 0.0 and scores[0] in (0.0, -1.0, -2.0) and judge.stats()["claims"] == 2


# -- online rounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_online_round_with_the_family(name, folders, world, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(ROOT / "configs/tiny/llava_online_dpo.yaml"), f"modality={MODALITY.get(name, name)}",
            f"model.path={folders[name]}", f"online.prompts={world['jsonl']}", f"train.output_dir={out}",
            "train.max_steps=1", "online.round_steps=1", "online.prompts_per_round=2", "online.group_size=3",
            "online.sampling={max_new_tokens: 4, temperature: 1.0}", "train.batch_size=2", "data.max_length=160",
            f'online.scorer=["annotations={VOCAB},recall=0.5", "text_length=chars:0.001", '
            f'"claims={folders[name]},vocabulary={VOCAB}"]', *QUIET]
    assert main(args) == 0, capsys.readouterr().err
    folder = out / "rounds" / "round_00000"
    samples = read(folder / "samples.jsonl")
    assert len(samples) == 6 and all(s["kind"] == "text" and len(s["images"]) == 1 for s in samples)
    for s in samples:  # annotations (-hallucinated + 0.5 recall), a character-count tie-breaker, the claim judge
        assert s["score_text_length"] == len(s["text"].strip())
        assert s["score_claims"] == int(s["score_claims"]) and s["score_claims"] <= 0
        assert s["score"] == pytest.approx(s["score_annotations"] + 0.001 * s["score_text_length"] + s["score_claims"])
    by_id = {s["id"]: s for s in samples}
    for r in read(folder / "records.jsonl"):
        chosen, rejected = (by_id[i] for i in r["ids"])
        assert chosen["score"] > rejected["score"] and r["images"] == chosen["images"]
    metrics = [r for r in read(out / "metrics.jsonl") if "loss" in r]
    assert len(metrics) <= 1 and all(math.isfinite(m["loss"]) for m in metrics)
