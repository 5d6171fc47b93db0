"""Online guards, mixing and resume (issue 15, items 2-4): per-round reward statistics, tie
fraction and held-out reward with hand-checked numbers; the KL estimate against a hand formula
(and 0 where policy == reference); `online.reference_update: every_round` (loss log 2 at the
round's first step, exact resume); offline records mixed into rounds; a round killed while
sampling is sampled again identically; the run report's per-round section."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.online import OnlineSource
from mmalign.online.guards import round_kl, round_metrics
from mmalign.online.samplers import SAMPLERS
from mmalign.types import LogpOutput
from online_fixtures import Accelerator, fake_source

ROOT = Path(__file__).resolve().parents[1]
LM = ROOT / "configs/tiny/lm_online_dpo.yaml"
LLAVA = ROOT / "configs/tiny/llava_online_dpo.yaml"
VOCAB = "pkg://vocab/toyworld_objects.txt"
QUIET = ["train.progress=false", "train.tensorboard=false", "train.log_every=1"]
# (prompt, position in its group) -> answer; words: p one 3 vs 1, p two 2 vs 2 (a tie)
ANSWERS = {("p one", 0): "a b c", ("p one", 1): "a", ("p two", 0): "x y", ("p two", 1): "u v"}


def fake_text(ctx, model, job):
    return [{"kind": "text", "text": ANSWERS[(p, int(i[-2:]) % 2)]} for p, i in zip(job.prompts, job.ids)]


def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> OnlineSource:
    return fake_source(tmp_path, monkeypatch, fake_text, *overrides)


# -- guard values by hand -------------------------------------------------------------------------
def test_round_metrics_by_hand():
    rows = [{"prompt_index": p, "sample": j, "score": s}
            for p, j, s in [(0, 0, 1.0), (0, 1, 3.0), (1, 0, 2.0), (1, 1, 2.0), (2, 0, 5.0), (3, 0, None)]]
    got = round_metrics(rows, kept=1)
    # scores 1 3 2 2 5: mean 2.6, population variance (2.56 + .16 + .36 + .36 + 5.76) / 5 = 1.84;
    # groups with >= 2 scored samples: 0 (1 vs 3) and 1 (2 vs 2, a tie) -> 1/2
    assert got == {"online/reward_mean": pytest.approx(2.6), "online/reward_std": pytest.approx(math.sqrt(1.84)),
                   "online/tie_fraction": 0.5, "online/kept_records": 1.0}


def test_round_guards_and_held_out_reward_by_hand(tmp_path, monkeypatch):
    src = source(tmp_path, monkeypatch, "online.eval_scorer=[text_length=chars]", "online.eval_prompt_list=[p one]",
                 "online.eval_samples=2")
    first = src.records_for_step(0, torch.nn.Linear(1, 1), Accelerator())
    # words 3, 1, 2, 2: mean 2, std sqrt((1 + 1 + 0 + 0) / 4); p two ties -> 1 record of 2 groups
    # held out: "p one" twice -> "a b c" (5 chars), "a" (1 char): mean 3
    assert first.metrics == {"online/round": 0.0, "online/reward_mean": 2.0, "online/reward_std": pytest.approx(
        math.sqrt(0.5)), "online/tie_fraction": 0.5, "online/kept_records": 1.0, "online/eval_reward_mean": 3.0}
    assert first.first_step == 0 and len(first.records) == 1
    later = src.records_for_step(4, torch.nn.Linear(1, 1), Accelerator())  # round 1 (round_steps 4)
    assert later.first_step == 4 and later.metrics["online/round"] == 1.0
    held = [[json.loads(x) for x in (tmp_path / "rounds" / f"round_{r:05d}" / "eval" / "samples.jsonl").open()]
            for r in (0, 1)]
    assert [r["seed"] for r in held[0]] == [r["seed"] for r in held[1]]  # fixed seeds across rounds
    assert len({r["seed"] for r in held[0]}) == 2 and [r["score"] for r in held[0]] == [5.0, 1.0]
    # read back from the saved round: the same values, nothing sampled
    monkeypatch.setitem(SAMPLERS, "text", lambda *a: pytest.fail("a saved round was sampled again"))
    again = OnlineSource(src.cfg, likelihood=None).records_for_step(1, torch.nn.Linear(1, 1), Accelerator())
    assert again.metrics == first.metrics and again.records == first.records


class Scale(torch.nn.Module):
    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))


class Values:
    """A likelihood whose log-likelihood of an output is w * len(output) (w: the model's weight)."""

    def collate(self, records, kind):
        return torch.tensor([float(len(r[k])) for k in ("chosen", "rejected") for r in records])

    def draw(self, batch, generator):
        return batch  # anything with .to

    def logps(self, model, batch, draw):
        return LogpOutput(model.w * batch)


def test_kl_estimate_is_the_mean_log_ratio_of_the_sampled_outputs():
    likelihood, reference_model = Values(), Scale(0.5)
    reference = type("Ref", (), {"logps": lambda self, b, d: LogpOutput(reference_model.w.detach() * b)})()
    records = [{"chosen": "abc", "rejected": "a"}, {"chosen": "ab", "rejected": "abcd"}, {"chosen": "a", "rejected": "a"}]
    # lengths 3 1 2 4 1 1 (mean 2), (2 - 0.5) * 2 = 3; in batches of 2 and 1 the same
    kl = round_kl(likelihood, Scale(2.0), reference, records, "pair", "cpu", 2, 0, Accelerator.autocast)
    assert kl == pytest.approx(3.0)


# -- config errors -------------------------------------------------------------------------------
def test_mixing_needs_one_record_kind_and_enough_rows(tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a b", "rejected": "a"}) + "\n" for i in range(3)))
    with pytest.raises(ConfigError, match="data.train holds pair records but online.strategy ranked builds ranked"):
        source(tmp_path, monkeypatch, f"data.train={pairs}", "online.offline_per_round=2", "online.strategy=ranked")
    with pytest.raises(ConfigError, match="online.offline_per_round=4 is more than data.train's 3 records"):
        source(tmp_path, monkeypatch, f"data.train={pairs}", "online.offline_per_round=4")
    assert main(["train", str(LM), f"train.output_dir={tmp_path / 'x'}", "online.reference_update=every_round",
                 "loss.name=simpo", *QUIET]) == 2


# -- mixing ----------------------------------------------------------------------------------------
def test_a_mixed_round_holds_the_seeded_offline_rows(tmp_path, monkeypatch):
    from mmalign.seeds import mix_seed

    pairs = tmp_path / "pairs.jsonl"
    offline = [{"prompt": f"q{i}", "chosen": "a b", "rejected": "a"} for i in range(6)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in offline))
    src = source(tmp_path / "run", monkeypatch, f"data.train={pairs}", "online.offline_per_round=3")
    rounds = [src.records_for_step(step, torch.nn.Linear(1, 1), Accelerator()).records for step in (0, 4)]
    drawn = []
    for r, records in enumerate(rounds):
        # the documented rule: the first 3 of a permutation seeded by mix_seed(train.seed, r, offset=53)
        generator = torch.Generator().manual_seed(mix_seed(src.cfg.train.seed, r, offset=53))
        expected = torch.randperm(6, generator=generator)[:3].tolist()
        meta = json.loads((tmp_path / "run" / "rounds" / f"round_{r:05d}" / "meta.json").read_text())
        assert meta["offline_rows"] == expected and len(set(expected)) == 3
        assert len(records) == 1 + 3 and records[0]["chosen"] == "a b c"  # the online record first
        assert [{k: v for k, v in rec.items() if k != "_root"} for rec in records[1:]] == [offline[i] for i in expected]
        drawn.append(expected)
    assert drawn[0] != drawn[1]  # a new draw every round


def test_a_mixed_run_trains(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "scene : dog . describe :", "chosen": "dog", "rejected": "cat"})
                             + "\n" for _ in range(4)))
    out = tmp_path / "run"
    assert main(["train", str(LM), f"train.output_dir={out}", f"data.train={pairs}", "online.offline_per_round=2",
                 "online.round_steps=2", "train.max_steps=2", *QUIET]) == 0
    meta = json.loads((out / "rounds" / "round_00000" / "meta.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert len(meta["offline_rows"]) == 2 and all(math.isfinite(m["loss"]) for m in metrics)


# -- reference refresh, KL and resume on the tiny LM ------------------------------------------------
def lm(out: Path, *overrides: str) -> int:
    return main(["train", str(LM), f"train.output_dir={out}", "online.round_steps=2", *QUIET, *overrides])


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((out / "final").glob("*.safetensors"))))


def guard_rows(out: Path) -> dict[int, dict]:
    """round -> its metrics line (the round's first step), without the timing value."""
    return {int(m["online/round"]): {k: v for k, v in m.items() if k != "examples_per_s"}
            for m in map(json.loads, (out / "metrics.jsonl").open()) if "online/round" in m}


def test_reference_refresh_gives_log2_at_the_round_start_and_resumes_exactly(tmp_path):
    assert lm(tmp_path / "fixed", "train.max_steps=3") == 0
    assert lm(tmp_path / "a", "train.max_steps=4", "online.reference_update=every_round") == 0
    fixed, fresh = guard_rows(tmp_path / "fixed"), guard_rows(tmp_path / "a")
    # round 0: policy == reference, so the log-ratio of every sample is exactly 0
    assert fixed[0]["online/kl"] == 0.0 and fresh[0]["online/kl"] == 0.0
    # round 1 starts at step 2 (logged with step 3): the KL is to the reference before any refresh
    assert fixed[1]["step"] == 3 and fixed[1]["online/kl"] != 0.0
    assert fresh[1]["online/kl"] == pytest.approx(fixed[1]["online/kl"], abs=1e-6)
    # ... then every_round loads the policy into the reference: step 3 trains with policy == reference
    assert fresh[1]["loss"] == pytest.approx(math.log(2), abs=1e-6) and fresh[1]["rewards/margins"] == 0.0
    assert fixed[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    # the refreshed reference is checkpointed: killed after step 3 (mid round 1), resumed to 4
    assert lm(tmp_path / "b", "train.max_steps=3", "online.reference_update=every_round") == 0
    assert lm(tmp_path / "b", "train.max_steps=4", "online.reference_update=every_round", "train.resume=true") == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert guard_rows(tmp_path / "b") == fresh  # round lines logged once, with the same values


def test_a_round_killed_while_sampling_is_sampled_again_identically(tmp_path, capsys):
    assert lm(tmp_path / "a", "train.max_steps=4") == 0
    # run b stops at step 2 (checkpoint), then "dies" while sampling round 1: the folder holds a
    # torn samples.jsonl, a stale records.jsonl and a temp media file, but no meta.json
    assert lm(tmp_path / "b", "train.max_steps=2") == 0
    partial = tmp_path / "b" / "rounds" / "round_00001"
    (partial / "media").mkdir(parents=True)
    (partial / "media" / ".r00001-p000-s00.png.tmp-999").write_bytes(b"\x89PNG torn")
    (partial / "samples.jsonl").write_text('{"id": "r00001-p000-s00", "text": "tor')
    shutil.copy(tmp_path / "a" / "rounds" / "round_00000" / "records.jsonl", partial / "records.jsonl")
    capsys.readouterr()
    assert lm(tmp_path / "b", "train.max_steps=4", "train.resume=true") == 0
    assert "online round 1:" in capsys.readouterr().out  # sampled again, not read back
    whole = tmp_path / "a" / "rounds" / "round_00001"
    for name in ("samples.jsonl", "records.jsonl"):
        assert (partial / name).read_text() == (whole / name).read_text(), name
    meta = [json.loads((f / "meta.json").read_text()) for f in (partial, whole)]
    assert [{k: v for k, v in m.items() if k != "fingerprint"} for m in meta][0] == \
        {k: v for k, v in meta[1].items() if k != "fingerprint"}  # the fingerprint names the output_dir
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the run report ------------------------------------------------------------------------------
def test_report_shows_each_round_with_scores(tmp_path, monkeypatch):
    src = source(tmp_path, monkeypatch)
    src.records_for_step(0, torch.nn.Linear(1, 1), Accelerator())
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "online/round": 0, "online/kl": 0.25}) + "\n")
    img = tmp_path / "img"  # an image round: the grid embeds each sample with its score
    (img / "rounds" / "round_00000" / "media").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(img / "rounds" / "round_00000" / "media" / "s0.png")
    (img / "rounds" / "round_00000" / "samples.jsonl").write_text(json.dumps(
        {"id": "s0", "prompt_index": 0, "prompt": "a red <circle>", "sample": 0, "kind": "image",
         "path": "media/s0.png", "score": 0.75}) + "\n")
    out = tmp_path / "report.html"
    assert main(["report-run", "--out", str(out), "--rounds", f"text={tmp_path}", "--rounds", f"image={img}"]) == 0
    page = out.read_text()
    assert "<h3>round 0</h3>" in page and "online/kl</td><td>0.25" in page
    assert "online/tie_fraction</td><td>0.5" in page and "a b c <b>3 (chosen)</b>" in page and "a <b>1 (rejected)</b>" in page
    assert "a red &lt;circle&gt;" in page and "data:image/png;base64," in page and "0.75" in page
    assert "incomplete (no meta.json)" in page


# -- held-out guard of a VLM: prompts sampled about their images ---------------------------------------
VLM_ANSWERS = {("a.png", 0): "a circle", ("a.png", 1): "a circle and a square", ("b.png", 0): "a square",
               ("b.png", 1): "a ring", ("c.png", 0): "a circle and a triangle", ("c.png", 1): "a circle and a square"}


def test_vlm_held_out_prompts_are_sampled_with_their_images(tmp_path, monkeypatch):
    from mmalign.toyvlm import draw_shape

    for name, shape in {"a.png": "circle", "b.png": "square", "c.png": "ring"}.items():
        draw_shape("red", shape).save(tmp_path / name)
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"image": n, "prompt": "describe", "objects": [o]}) + "\n"
                             for n, o in [("a.png", "circle"), ("b.png", "square")]))
    held.write_text(json.dumps({"image": "c.png", "prompt": "what is here", "objects": ["circle", "square"]}) + "\n")
    seen = []

    def fake_vlm(ctx, model, job):
        seen.extend((i, f["images"]) for i, f in zip(job.ids, job.fields, strict=True))
        return [{"kind": "text", "text": VLM_ANSWERS[(Path(f["images"][0]).name, int(i[-2:]))]}
                for i, f in zip(job.ids, job.fields, strict=True)]

    vlm = ["online.prompt_list=[]", f"online.prompts={train}", "online.eval_samples=2",
           f"online.eval_scorer=[\"annotations={VOCAB},recall=0.5\"]", f"online.eval_prompts={held}"]
    src = fake_source(tmp_path / "run", monkeypatch, fake_vlm, *vlm, sampler_key="vlm", config=LLAVA)
    got = src.records_for_step(0, torch.nn.Linear(1, 1), Accelerator())
    # held out, about c.png (objects circle, square): "a circle and a triangle" -1 + 0.5 * 1/2 = -0.75,
    # "a circle and a square" 0 + 0.5 * 2/2 = 0.5: mean -0.125
    assert got.metrics["online/eval_reward_mean"] == pytest.approx(-0.125)
    c_png = [str(tmp_path / "c.png")]
    assert [(i, p) for i, p in seen if i.startswith("eval")] == [("eval-p000-s00", c_png), ("eval-p000-s01", c_png)]
    rows = [json.loads(x) for x in (tmp_path / "run/rounds/round_00000/eval/samples.jsonl").open()]
    assert [(r["images"], r["objects"], r["score"]) for r in rows] == [(c_png, ["circle", "square"], -0.75),
                                                                       (c_png, ["circle", "square"], 0.5)]
    # training rows: every sample about its own prompt's image (word counts: 2 vs 5 and 2 vs 2)
    assert sorted((p[0], i[-2:]) for i, p in seen if i.startswith("r")) == sorted(
        (str(tmp_path / n), s) for n in ("a.png", "b.png") for s in ("00", "01"))
    with pytest.raises(ConfigError, match="online.eval_prompt_list has no images: a VLM's online prompts come "
                                          "from online.eval_prompts"):
        fake_source(tmp_path / "run2", monkeypatch, fake_vlm, *vlm, "online.eval_prompt_list=[what is here]",
                    "online.eval_prompts=", sampler_key="vlm", config=LLAVA)
