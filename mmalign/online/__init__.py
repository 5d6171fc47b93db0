"""Online preference rounds for any family whose descriptor can sample (`online:` config section;
issue 15, METHODS.md D.1 TRL OnlineDPO, D.2 RLAIF-V rounds, C.4 online group DPO).

`OnlineSource` is a `mmalign.types.DataSource`: optimizer step s trains on round
r = s // online.round_steps. When a round begins, the CURRENT policy (eval mode, adapters on, no
grad) samples `group_size` outputs for each of the next `prompts_per_round` prompts of a seeded
prompt stream through the family's sampler (`samplers.sampler_for`: by `Family.sample`), the
`online.scorer` specs score them (`mmalign.scoring`), and `online.strategy` turns each prompt's
group into records (`builders/scores.py`). A round is a function of (train.seed, r, the weights
at its first step); with `online.save_rounds` it is kept under output_dir/rounds/round_NNNNN/
(samples, scores, records, media, a fingerprint of the config) and a resumed run reads it back
instead of sampling it again.

Processes: each process samples its share of the round's rows (global batches of
`online.sample_batch_size` rows, batch b on process b mod W: `shards.sample_shards`; a row's
output depends on its seed and the weights only), writes the media it sampled, and the outputs
are gathered on every process (`gather_object`). Every process then scores the WHOLE round
(identical inputs, so identical scores, z-normalisation included) and builds the same records;
only the main process writes the round's jsonl and meta files. The output_dir is shared by the
processes (as for checkpoints).

Mixing (`data.train` + `online.offline_per_round`, `mixing.py`) appends seeded offline records to
each round. Guards (`guards.py`): the round's reward statistics and the held-out
`online.eval_scorer` reward travel with the `Round` (`Round.metrics`); the trainer adds the KL
estimate and refreshes the reference (`online.reference_update`) at the round's first step.

The source never imports the trainer and never writes trainer attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.errors import DataError
from mmalign.families import Family, get_family
from mmalign.nn import eval_mode
from mmalign.online.guards import eval_rows, load_eval_prompts, mean_score, round_metrics
from mmalign.online.mixing import OfflineMix
from mmalign.online.rounds import (load_round, load_scorers, plan_rows, record_kind, round_meta, save_round,
                                   score_round, select_records, with_root)
from mmalign.online.samplers import SampleJob, SamplerContext, online_prompts, sample_kind, sampler_for
from mmalign.online.shards import sample_shards
from mmalign.io import write_jsonl_atomic
from mmalign.seeds import ROW, mix_seed
from mmalign.types import Round

ROUND_SEED_OFFSET = 29  # the round's micro-batch stream (apart from SPO's rounds and the prompt stream)


class OnlineSource:
    """The trainer's data source for `online:` runs (see the module docstring).

    kind: "ranked" for online.strategy ranked, "rewarded" for rewards, else "pair"."""

    def __init__(self, cfg: Any, likelihood: Any, processor: Any = None, family: Family | None = None) -> None:
        from mmalign.data.preference import StreamSampler
        from mmalign.modalities.step_sampler import run_fingerprint

        self.cfg, self.settings = cfg, cfg.online
        self.family = family or get_family(cfg.modality)
        self.sampler = sampler_for(self.family)
        self.context = SamplerContext(likelihood, processor, dict(self.settings.sampling),
                                      self.settings.sample_batch_size, cfg.data.chat_template, cfg.model.path)
        self.kind = record_kind(self.settings.strategy)
        self.prompts, self.fields = online_prompts(self.family, self.settings)  # fields: a VLM prompt's images
        self.prompt_stream = StreamSampler(len(self.prompts), cfg.train.seed)
        self.scorers: list[tuple[Any, Any]] | None = None  # loaded on the first round (on its device)
        self.offline = OfflineMix(cfg, self.kind) if self.settings.offline_per_round else None
        self.eval_prompts, self.eval_fields = load_eval_prompts(self.settings, self.family)
        self.eval_scorers: list[tuple[Any, Any]] | None = None
        self.fingerprint = run_fingerprint(cfg)
        self.round, self.current = -1, None

    def describe(self) -> str:
        """What the trainer's start-up line says instead of "N examples from FILE"."""
        s = self.settings
        return (f"online {s.strategy} rounds of {s.round_steps} steps ({s.prompts_per_round} prompts x "
                f"{s.group_size} samples from the policy, scored by {', '.join(s.scorer)})"
                + (f" + {s.offline_per_round} records of data.train a round" if s.offline_per_round else ""))

    def round_folder(self, r: int) -> Path:
        return Path(self.cfg.train.output_dir) / "rounds" / f"round_{r:05d}"

    def round_prompts(self, r: int) -> list[str]:
        """The prompts of round r: entries [r * P, (r + 1) * P) of the seeded prompt stream."""
        return [self.prompts[i] for i in self.round_indices(r)]

    def round_indices(self, r: int) -> list[int]:
        p = self.settings.prompts_per_round
        return list(self.prompt_stream.indices(r * p, p))

    def records_for_step(self, step: int, model: torch.nn.Module, accelerator: Any) -> Round:
        """The `Round` of optimizer step `step`: read back (resume) or sampled with `model` (the
        unwrapped policy) when it begins, the same object until it ends. Its sampler starts its
        seeded stream at the round's first micro-step."""
        from mmalign.modalities.step_sampler import RoundSampler

        s, t = self.settings, self.cfg.train
        r = step // s.round_steps
        if r != self.round or self.current is None:
            records, metrics = self.load_or_sample(r, model, accelerator)
            if self.offline is not None:  # online records first, then the round's offline draw
                records = records + self.offline.records_of(r)
            seed = mix_seed(t.seed, r, strides=(ROW, 1), offset=ROUND_SEED_OFFSET, wrap=False)
            self.current = Round(records, RoundSampler(len(records), seed, r * s.round_steps * t.grad_accum),
                                 r * s.round_steps, metrics)
            self.round = r
        return self.current

    def load_or_sample(self, r: int, model: torch.nn.Module,
                       accelerator: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Round r's online records and guard metrics: read back from its folder (`online.save_rounds`,
        same fingerprint; a folder without meta.json, left by a kill while sampling, is sampled
        again), else sampled, scored and selected, reported on the main process and saved there."""
        s, folder = self.settings, self.round_folder(r)
        records = load_round(folder, self.fingerprint) if s.save_rounds else None
        if records is not None:
            return records, round_meta(folder).get("metrics", {})
        rows = self.sample(r, model, accelerator)
        records, selection = select_records(rows, s, self.cfg.loss.adv_clip_max, self.cfg.grpo.global_std)
        metrics = {"online/round": float(r), **round_metrics(rows, len(records))}
        if self.eval_prompts:
            metrics["online/eval_reward_mean"] = self.evaluate(folder / "eval", model, accelerator)
        if accelerator.is_main_process:
            print(f"[mmalign] online round {r}: {selection.summary()}")
        if not records:
            raise DataError(f"online round {r} kept no records ({selection.summary()}): raise online.group_size, "
                            "lower online.margin or use another scorer")
        if s.save_rounds and accelerator.is_main_process:
            offline = {"offline_rows": self.offline.rows(r)} if self.offline is not None else {}
            save_round(folder, rows, records, self.fingerprint,
                       {"round": r, "counts": dict(selection.counts), "summary": selection.summary(),
                        "metrics": metrics, **offline})
        return with_root(records, folder), metrics

    def sample(self, r: int, model: torch.nn.Module, accelerator: Any) -> list[dict[str, Any]]:
        """Round r's scored rows: the policy (eval mode, no grad) samples every row's output with
        the row's seed, each process its share (`sample_shards`), every process then holding all
        outputs; then every `online.scorer` scores them (combined into `score`) on every process."""
        s, folder = self.settings, self.round_folder(r)
        fields = [self.fields[i] for i in self.round_indices(r)]  # the prompts' own fields (VLM images)
        rows = plan_rows(self.round_prompts(r), s.group_size, self.cfg.train.seed, r, fields)
        job = SampleJob([row["prompt"] for row in rows], [row["seed"] for row in rows],
                        [row["id"] for row in rows], folder, [f for f in fields for _ in range(s.group_size)])
        with eval_mode(model), torch.no_grad(), accelerator.autocast():
            outputs = sample_shards(self.sampler, self.context, model, job, accelerator)
        rows = [{**row, **out} for row, out in zip(rows, outputs, strict=True)]
        if self.scorers is None:
            device = str(accelerator.device) if s.scorer_device == "auto" else s.scorer_device
            self.scorers = load_scorers(list(s.scorer), sample_kind(self.family), device)
        score_round(rows, self.scorers, s.znorm, folder)
        return rows

    def evaluate(self, folder: Path, model: torch.nn.Module, accelerator: Any) -> float:
        """Mean `online.eval_scorer` score of the held-out prompts sampled now by `model` with their
        fixed seeds (`guards.eval_rows`), kept in folder/samples.jsonl (main process)."""
        s = self.settings
        rows = eval_rows(self.eval_prompts, s.eval_samples, self.cfg.train.seed, self.eval_fields)
        job = SampleJob([row["prompt"] for row in rows], [row["seed"] for row in rows], [row["id"] for row in rows],
                        folder, [f for f in self.eval_fields for _ in range(s.eval_samples)])
        with eval_mode(model), torch.no_grad(), accelerator.autocast():
            outputs = sample_shards(self.sampler, self.context, model, job, accelerator)
        rows = [{**row, **out} for row, out in zip(rows, outputs, strict=True)]
        if self.eval_scorers is None:
            device = str(accelerator.device) if s.scorer_device == "auto" else s.scorer_device
            self.eval_scorers = load_scorers(list(s.eval_scorer), sample_kind(self.family), device,
                                             "online.eval_scorer")
        score_round(rows, self.eval_scorers, False, folder)
        if s.save_rounds and accelerator.is_main_process:
            write_jsonl_atomic(folder / "samples.jsonl", rows, ensure_ascii=False)
        return mean_score(rows)


def build_online_source(cfg: Any, likelihood: Any, processor: Any = None) -> OnlineSource:
    """The `OnlineSource` of `cfg.online` for the family `cfg.modality` (`build_source`)."""
    return OnlineSource(cfg, likelihood, processor)
