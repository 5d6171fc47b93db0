"""`mmalign demo --flow`: offline Flow-DPO vs online Flow-GRPO and DiffusionNFT on the shipped toy flow model.

All three start from pkg://toyworld/flow (an SD3-shaped StableDiffusion3Pipeline for 16×16 images,
pipelines/train_toy_flow.py) and spend the SAME number of sampled images B = groups · group_size ·
|TRAIN_PROMPTS| (default 16 · 4 · 10 = 640), rewarded by the LEARNED toy scorer:

- Flow-DPO (offline): the base samples B images once (`mmalign generate`), the scorer ranks each group of
  `group_size`, best-vs-worst pairs -> `mmalign train configs/tiny/toyworld_flow_dpo.yaml`.
- Flow-GRPO (online, modality sd3_grpo): `groups` rounds, each samples `group_size` SDE trajectories for
  every training prompt with the current policy (configs/tiny/toyworld_flow_grpo.yaml).
- DiffusionNFT (online): `groups` rounds of `group_size` ODE samples per prompt from the old policy
  (configs/tiny/toyworld_flow_nft.yaml).

Each model and the base then sample held-out seeds (>= HELDOUT_SEED_START) of the training prompts and
`mmalign eval images` gives the win rate over the base under the EXACT checker (which no training step
saw), with a prompt-bootstrap 95 % interval. Every step is a printed `$ mmalign ...` command, skipped
when its output exists (a rerun finishes a killed demo), as in `mmalign demo` (toyworld/demo.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mmalign.toyworld.demo import CHECKER, SCORER, Step, _run, _train, format_table
from mmalign.toyworld.demo_online import load_result, win_rate_ci
from mmalign.toyworld.world import HELDOUT_SEED_START, TRAIN_PROMPTS

FLOW_MODEL = "pkg://toyworld/flow"
CONFIGS = {"dpo": "configs/tiny/toyworld_flow_dpo.yaml", "grpo": "configs/tiny/toyworld_flow_grpo.yaml",
           "nft": "configs/tiny/toyworld_flow_nft.yaml"}
PHASES = ("pairs", "dpo", "grpo", "nft", "eval")
NAMES = {"dpo": "Flow-DPO (offline pairs)", "grpo": "Flow-GRPO (online)", "nft": "DiffusionNFT (online)"}


@dataclass(frozen=True)
class FlowDemoSettings:
    """Everything the rows depend on, fixed before anything runs."""

    seed: int = 0
    eval_seed: int = HELDOUT_SEED_START
    guidance: float = 1.0  # sampling guidance of the pairs, the online rounds and the evaluation
    inference_steps: int = 10  # pairs and evaluation (Euler); GRPO's SDE and NFT's rounds use their configs'
    groups: int = 16  # DPO: groups per prompt (one pair each); GRPO / NFT: rounds
    group_size: int = 4
    eval_samples: int = 32
    dpo_steps: int = 200
    dpo_batch: int = 16
    n_boot: int = 1000

    def budget(self) -> int:
        """Sampled images per method: groups · group_size · |TRAIN_PROMPTS|."""
        return self.groups * self.group_size * len(TRAIN_PROMPTS)


QUICK_FLOW = FlowDemoSettings(inference_steps=2, groups=1, group_size=2, eval_samples=2, dpo_steps=2, dpo_batch=2,
                              n_boot=50)


def _sampling(s: FlowDemoSettings) -> list[str]:
    return ["--set", f"guidance_scale={s.guidance:g}", "--set", f"num_inference_steps={s.inference_steps}",
            "--batch-size", "64"]


def train_overrides(method: str, out: Path, s: FlowDemoSettings) -> dict[str, Any]:
    """The `mmalign train` overrides of each method for settings `s` (equal sampled-image budgets)."""
    common = {"train.output_dir": out / method, "train.seed": s.seed}
    if method == "dpo":
        return {**common, "data.train": out / "pairs" / "pairs.jsonl", "train.max_steps": s.dpo_steps,
                "train.batch_size": s.dpo_batch}
    section = "grpo" if method == "grpo" else "online"
    # one round = |prompts| · group_size samples; round_steps 4 optimizer steps per round (the configs')
    per_round = len(TRAIN_PROMPTS) * s.group_size * (9 if method == "grpo" else 1)
    rounds = {f"{section}.group_size": s.group_size, "train.max_steps": 4 * s.groups,
              f"{section}.round_steps": 4, "train.batch_size": per_round // 4}
    if method == "nft":
        rounds["online.sampling"] = f"{{num_inference_steps: {max(s.inference_steps, 2)}, guidance_scale: " \
                                    f"{s.guidance:g}}}"
    else:
        rounds["grpo.guidance"] = s.guidance
    if per_round % 4:
        raise ValueError(f"group_size {s.group_size}: a round of {per_round} items does not split in 4 steps")
    return {**common, **rounds}


def flow_steps(out: Path, s: FlowDemoSettings) -> dict[str, list[Step]]:
    """{"pairs", "dpo", "grpo", "nft", "eval"}: the commands of each phase."""
    prompts = {"train": out / "prompts_train.txt", "seeds": out / "prompts_eval_seeds.txt"}
    world = "python -m mmalign.toyworld"
    phases: dict[str, list[Step]] = {"pairs": [
        Step(world, ["prompts", str(prompts["train"]), "--split", "train", "--repeat", str(s.groups)],
             prompts["train"]),
        Step(world, ["prompts", str(prompts["seeds"]), "--split", "train"], prompts["seeds"]),
        Step("mmalign", ["generate", "--model", FLOW_MODEL, "--prompts", str(prompts["train"]), "--out",
                         str(out / "samples"), "--num-samples", str(s.group_size), "--seed", str(s.seed),
                         *_sampling(s)]),
        Step("mmalign", ["score", str(out / "samples"), "--scorer", SCORER, "--batch-size", "64"]),
        Step("mmalign", ["build-pairs", "scores", str(out / "samples"), "--out", str(out / "pairs"),
                         "--strategy", "best_worst"], out / "pairs" / "pairs.jsonl")]}
    models = {"base": FLOW_MODEL}
    for method, config in CONFIGS.items():
        phases[method] = [_train(config, out / method, train_overrides(method, out, s)),
                          Step("mmalign", ["export", str(out / method), "--to", str(out / f"{method}_model"),
                                           "--format", "merged"], out / f"{method}_model")]
        models[method] = str(out / f"{method}_model")
    phases["eval"] = []
    for model, path in models.items():
        manifest = out / "eval" / model
        phases["eval"] += [
            Step("mmalign", ["generate", "--model", path, "--prompts", str(prompts["seeds"]), "--out", str(manifest),
                             "--num-samples", str(s.eval_samples), "--seed", str(s.eval_seed), *_sampling(s)]),
            Step("mmalign", ["score", str(manifest), "--scorer", CHECKER, "--scorer", SCORER, "--batch-size", "64"])]
    for method in CONFIGS:
        result = out / "eval" / f"{method}.json"
        phases["eval"].append(Step("mmalign", ["eval", "images", "--base", str(out / "eval" / "base"), "--aligned",
                                               str(out / "eval" / method), "--column", "score_toyworld_checker",
                                               "--column", "score_pickscore", "--n-boot", str(s.n_boot),
                                               "--out", str(result)], result))
    return phases


def flow_table(out: Path, s: FlowDemoSettings, times: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One row per method: win rate over the base (exact checker, learned scorer), checker means, CPU time."""
    rows = []
    for method, name in NAMES.items():
        r = load_result(out / "eval" / f"{method}.json")
        if r is None:
            continue
        c, p = r["scorers"]["score_toyworld_checker"], r["scorers"]["score_pickscore"]
        if not rows:
            rows.append(["base", "-", f"{c['mean_base']:.3f}", "-", "-", "-", str(c["n"])])
        spent = times.get(method, {})
        if method == "dpo" and "pairs" in times:  # the pairs' sampling and scoring belong to DPO's budget
            spent = {k: spent.get(k, 0.0) + times["pairs"][k] for k in ("cpu_s", "wall_s")}
        cpu = f"{spent['cpu_s']:.0f} / {spent['wall_s']:.0f}" if spent else "-"
        rows.append([name, win_rate_ci(c), f"{c['mean_aligned']:.3f}", win_rate_ci(p), str(s.budget()), cpu,
                     str(c["n"])])
    return {"title": "Flow model (pkg://toyworld/flow): win rate over the base on held-out seeds (mmalign eval images)",
            "columns": ["model", "win rate, exact checker [95% CI]", "checker mean",
                        "win rate, learned scorer [95% CI]", "sampled images", "CPU s / wall s", "samples"], "rows": rows,
            "note": "Rewards and pairs came from the learned scorer; the win rate that counts is under the exact "
                    "checker. Ties count 1/2; the interval is a bootstrap over prompts. CPU time = this process's "
                    "(all threads) for the method's sampling and training, without the evaluation."}


def flow_targets(out: Path) -> dict[str, dict[str, Any]]:
    """Issue 16's bar per online method: exact-checker win rate >= 0.65 with the interval's low end > 0.5."""
    found = {}
    for method in ("grpo", "nft", "dpo"):
        r = load_result(out / "eval" / f"{method}.json")
        if r is not None:
            c = r["scorers"]["score_toyworld_checker"]
            found[f"{NAMES[method]} win rate >= 0.65, CI low > 0.5"] = {
                "value": win_rate_ci(c), "met": c["win_rate"] >= 0.65 and c["ci"][0] > 0.5}
    return found


def _timed(out: Path, phase: str, steps: list[Step]) -> None:
    """Run `steps`, adding this process's CPU time (all threads) and the wall time to out/times/<phase>.json
    (summed over reruns, so a resumed phase counts all it spent; one file per phase, so phases may run
    in parallel processes)."""
    wall, cpu = time.monotonic(), time.process_time()
    for step in steps:
        _run(step)
    path = out / "times" / f"{phase}.json"
    spent = load_result(path) or {"cpu_s": 0.0, "wall_s": 0.0}
    spent = {"cpu_s": round(spent["cpu_s"] + time.process_time() - cpu, 1),
             "wall_s": round(spent["wall_s"] + time.monotonic() - wall, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spent) + "\n")


def run_flow_demo(out: str | Path = "runs/demo_flow", quick: bool = False, settings: FlowDemoSettings | None = None,
                  phases: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the `phases` (default all of PHASES, in order; skipping finished steps), write `out/results.json`,
    print the table; returns the results. "dpo" needs "pairs" done, "eval" every method; the methods
    may run in parallel processes (`phases=["grpo"]` in one, `["nft"]` in another)."""
    from mmalign.errors import ConfigError

    missing = [c for c in CONFIGS.values() if not Path(c).is_file()]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: run `mmalign demo --flow` from the repository root")
    unknown = sorted(set(phases or PHASES) - set(PHASES))
    if unknown:
        raise ConfigError(f"flow demo phases {unknown} unknown: choose from {', '.join(PHASES)}")
    out, s = Path(out), settings or (QUICK_FLOW if quick else FlowDemoSettings())
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=2) + "\n")
    print(f"[mmalign] flow demo -> {out}; {s.budget()} sampled images per method; settings {json.dumps(asdict(s))}",
          flush=True)
    for phase, steps in flow_steps(out, s).items():
        if phase in (phases or PHASES):
            _timed(out, phase, steps)
    times = {p: t for p in PHASES if (t := load_result(out / "times" / f"{p}.json")) is not None}
    table = flow_table(out, s, times)
    results = {"tables": [table], "targets": flow_targets(out), "seconds": times, "settings": asdict(s)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + format_table(table) + "\n")
    for name, t in results["targets"].items():
        print(f"target {name}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")
    return results
