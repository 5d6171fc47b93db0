"""The online VLM rows of `mmalign demo` (issue 15 item 5b, mmalign/toyworld/demo_online_vlm.py) and
`mmalign build-pairs take`: pooling pair files / online rounds (paths rebased, seeded N-subset), the
per-scene CHAIR / POPE counts against the evaluation's own numbers, the paired scene bootstrap on
hand-made counts, and the rows running in a quick demo."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.toyworld.demo_online_vlm import (chair_counts, chair_from, paired_bootstrap, pope_counts, pope_from,
                                              verdict)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_take_pools_files_and_complete_rounds_with_paths_rebased(tmp_path):
    pairs = [{"images": [f"../img/{i}.png"], "prompt": "p", "chosen": f"c{i}", "rejected": "r"} for i in range(3)]
    _jsonl(tmp_path / "a" / "pairs.jsonl", pairs)
    run = tmp_path / "run"
    _jsonl(run / "rounds" / "round_00000" / "records.jsonl", [{"image": "/abs/x.png", "prompt": "p", "chosen": "o0",
                                                               "rejected": "r"}])
    (run / "rounds" / "round_00000" / "meta.json").write_text("{}")
    _jsonl(run / "rounds" / "round_00001" / "records.jsonl", [{"image": "/abs/y.png", "prompt": "p", "chosen": "o1",
                                                               "rejected": "r"}])  # no meta.json: incomplete
    out = tmp_path / "b" / "deep" / "all.jsonl"
    assert main(["build-pairs", "take", str(tmp_path / "a" / "pairs.jsonl"), str(run), "--out", str(out)]) == 0
    got = _read(out)
    assert [r["chosen"] for r in got] == ["c0", "c1", "c2", "o0"]  # the incomplete round is left out
    assert got[0]["images"] == [os.path.join("..", "..", "img", "0.png")]  # same file, seen from b/deep/
    assert (out.parent / got[0]["images"][0]).resolve() == (tmp_path / "img" / "0.png").resolve()
    assert got[3]["image"] == "/abs/x.png"
    assert {k: v for k, v in got[1].items() if k != "images"} == {k: v for k, v in pairs[1].items() if k != "images"}


def test_take_n_is_a_seeded_subset_in_pool_order(tmp_path, capsys):
    rows = [{"prompt": "p", "chosen": f"c{i}", "rejected": "r"} for i in range(20)]
    _jsonl(tmp_path / "p.jsonl", rows)
    picks = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["build-pairs", "take", str(tmp_path / "p.jsonl"), "--n", "7", "--seed", str(seed), "--out",
                     str(tmp_path / f"{name}.jsonl")]) == 0
        picks[name] = [int(r["chosen"][1:]) for r in _read(tmp_path / f"{name}.jsonl")]
    assert len(picks["a"]) == len(set(picks["a"])) == 7 and picks["a"] == sorted(picks["a"])
    assert picks["a"] == picks["b"] != picks["c"]
    capsys.readouterr()
    too_many = ["build-pairs", "take", str(tmp_path / "p.jsonl"), "--n", "21", "--out", str(tmp_path / "x.jsonl")]
    assert main(too_many) != 0
    assert "build-pairs take: --n 21 but the sources hold 20 records" in capsys.readouterr().err
    (tmp_path / "run").mkdir()  # an online run that finished no round
    assert main(["build-pairs", "take", str(tmp_path / "run"), "--out", str(tmp_path / "x.jsonl")]) != 0
    assert f"{tmp_path / 'run'}: no complete online rounds" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_per_scene_counts_give_back_the_evaluations_numbers():
    from mmalign.evaluation.chair import chair
    from mmalign.evaluation.objects import ObjectVocabulary
    from mmalign.evaluation.pope import pope_metrics

    vocab = ObjectVocabulary.load(None)
    captions = {1: "a dog and a cat on a couch", 2: "a car", 3: "a person with a dog and a dog", 4: "nothing here"}
    truth = {1: ["dog", "couch"], 2: ["car", "bus"], 3: ["person"], 4: ["cup"]}
    result = chair(captions, truth, vocab)
    counts = chair_counts(result)
    assert counts[3] == (2, 3, 1, 1, 1)  # two hallucinated "dog" mentions of three; the person found
    mine = chair_from([sum(c[k] for c in counts.values()) for k in range(5)], len(counts))
    assert mine == pytest.approx({k: result[k] for k in ("CHAIR_i", "CHAIR_s", "recall")}, abs=1e-12)
    preds, labels = ["yes", "no", "yes", "no", "yes", "yes"], ["yes", "yes", "no", "no", "yes", "no"]
    answers = [{"image": f"i{k // 2}", "pred": p, "label": g} for k, (p, g) in enumerate(zip(preds, labels))]
    per_image = pope_counts({"sets": {"adversarial": {"answers": answers}}})
    assert per_image == {"i0": (1, 0, 0, 1), "i1": (0, 1, 1, 0), "i2": (1, 1, 0, 0)}
    sums = [sum(v[k] for v in per_image.values()) for k in range(4)]
    assert pope_from(sums, 3)["POPE_F1"] == pytest.approx(pope_metrics(preds, labels)["f1"], abs=1e-12)


def test_paired_bootstrap_differences_and_intervals():
    # 4 scenes, (hallucinated, mentions, hallucinated caption, gt found, gt): a hallucinates in two
    a = {0: (1, 2, 1, 1, 1), 1: (0, 2, 0, 2, 2), 2: (1, 1, 1, 0, 1), 3: (0, 1, 0, 1, 1)}
    b = {k: (0, v[1], 0, v[3], v[4]) for k, v in a.items()}  # b: the same mentions, none hallucinated
    found = paired_bootstrap(a, b, chair_from, n_boot=200, seed=0)
    assert found["CHAIR_i"][0] == pytest.approx(0 - 2 / 6)  # b - a, ratio of sums
    assert found["CHAIR_s"][0] == pytest.approx(-0.5) and found["recall"][0] == 0.0
    low, high = found["CHAIR_i"][1:]
    assert -1.0 <= low < -2 / 6 < high <= 0  # b never hallucinates: every draw's difference is <= 0
    assert found["recall"][1:] == (0.0, 0.0)
    same = paired_bootstrap(a, dict(a), chair_from, n_boot=50, seed=3)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())  # the same draw for both models
    assert paired_bootstrap(a, b, chair_from, n_boot=200, seed=0) == found  # seeded
    assert verdict("x", (-0.1, -0.2, -0.01)) == "online lower" and verdict("x", (0.1, 0.02, 0.2)) == "x lower"
    assert verdict("x", found["CHAIR_i"]) == "not resolved"  # its interval reaches 0: not separated


def test_quick_online_vlm_rows_run_and_compare_at_the_same_n(tmp_path, capsys):
    """The hook on the quick demo's scenes and offline pairs (the offline runs are test_demo.py's)."""
    from mmalign.toyworld.demo import QUICK, _run, format_table, vlm_steps
    from mmalign.toyworld.demo_online_vlm import online_vlm_rows

    out = tmp_path / "demo"
    for step in vlm_steps(out, QUICK)[:5]:  # scenes (train, test), inject, corrupt, existence pairs
        assert "train" not in step.argv[:1]
        _run(step)
    times: dict = {}
    tables = online_vlm_rows(out, QUICK, True, ("vlm",), times)
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert times["vlm online"] > 0 and times["vlm online cpu"] > 0
    assert online_vlm_rows(out, QUICK, True, ("image",), {}) == []  # no VLM side, no rows
    d, pairs = out / "vlm", out / "vlm" / "pairs"
    online = _read(pairs / "online_rounds.jsonl")
    n = len(online)
    assert n >= 1 and (pairs / f"offline_n{n}.jsonl").is_file() and len(_read(pairs / f"offline_n{n}.jsonl")) == n
    sampled = {json.loads(line)["text"] for f in (d / "online" / "rounds").glob("round_*/samples.jsonl")
               for line in f.read_text().splitlines()}
    assert all(r["chosen"] in sampled and r["rejected"] in sampled for r in online)  # the model's own answers
    trains = [c for c in commands if c.startswith("$ mmalign train")]
    assert sum("toyworld_llava_online_dpo.yaml" in c for c in trains) == 1
    sft = [c for c in trains if f"data.train={pairs / 'online_rounds.jsonl'}" in c]
    assert len(sft) == 1 and "loss.name=sft" in sft[0]
    assert sum(f"data.train={pairs / f'offline_n{n}.jsonl'}" in c for c in trains) == 1
    for name in ("online", "offline_n", "sft_online"):
        assert (d / "eval" / f"{name}_chair.json").is_file() and (d / "eval" / f"{name}_pope.json").is_file()
    offline = {(r["prompt"], r["chosen"], r["rejected"]) for k in ("inject", "corrupt", "existence")
               for r in _read(pairs / f"{k}.jsonl")}
    same_n = _read(pairs / f"offline_n{n}.jsonl")
    assert all((r["prompt"], r["chosen"], r["rejected"]) in offline for r in same_n)
    assert all((pairs / r["images"][0]).is_file() for r in same_n)  # paths still point at the scenes
    rows, diffs = tables  # the base is evaluated by the offline rows' steps, not run here
    assert [r[0] for r in rows["rows"]] == ["online DPO + SFT (annotation score)", "offline DPO + SFT, same N pairs",
                                            "SFT on the online chosen answers"]
    assert [r[1] for r in rows["rows"]] == [str(n)] * 3
    assert [r[0] for r in diffs["rows"]] == ["online - offline DPO + SFT, same N pairs",
                                             "online - SFT on the online chosen answers"]
    assert all(r[-1] in ("online lower", "not resolved") or r[-1].endswith(" lower") for r in diffs["rows"])
    assert format_table(diffs).splitlines()[0] == diffs["title"]
