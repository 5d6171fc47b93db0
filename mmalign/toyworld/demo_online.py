"""The online rows of `mmalign demo` (issue 15 item 5): online DPO against the offline rows at the
same budget, evaluated exactly as the offline rows (mmalign/toyworld/demo.py).

Image side (5a): `mmalign train configs/tiny/toyworld_sd_online_dpo.yaml` (`online:` rounds,
METHODS.md C.4 / D.1): every `online_round_steps` optimizer steps the CURRENT UNet samples
`online_group_size` images for each of the next `online_prompts_per_round` training captions
(guidance and sampling steps of the offline pairs), the LEARNED scorer ranks each group, best vs
worst becomes a pair. The sample budget is the offline row's: offline samples

    B_off = |TRAIN_PROMPTS| * groups * group_size                  images once, from the base;

online samples, over R = ceil(image_steps / online_round_steps) rounds,

    B_on = R * online_prompts_per_round * online_group_size        images from the current policy,

and `sample_budgets` refuses settings with B_on != B_off. Loss, beta, lr, batch and optimizer steps
are the offline row's. The online model then samples the same held-out seeds and prompts, is
scored by the exact checker and compared to the base (its row in the image table) and to the
offline Diffusion-DPO model directly (`mmalign eval images --base dpo --aligned online`: the
paired win rate of online over offline with its prompt-bootstrap interval).

GRPO on the UNet (issue 16 item 4): `mmalign train configs/tiny/toyworld_sd_grpo.yaml` (modality
sd_grpo, METHODS.md C.1 with the DDIM eta > 0 step likelihood): R = B_off / (online_prompts_per_round
* online_group_size) rounds of the current UNet's DDIM trajectories (`grpo_num_steps` steps), the
learned scorer's reward, group advantages, clipped ratio and KL to the frozen base on the first 90 %
of each trajectory's steps (`grpo_plan`). So GRPO samples B_off final images, as offline and online
DPO do; it is evaluated like them (win rate over the base, paired win rate over offline DPO).

VLM side (5b): `ONLINE_BUILDERS["vlm"]`, `online_vlm_table` are the place for its rows (not here yet).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from mmalign.toyworld.world import TRAIN_PROMPTS

ONLINE_IMAGE_CONFIG = "configs/tiny/toyworld_sd_online_dpo.yaml"
ONLINE_LABEL = "online DPO (learned-scorer reward)"
GRPO_CONFIG = "configs/tiny/toyworld_sd_grpo.yaml"
GRPO_LABEL = "GRPO on the UNet (learned-scorer reward)"
GRPO_ETA = 1.0  # DDIM eta of GRPO's trajectories (grpo.noise_level)
GRPO_FRACTION = 0.9  # trained share of each DDIM trajectory: all steps but the last (which has no noise)


def sample_budgets(s: Any) -> tuple[int, int]:
    """(B_off, B_on): images the offline row and the online row sample (module docstring); a
    ValueError when they differ (the comparison is at equal budget or not at all)."""
    offline = len(TRAIN_PROMPTS) * s.groups * s.group_size
    rounds = math.ceil(s.image_steps / s.online_round_steps)
    online = rounds * s.online_prompts_per_round * s.online_group_size
    if online != offline:
        raise ValueError(f"demo settings: online samples {rounds} rounds x {s.online_prompts_per_round} prompts x "
                         f"{s.online_group_size} = {online} images, offline {offline}: make them equal")
    return offline, online


def grpo_plan(s: Any) -> dict[str, int]:
    """GRPO on the UNet at the offline budget: rounds R = B_off / (P * G) with the online row's P
    prompts x G images a round; T = int(grpo_num_steps * GRPO_FRACTION) trained DDIM steps a
    trajectory, so a round holds P * G * T transitions, trained in `grpo_round_steps` optimizer
    steps of P * G * T / grpo_round_steps (a ValueError when that does not divide)."""
    offline, _ = sample_budgets(s)
    per_round = s.online_prompts_per_round * s.online_group_size
    rounds, trained = offline // per_round, int(s.grpo_num_steps * GRPO_FRACTION)
    if rounds * per_round != offline or trained < 1 or per_round * trained % s.grpo_round_steps:
        raise ValueError(f"demo settings: GRPO rounds of {per_round} images x {trained} trained steps do not make "
                         f"the offline {offline} images in steps of grpo_round_steps={s.grpo_round_steps}")
    return {"rounds": rounds, "images": rounds * per_round, "trained_steps": trained,
            "max_steps": rounds * s.grpo_round_steps, "batch": per_round * trained // s.grpo_round_steps}


def _heldout_steps(d: Path, name: str, s: Any) -> list[Any]:
    """Export run d/name, sample + score the held-out seeds and prompts, win rates over the base and
    over the offline Diffusion-DPO model (paired: the same prompts and seeds)."""
    from mmalign.toyworld.demo import CHECKER, SCORER, Step, _sampling

    steps = [Step("mmalign", ["export", str(d / name), "--to", str(d / f"{name}_model"), "--format", "merged"],
                  d / f"{name}_model")]
    prompts = {"seeds": d / "prompts_eval_seeds.txt", "heldout": d / "prompts_eval_heldout.txt"}
    for split, path in prompts.items():
        manifest = d / "eval" / f"{name}_{split}"
        steps.append(Step("mmalign", ["generate", "--model", str(d / f"{name}_model"), "--prompts", str(path), "--out",
                                      str(manifest), "--num-samples", str(s.eval_samples), "--seed", str(s.eval_seed),
                                      *_sampling(s)]))
        steps.append(Step("mmalign", ["score", str(manifest), "--scorer", CHECKER, "--scorer", SCORER,
                                      "--batch-size", "64"]))
    for split in prompts:
        for base, result in (("base", f"{name}_{split}.json"), ("dpo", f"{name}_vs_dpo_{split}.json")):
            steps.append(Step("mmalign", ["eval", "images", "--base", str(d / "eval" / f"{base}_{split}"),
                                          "--aligned", str(d / "eval" / f"{name}_{split}"), "--column",
                                          "score_toyworld_checker", "--column", "score_pickscore", "--n-boot",
                                          str(s.n_boot), "--out", str(d / "eval" / result)], d / "eval" / result))
    return steps


def image_online_steps(out: Path, s: Any) -> list[Any]:
    """Train the online DPO model on the training captions, then `_heldout_steps`."""
    from mmalign.toyworld.demo import _train

    sample_budgets(s)
    d, name = out / "image", "online"
    overrides = {"online.prompts": d / "prompts_eval_seeds.txt",  # the training captions, once each
                 "online.prompts_per_round": s.online_prompts_per_round, "online.group_size": s.online_group_size,
                 "online.round_steps": s.online_round_steps, "online.sampling.num_inference_steps": s.inference_steps,
                 "online.sampling.guidance_scale": f"{s.guidance:g}", "train.max_steps": s.image_steps,
                 "train.batch_size": s.image_batch, "train.seed": s.seed, "train.output_dir": d / name}
    return [_train(ONLINE_IMAGE_CONFIG, d / name, overrides), *_heldout_steps(d, name, s)]


def image_grpo_steps(out: Path, s: Any) -> list[Any]:
    """Train GRPO on the UNet (`GRPO_CONFIG`, modality sd_grpo) at the offline budget (`grpo_plan`),
    reward the learned scorer, guidance the demo's; then `_heldout_steps`."""
    from mmalign.toyworld.demo import _train

    plan, d = grpo_plan(s), out / "image"
    overrides = {"grpo.prompts": d / "prompts_eval_seeds.txt", "grpo.prompts_per_round": s.online_prompts_per_round,
                 "grpo.group_size": s.online_group_size, "grpo.round_steps": s.grpo_round_steps,
                 "grpo.num_steps": s.grpo_num_steps, "grpo.timestep_fraction": GRPO_FRACTION,
                 "grpo.noise_level": GRPO_ETA, "grpo.guidance": float(s.guidance), "train.max_steps": plan["max_steps"],
                 "train.batch_size": plan["batch"], "train.seed": s.seed, "train.output_dir": d / "grpo"}
    return [_train(GRPO_CONFIG, d / "grpo", overrides), *_heldout_steps(d, "grpo", s)]


def image_online_rows(out: Path, s: Any) -> list[Any]:
    """The image side's online rows (`mmalign demo --online`): online DPO, then GRPO on the UNet."""
    return image_online_steps(out, s) + image_grpo_steps(out, s)


ONLINE_BUILDERS: dict[str, Callable[[Path, Any], list[Any]]] = {"image": image_online_rows}


def load_result(path: Path) -> dict[str, Any] | None:
    """The JSON at `path`, or None when that step has not run."""
    return json.loads(path.read_text()) if path.exists() else None


def win_rate_ci(t: dict[str, Any]) -> str:
    """"win rate [CI low, CI high]" of one scorer's `mmalign eval images` result."""
    return f"{t['win_rate']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]"


def online_costs(run_dir: Path, batch: int) -> dict[str, float] | None:
    """What a round costs, from the online run's metrics.jsonl (`examples_per_s` = batch / wall
    time of the step): t_train = the median step time of steps that start no round; a round's
    sampling + scoring (+ KL estimate) t_round = mean over round-start steps of their time - t_train.
    None when the run has no such rows."""
    import statistics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = [(batch / r["examples_per_s"], "online/round" in r) for r in rows if r.get("examples_per_s")]
    plain, starts = [t for t, start in timed if not start], [t for t, start in timed if start]
    if not plain or not starts:
        return None
    step = statistics.median(plain)
    return {"rounds": len(starts), "round_sampling_s": sum(starts) / len(starts) - step, "train_step_s": step}


def paired_rows(out: Path, prefix: str) -> list[list[str]]:
    """Table rows of the paired image evaluations `image/eval/{prefix}_{seeds,heldout}.json` that exist:
    split, checker win rate [CI], checker means base -> aligned, learned-scorer win rate [CI], samples."""
    rows = []
    for split, label in (("seeds", "held-out seeds, training prompts"), ("heldout", "held-out prompts")):
        r = load_result(out / "image" / "eval" / f"{prefix}_{split}.json")
        if r is not None:
            c, p = r["scorers"]["score_toyworld_checker"], r["scorers"].get("score_pickscore")
            rows.append([label, win_rate_ci(c), f"{c['mean_base']:.3f} -> {c['mean_aligned']:.3f}",
                         win_rate_ci(p) if p else "-", str(c["n"])])
    return rows


def online_image_table(out: Path, s: Any) -> dict[str, Any]:
    """Online DPO over offline Diffusion-DPO (paired: same held-out prompts and seeds) per split,
    with the sample budgets and what a round costs (`online_costs`)."""
    rows = paired_rows(out, "online_vs_dpo")
    offline, online = sample_budgets(s)
    rounds = math.ceil(s.image_steps / s.online_round_steps)
    cost = online_costs(out / "image" / "online", s.image_batch)
    spent = ("" if cost is None else
             f" Cost measured on this run: sampling + scoring a round {cost['round_sampling_s']:.1f}s vs training "
             f"its {s.online_round_steps} steps {cost['train_step_s'] * s.online_round_steps:.1f}s "
             f"({cost['train_step_s']:.2f}s a step).")
    return {"title": "Online vs offline Diffusion-DPO at the same sample budget (mmalign eval images --base offline "
                     "--aligned online)",
            "columns": ["evaluation", "win rate of online over offline, exact checker [95% CI]",
                        "checker mean offline -> online", "win rate, learned scorer [95% CI]", "samples"],
            "rows": rows,
            "note": f"Budget: offline samples {offline} images once from the base ({len(TRAIN_PROMPTS)} prompts x "
                    f"{s.groups} groups x {s.group_size}) and trains {s.image_steps} steps on their best-vs-worst "
                    f"pairs; online samples {online} images from the current policy ({rounds} rounds x "
                    f"{s.online_prompts_per_round} prompts x {s.online_group_size}, a round every "
                    f"{s.online_round_steps} steps) and trains the same {s.image_steps} steps. Same loss, beta, lr, "
                    f"batch and reward (the learned scorer); online samples with the policy's Euler sampler, offline "
                    f"with the shipped DDIM, both {s.inference_steps} steps at guidance {s.guidance:g}.{spent}"}


def online_grpo_table(out: Path, s: Any) -> dict[str, Any]:
    """GRPO on the UNet over offline Diffusion-DPO (paired: same held-out prompts and seeds) per split,
    at the offline sample budget (`grpo_plan`)."""
    rows = paired_rows(out, "grpo_vs_dpo")
    offline, plan = sample_budgets(s)[0], grpo_plan(s)
    return {"title": "GRPO on the UNet vs offline Diffusion-DPO at the same sample budget (mmalign eval images "
                     "--base offline --aligned grpo)",
            "columns": ["evaluation", "win rate of GRPO over offline, exact checker [95% CI]",
                        "checker mean offline -> GRPO", "win rate, learned scorer [95% CI]", "samples"],
            "rows": rows,
            "note": f"Budget: offline samples {offline} images once from the base; GRPO samples {plan['images']} "
                    f"DDIM trajectories (eta {GRPO_ETA:g}, {s.grpo_num_steps} steps, guidance {s.guidance:g}) from "
                    f"the current UNet ({plan['rounds']} rounds x {s.online_prompts_per_round} prompts x "
                    f"{s.online_group_size}) and trains their first {plan['trained_steps']} steps in "
                    f"{plan['max_steps']} optimizer steps of {plan['batch']} transitions ({GRPO_CONFIG}: clipped "
                    f"ratio, KL to the frozen base). Same reward (the learned scorer); both evaluated with the "
                    f"shipped DDIM, {s.inference_steps} steps at guidance {s.guidance:g}."}


def online_targets(out: Path) -> dict[str, dict[str, Any]]:
    """The issues' bar for the online rows: win rate over the base >= 0.65 with the 95 % interval
    above 0.5 (exact checker, held-out seeds of the training prompts)."""
    found = {}
    for name, label in (("online", "online image"), ("grpo", "GRPO on the UNet")):
        r = load_result(out / "image" / "eval" / f"{name}_seeds.json")
        if r is not None:
            c = r["scorers"]["score_toyworld_checker"]
            found[f"{label} win rate >= 0.65, CI low > 0.5"] = {"value": win_rate_ci(c),
                                                                 "met": c["win_rate"] >= 0.65 and c["ci"][0] > 0.5}
    return found
