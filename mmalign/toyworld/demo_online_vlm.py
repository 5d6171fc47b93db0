"""The online VLM rows of `mmalign demo` (issue 15 item 5b): iterative online DPO for hallucination
against the offline pairs at the same number of pairs, and against SFT on the online chosen answers.

    online      `mmalign train configs/tiny/toyworld_llava_online_dpo.yaml` (METHODS.md D.2 / D.3):
                every `round_steps` steps the CURRENT captioner samples `group_size` captions of each
                of `prompts_per_round` training scenes, each scored against the scene's annotation
                objects, score = -|hallucinated| + 0.5 recall (`annotations=` scorer); least vs most
                hallucinated -> a DPO + SFT (RPO) pair. N = the pairs all rounds kept.
    offline@N   DPO + SFT (the offline row's config) on N pairs drawn uniformly from the offline pair
                files (inject + corrupt + existence; `mmalign build-pairs take --n N`).
    SFT@online  SFT (`loss.name=sft`) on the N online pairs' chosen answers: the same answers, no
                rejected ones (imitation only; rejection-sampling fine-tuning).

Loss, beta, lr, batch and optimizer steps are the online run's for all three, so the rows differ
in their pairs only. Each model is exported and evaluated by the offline rows' commands (CHAIR on
the held-out test scenes, POPE adversarial). Intervals: a paired bootstrap over test scenes
(`paired_bootstrap`): scenes drawn with replacement, the same draw for both models, 95 % percentile
interval of the difference; CHAIR_i = sum hallucinated / sum mentions over the drawn scenes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mmalign.toyworld.demo_online import load_result

ONLINE_VLM_CONFIG = "configs/tiny/toyworld_llava_online_dpo.yaml"
MODELS = {"online": "online DPO + SFT (annotation score)", "offline_n": "offline DPO + SFT, same N pairs",
          "sft_online": "SFT on the online chosen answers"}


@dataclass(frozen=True)
class OnlineVlmSettings:
    """The online rows' sizes (the online run's config values in the full demo)."""

    prompts_per_round: int = 16
    group_size: int = 4
    round_steps: int = 10
    steps: int = 100
    batch: int = 16
    max_new_tokens: int = 32


QUICK_ONLINE = OnlineVlmSettings(prompts_per_round=4, group_size=4, round_steps=1, steps=2, batch=2)


def online_train_steps(out: Path, s: Any, o: OnlineVlmSettings) -> list[Any]:
    """Phase 1: the online run, its pairs pooled into pairs/online_rounds.jsonl."""
    from mmalign.toyworld.demo import Step, _train

    d = out / "vlm"
    overrides = {"online.prompts": d / "scenes" / "train.jsonl", "online.prompts_per_round": o.prompts_per_round,
                 "online.group_size": o.group_size, "online.round_steps": o.round_steps,
                 "online.sampling.max_new_tokens": o.max_new_tokens, "train.max_steps": o.steps,
                 "train.batch_size": o.batch, "train.seed": s.seed, "train.output_dir": d / "online"}
    rounds = d / "pairs" / "online_rounds.jsonl"
    return [_train(ONLINE_VLM_CONFIG, d / "online", overrides),
            Step("mmalign", ["build-pairs", "take", str(d / "online"), "--out", str(rounds)], rounds)]


def comparison_steps(out: Path, s: Any, o: OnlineVlmSettings, n_pairs: int) -> list[Any]:
    """Phase 2 (N known): offline@N pairs, the two comparison runs, export + CHAIR / POPE of all three."""
    from mmalign.toyworld.demo import VLM_CONFIG, Step, _train

    d, pairs = out / "vlm", out / "vlm" / "pairs"
    same_n = pairs / f"offline_n{n_pairs}.jsonl"
    steps = [Step("mmalign", ["build-pairs", "take", *(str(pairs / f"{k}.jsonl") for k in ("inject", "corrupt",
                                                                                          "existence")),
                              "--n", str(n_pairs), "--seed", str(s.seed), "--out", str(same_n)], same_n)]
    common = {"train.max_steps": o.steps, "train.batch_size": o.batch, "train.seed": s.seed,
              "data.allow_outside_paths": "true"}
    runs = {"offline_n": {"data.train": same_n}, "sft_online": {"data.train": pairs / "online_rounds.jsonl",
                                                                 "loss.name": "sft"}}
    for name, extra in runs.items():
        steps.append(_train(VLM_CONFIG, d / name, {**common, **extra, "train.output_dir": d / name}))
    for name in MODELS:
        steps.append(Step("mmalign", ["export", str(d / name), "--to", str(d / f"{name}_model"), "--format", "merged"],
                          d / f"{name}_model"))
        steps += eval_steps(out, s, name, str(d / f"{name}_model"))
    return steps


def eval_steps(out: Path, s: Any, name: str, model: str) -> list[Any]:
    """CHAIR and POPE of `model` on the test scenes: the commands `demo.vlm_steps` runs per model."""
    from mmalign.toyworld.demo import VOCAB, Step, _shipped
    from mmalign.toyworld.world import PROMPT

    d, scenes = out / "vlm", out / "vlm" / "scenes"
    where = ["--model", model, "--images", str(scenes / "images"), "--annotations", str(scenes / "instances_test.json")]
    return [Step("mmalign", ["eval", "chair", *where, "--captions", str(scenes / "captions_test.json"), "--vocabulary",
                             _shipped(VOCAB), "--prompt", PROMPT, "--max-new-tokens", "32", "--batch-size", "64",
                             "--out", str(d / "eval" / f"{name}_chair.json")], d / "eval" / f"{name}_chair.json"),
            Step("mmalign", ["eval", "pope", *where, "--setting", "adversarial", "--per-image", "1", "--num-images",
                             str(s.pope_images), "--suffix", "", "--max-new-tokens", "4", "--batch-size", "64",
                             "--out", str(d / "eval" / f"{name}_pope.json")], d / "eval" / f"{name}_pope.json")]


def count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def run_online_vlm(out: Path, s: Any, o: OnlineVlmSettings, run: Callable[[Any], None]) -> dict[str, float]:
    """Run both phases (finished steps skipped); returns wall and CPU seconds of this part."""
    wall, cpu = time.monotonic(), time.process_time()
    for step in online_train_steps(out, s, o):
        run(step)
    n_pairs = count_rows(out / "vlm" / "pairs" / "online_rounds.jsonl")
    for step in comparison_steps(out, s, o, n_pairs):
        run(step)
    return {"wall": round(time.monotonic() - wall, 1), "cpu": round(time.process_time() - cpu, 1)}


# -- results ---------------------------------------------------------------------------------
def chair_counts(result: dict[str, Any]) -> dict[Any, tuple[int, int, int, int, int]]:
    """Per test scene: (hallucinated mentions, mentions, hallucinated caption 0/1, gt objects
    mentioned, gt objects) from an `mmalign eval chair` result's per-caption records."""
    found = {}
    for c in result["captions"]:
        mentioned, truth = c["mentioned"], set(c["ground_truth"])
        found[c["image_id"]] = (len(c["hallucinated"]), len(mentioned), int(bool(c["hallucinated"])),
                                len(truth & set(mentioned)), len(truth))
    return found


def chair_from(sums: Sequence[float], n: int) -> dict[str, float]:
    """CHAIR_i, CHAIR_s, recall of the summed per-scene counts of n scenes (ratios of sums, as
    `evaluation.chair.chair`)."""
    h, m, hs, g_hit, g = sums
    return {"CHAIR_i": h / m if m else 0.0, "CHAIR_s": hs / n if n else 0.0, "recall": g_hit / g if g else 0.0}


def pope_counts(result: dict[str, Any]) -> dict[Any, tuple[int, int, int, int]]:
    """Per test image: (tp, fp, tn, fn) of an `mmalign eval pope` result's adversarial answers."""
    found: dict[Any, list[int]] = {}
    for a in result["sets"]["adversarial"]["answers"]:
        p, g = a["pred"].strip().lower(), str(a["label"]).strip().lower()
        cell = found.setdefault(a["image"], [0, 0, 0, 0])
        cell[(p == "yes" and g == "no") * 1 + (p == "no" and g == "no") * 2 + (p == "no" and g == "yes") * 3] += 1
    return {k: tuple(v) for k, v in found.items()}


def pope_from(sums: Sequence[float], n: int) -> dict[str, float]:
    """POPE F1 (positive = yes) of summed per-image (tp, fp, tn, fn), as `evaluation.pope.pope_metrics`."""
    tp, fp, _, fn = sums
    precision, recall = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
    return {"POPE_F1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def paired_bootstrap(a: dict[Any, tuple[int, ...]], b: dict[Any, tuple[int, ...]],
                     metrics: Callable[[Sequence[float], int], dict[str, float]], n_boot: int, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """{metric: (m(b) - m(a), low, high)} over the n units (scenes) both hold, m = metrics(summed
    unit counts, n): each of n_boot draws takes n units with replacement (numpy default_rng(seed)),
    the same draw for a and b; the interval is the percentile interval of the drawn differences."""
    import numpy as np

    keys = sorted(set(a) & set(b), key=str)
    xa, xb = (np.array([x[k] for k in keys], dtype=np.int64) for x in (a, b))
    n = len(keys)
    ma, mb = metrics(xa.sum(0).tolist(), n), metrics(xb.sum(0).tolist(), n)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    sa, sb = xa[draws].sum(1).tolist(), xb[draws].sum(1).tolist()
    alpha, found = (1 - confidence) / 2, {}
    for k in ma:
        diffs = [metrics(y, n)[k] - metrics(x, n)[k] for x, y in zip(sa, sb)]
        found[k] = (mb[k] - ma[k], float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha)))
    return found


def _delta(v: tuple[float, float, float]) -> str:
    return f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def verdict(name: str, d: tuple[float, float, float]) -> str:
    """Which model hallucinates less, from CHAIR_i of online - `name` (difference, low, high)."""
    if d[2] < 0:
        return "online lower"
    if d[1] > 0:
        return f"{name} lower"
    return "not resolved"


def online_vlm_tables(out: Path, n_boot: int, seed: int = 0) -> list[dict[str, Any]]:
    """The rows table (each model's CHAIR / POPE) and the paired differences online - other with
    95 % scene-bootstrap intervals; models whose evaluations are missing are left out."""
    d = out / "vlm" / "eval"
    rounds = out / "vlm" / "pairs" / "online_rounds.jsonl"
    n_pairs = count_rows(rounds) if rounds.exists() else 0
    evals = {m: (load_result(d / f"{m}_chair.json"), load_result(d / f"{m}_pope.json")) for m in ("base", *MODELS)}
    evals = {m: e for m, e in evals.items() if None not in e}
    labels = {"base": "base (web-caption bias)", **MODELS}
    rows = []
    for m, (c, p) in evals.items():
        pope = p["sets"]["adversarial"]
        rows.append([labels[m], "-" if m == "base" else str(n_pairs), f"{c['CHAIR_s']:.3f}", f"{c['CHAIR_i']:.3f}",
                     f"{c['recall']:.3f}", f"{pope['f1']:.3f}", f"{pope['accuracy']:.3f}", f"{pope['yes_ratio']:.3f}"])
    diffs = []
    for other in ("offline_n", "sft_online", "base"):
        if "online" not in evals or other not in evals:
            continue
        (ca, pa), (cb, pb) = evals[other], evals["online"]
        ch = paired_bootstrap(chair_counts(ca), chair_counts(cb), chair_from, n_boot, seed)
        po = paired_bootstrap(pope_counts(pa), pope_counts(pb), pope_from, n_boot, seed)
        diffs.append([f"online - {labels[other]}", _delta(ch["CHAIR_i"]), _delta(ch["CHAIR_s"]),
                      _delta(ch["recall"]), _delta(po["POPE_F1"]), verdict(other, ch["CHAIR_i"])])
    note = ("All three trained with the online run's loss (DPO + SFT, beta 0.1; SFT row: loss.name=sft), lr, "
            "batch and steps; N = pairs the online rounds kept. Same held-out test scenes and POPE questions as "
            "the offline rows.")
    return [{"title": "VLM side, online: iterative online DPO vs offline pairs and imitation at the same N pairs",
             "columns": ["model", "pairs", "CHAIR_s", "CHAIR_i", "recall", "POPE F1", "POPE acc", "POPE yes-ratio"],
             "rows": rows, "note": note},
            {"title": "VLM side, online: paired differences (online - other), 95% bootstrap over test scenes",
             "columns": ["comparison", "dCHAIR_i", "dCHAIR_s", "drecall", "dPOPE F1", "CHAIR_i"], "rows": diffs,
             "note": "A difference's interval below 0 (CHAIR) means online hallucinates less; the scenes (and "
                     "POPE images) are drawn with replacement, the same draw for both models."}]


def online_vlm_rows(out: Path, s: Any, quick: bool, sides: Sequence[str],
                    times: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo hook: run the online VLM rows when the VLM side ran (their wall and CPU seconds
    into `times`), return their two tables (the demo prints them and writes them to results.json)."""
    from mmalign.toyworld.demo import _run

    if "vlm" not in sides:
        return []
    spent = run_online_vlm(Path(out), s, QUICK_ONLINE if quick else OnlineVlmSettings(), _run)
    times["vlm online"], times["vlm online cpu"] = spent["wall"], spent["cpu"]
    print(f"[mmalign] demo: online VLM rows took {spent['wall']:.0f}s wall, {spent['cpu']:.0f}s CPU of this "
          "process", flush=True)
    return online_vlm_tables(Path(out), s.n_boot, s.seed)
