"""`mmalign demo`: the toy-world chain cut down (`--quick`: a few samples and steps) checks the
pipeline, not the numbers; the exact-checker scorer and the run report on hand-made inputs; the
older text demo stays reachable with `--world text`. The full demo is `make demo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--out", str(out), "--quick", "--online"]) == 0
    return out, buf.getvalue()


def test_quick_demo_runs_every_step_and_writes_the_tables(quick_demo):
    out, printed = quick_demo
    commands = [line for line in printed.splitlines() if line.startswith("$ ")]
    # every stage of both sides ran as an ordinary, printed command
    for stage in ("mmalign generate", "mmalign score", "mmalign build-pairs scores", "mmalign train",
                  "mmalign export", "mmalign eval images", "mmalign build-pairs inject", "mmalign build-pairs corrupt",
                  "mmalign build-pairs existence", "mmalign eval chair", "mmalign eval pope", "mmalign report-run"):
        assert any(c.startswith(f"$ {stage}") for c in commands), stage
    trains = [c for c in commands if c.startswith("$ mmalign train")]
    # image: DPO, SFT control, online DPO and GRPO on the UNet (--online); VLM: plain DPO, DPO+SFT, SFT control;
    # + the online VLM rows: online DPO, offline DPO+SFT at the same N pairs, SFT on the online chosen answers
    # (test_demo_online_vlm.py)
    assert len(trains) == 7 + 3
    assert sum("loss.name=sft" in c for c in trains) == 2 + 1 and sum("loss.sft_weight=0.0" in c for c in trains) == 1
    pairs = out / "vlm" / "pairs"
    files = f"data.train=[{pairs / 'inject.jsonl'}, {pairs / 'corrupt.jsonl'}, {pairs / 'existence.jsonl'}]"
    assert sum(files in c for c in trains) == 3  # each VLM run reads the three pair files as one dataset
    for name in ("inject", "corrupt", "existence"):  # pairs come from training scenes only
        images = {json.loads(line)["images"][0] for line in (pairs / f"{name}.jsonl").read_text().splitlines()}
        assert images and all(Path(i).name.startswith("train_") for i in images), name
    # the image evaluation compares under the exact checker, at the sampling guidance fixed up front
    result = json.loads((out / "image" / "eval" / "dpo_seeds.json").read_text())
    checker = result["scorers"]["score_toyworld_checker"]
    assert 0.0 <= checker["win_rate"] <= 1.0 and checker["ci"][0] <= checker["win_rate"] <= checker["ci"][1]
    assert checker["n"] == 10 * 2  # 10 training prompts x 2 held-out samples (QUICK)
    manifest = out / "image" / "eval" / "dpo_seeds" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {r["params"]["guidance_scale"] for r in rows} == {1.0}
    samples = out / "image" / "samples" / "manifest.jsonl"
    train_seeds = {json.loads(line)["seed"] for line in samples.read_text().splitlines()}
    assert train_seeds and not train_seeds & {r["seed"] for r in rows}  # held-out seeds: never in a pair
    tables = json.loads((out / "results.json").read_text())["tables"]
    assert [r[1] for r in tables[0]["rows"][:5]] == ["base", "Diffusion-DPO", "SFT on chosen images (control)",
                                                     "online DPO (learned-scorer reward)",
                                                     "GRPO on the UNet (learned-scorer reward)"]
    assert [r[0] for r in tables[1]["rows"]] == ["base (web-caption bias)", "plain DPO", "DPO + SFT (RPO)",
                                                 "SFT on chosen only (control)"]
    assert [r[0] for r in tables[-2]["rows"]] == ["base (web-caption bias)", "online DPO + SFT (annotation score)",
                                                  "offline DPO + SFT, same N pairs", "SFT on the online chosen answers"]
    assert len(tables[-1]["rows"]) == 3 and tables[-1]["title"] in printed  # online - each other, with intervals
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 6  # loss, margin, accuracy curves for each side
    assert page.count("<img") >= 3 * 2 + 8  # 3 models x 2 samples of a prompt; 8 captioned test images


def test_quick_demo_rerun_skips_finished_steps(quick_demo, capsys):
    out, _ = quick_demo
    before = (out / "image" / "pairs" / "pairs.jsonl").read_bytes()
    assert main(["demo", "--out", str(out), "--quick", "--only", "vlm", "--online"]) == 0  # as the first run
    printed = capsys.readouterr().out
    commands = [line for line in printed.splitlines() if line.startswith("$ ")]
    assert printed.count("(skipped:") == len(commands) - 1  # every step but the report
    assert (out / "image" / "pairs" / "pairs.jsonl").read_bytes() == before


def test_checker_scorer_is_the_exact_checker():
    from mmalign.scoring import load_scorer
    from mmalign.toyworld.world import Obj, Scene, render

    image = render(Scene(16, (Obj("red", "square", 8, 8, 5),)))
    scorer = load_scorer("toyworld_checker=score")
    # a clean render scores 1; wrong colour 0; a square asked as a circle: fill 1 vs 0.78 -> 1 - (0.22-0.05)/0.2
    got = scorer.score(["a red square", "a blue square", "a red circle"], [image] * 3).tolist()
    assert got == pytest.approx([1.0, 0.0, 1 - (1.0 - 0.78 - 0.05) / 0.2], abs=1e-6)
    assert load_scorer("toyworld_checker=colour").score(["a red circle"], [image]).item() == 1.0
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="score, colour, shape"):
        load_scorer("toyworld_checker=area")


def test_report_run_highlights_hallucinated_words_and_draws_curves(tmp_path):
    from mmalign.report.runs import highlight, line_chart_svg

    assert highlight("a red circle and two squares <b>", ["square"]) == \
        "a red circle and two <mark>squares</mark> &lt;b&gt;"
    svg = line_chart_svg({"a": [(0, 1.0), (10, 0.0)]}, "loss", width=100, height=100)
    # x 0 -> left edge 48, x 10 -> right edge 92; y 1 (max) -> top 22, y 0 (min) -> bottom 64
    assert 'points="48.0,22.0 92.0,64.0"' in svg
    (tmp_path / "t.json").write_text(json.dumps({"columns": ["m", "v"], "rows": [["base", "<1>"]]}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 5, "loss": 0.5}\n')
    assert main(["report-run", "--out", str(tmp_path / "r.html"), "--tables", str(tmp_path / "t.json"),
                 "--curves", f"x: a={tmp_path / 'run'}", "--curve-keys", "loss"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<td>&lt;1&gt;</td>" in page and page.count("<polyline") == 1


def test_text_world_demo_is_still_reachable(tmp_path, capsys):
    assert main(["demo", "--world", "text", "--out", str(tmp_path), "train.max_steps=3", "train.eval_every=0"]) == 0
    assert "hallucination rate (greedy, exact checker)" in capsys.readouterr().out
    assert (tmp_path / "run" / "final").is_dir() and (tmp_path / "run_sft" / "final").is_dir()


def test_quick_demo_online_row_samples_the_offline_budget_and_compares_on_the_same_seeds(quick_demo):
    out, printed = quick_demo
    d = out / "image"
    online = [c for c in printed.splitlines() if c.startswith("$ mmalign train configs/tiny/toyworld_sd_online")]
    assert len(online) == 1 and "online.prompts_per_round=5" in online[0] and "online.group_size=2" in online[0]
    # equal sample budget: every image the online rounds sampled vs the offline samples (10 prompts x 1 x 2)
    rounds = sorted((d / "online" / "rounds").glob("round_*"))
    sampled = [json.loads(line) for r in rounds for line in (r / "samples.jsonl").read_text().splitlines()]
    offline = (d / "samples" / "manifest.jsonl").read_text().splitlines()
    assert len(rounds) == 2 and len(sampled) == len(offline) == 20
    assert {r["prompt"] for r in sampled} <= set((d / "prompts_eval_seeds.txt").read_text().splitlines())
    held_out = {json.loads(line)["seed"] for line in (d / "eval" / "online_seeds" / "manifest.jsonl").read_text()
                .splitlines()}
    assert not held_out & {r["seed"] for r in sampled}  # evaluated on seeds it never trained on
    # the comparison is paired: the offline model's held-out samples as --base, the online model's as --aligned
    vs = json.loads((d / "eval" / "online_vs_dpo_seeds.json").read_text())
    assert vs["base"].endswith("dpo_seeds") and vs["aligned"].endswith("online_seeds")
    c = vs["scorers"]["score_toyworld_checker"]
    assert c["n"] == 20 and c["ci"][0] <= c["win_rate"] <= c["ci"][1]
    tables = json.loads((out / "results.json").read_text())["tables"]
    assert tables[2]["title"].startswith("Online vs offline Diffusion-DPO at the same sample budget")
    assert [r[0] for r in tables[2]["rows"]] == ["held-out seeds, training prompts", "held-out prompts"]
    assert "offline samples 20 images" in tables[2]["note"] and "online samples 20 images" in tables[2]["note"]
    assert "Online vs offline Diffusion-DPO at the same sample budget" in printed
    assert "target online image win rate >= 0.65, CI low > 0.5:" in printed


def test_quick_demo_grpo_row_samples_the_offline_budget_and_compares_on_the_same_seeds(quick_demo):
    out, printed = quick_demo
    d = out / "image"
    grpo = [c for c in printed.splitlines() if c.startswith("$ mmalign train configs/tiny/toyworld_sd_grpo.yaml")]
    assert len(grpo) == 1
    for override in ("grpo.prompts_per_round=5", "grpo.group_size=2", "grpo.num_steps=2", "train.max_steps=2",
                     "train.batch_size=10", "grpo.guidance=1.0", "grpo.noise_level=1.0"):
        assert override in grpo[0].split(), override
    # 2 rounds x 5 prompts x 2 trajectories = the offline row's 20 images (10 prompts x 1 group x 2)
    rounds = [line for line in printed.splitlines() if line.startswith("[mmalign] grpo round")]
    assert [line.split(":")[1].split(",")[0].strip() for line in rounds] == ["10 trajectories"] * 2
    assert len((d / "samples" / "manifest.jsonl").read_text().splitlines()) == 20
    assert sorted(p.name for p in (d / "grpo" / "rounds").glob("grpo_*")) == ["grpo_00000.safetensors",
                                                                              "grpo_00001.safetensors"]
    for split in ("seeds", "heldout"):  # paired: the offline model's held-out samples as --base, GRPO's as --aligned
        vs = json.loads((d / "eval" / f"grpo_vs_dpo_{split}.json").read_text())
        assert vs["base"].endswith(f"dpo_{split}") and vs["aligned"].endswith(f"grpo_{split}")
        c = vs["scorers"]["score_toyworld_checker"]
        assert c["n"] == {"seeds": 20, "heldout": 4}[split] and c["ci"][0] <= c["win_rate"] <= c["ci"][1]
    over_base = json.loads((d / "eval" / "grpo_seeds.json").read_text())
    assert over_base["base"].endswith("base_seeds") and over_base["scorers"]["score_toyworld_checker"]["n"] == 20
    tables = json.loads((out / "results.json").read_text())["tables"]
    assert tables[3]["title"].startswith("GRPO on the UNet vs offline Diffusion-DPO at the same sample budget")
    assert [r[0] for r in tables[3]["rows"]] == ["held-out seeds, training prompts", "held-out prompts"]
    assert "offline samples 20 images" in tables[3]["note"] and "GRPO samples 20 DDIM trajectories" in tables[3]["note"]
    assert "target GRPO on the UNet win rate >= 0.65, CI low > 0.5:" in printed


def test_grpo_row_plan_is_the_offline_budget_and_the_shipped_config():
    from dataclasses import replace

    from mmalign.config import load_config
    from mmalign.toyworld.demo import QUICK, DemoSettings
    from mmalign.toyworld.demo_online import GRPO_CONFIG, grpo_plan

    # 640 images = 8 rounds x 20 prompts x 4; 9 of 10 DDIM steps trained: 80 x 9 = 720 transitions = 4 x 180
    full = grpo_plan(DemoSettings())
    assert full == {"rounds": 8, "images": 640, "trained_steps": 9, "max_steps": 32, "batch": 180}
    assert grpo_plan(QUICK) == {"rounds": 2, "images": 20, "trained_steps": 1, "max_steps": 2, "batch": 10}
    cfg = load_config(Path(__file__).resolve().parents[1] / GRPO_CONFIG)  # its header's numbers are the plan's
    assert (cfg.modality, cfg.loss.name, cfg.model.path) == ("sd_grpo", "grpo", "pkg://toyworld/diffusion")
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.grpo.num_steps, cfg.grpo.round_steps) == (32, 180, 10, 4)
    assert (cfg.grpo.prompts_per_round, cfg.grpo.group_size) == (20, 4)
    with pytest.raises(ValueError, match="do not make the offline 640 images in steps of grpo_round_steps=7"):
        grpo_plan(replace(DemoSettings(), grpo_round_steps=7))


def test_online_sample_budget_must_equal_the_offline_one():
    from dataclasses import replace

    from mmalign.toyworld.demo import QUICK, DemoSettings
    from mmalign.toyworld.demo_online import sample_budgets

    assert sample_budgets(DemoSettings()) == (640, 640)  # 10 x 16 x 4 = ceil(200 / 25) x 20 x 4
    assert sample_budgets(QUICK) == (20, 20)  # 10 x 1 x 2 = ceil(2 / 1) x 5 x 2
    with pytest.raises(ValueError, match="3 rounds x 20 prompts x 4 = 240 images, offline 640"):
        sample_budgets(replace(DemoSettings(), image_steps=60))


def test_online_costs_split_round_sampling_from_training(tmp_path):
    from mmalign.toyworld.demo_online import online_costs

    # batch 16: round starts took 16/2 = 8 s and 16/4 = 4 s, plain steps 16/8 = 2 s, 16/16 = 1 s, 16/8 = 2 s
    rows = [{"step": 1, "examples_per_s": 2.0, "online/round": 0.0}, {"step": 5, "examples_per_s": 8.0},
            {"step": 10, "examples_per_s": 16.0}, {"step": 11, "examples_per_s": 4.0, "online/round": 1.0},
            {"step": 15, "examples_per_s": 8.0}, {"step": 20, "loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # median plain step 2 s; rounds (8 + 4) / 2 - 2 = 4 s
    assert online_costs(tmp_path, 16) == {"rounds": 2, "round_sampling_s": 4.0, "train_step_s": 2.0}
    assert online_costs(tmp_path / "missing", 16) is None
