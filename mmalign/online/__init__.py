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

Processes: in this version EVERY process samples the same whole round (same seeds, same
weights), so all build identical records, and the round's sampler splits them across processes;
only the main process writes the round's jsonl and meta files (media files are written by every
process, atomically, with identical bytes).

The source never imports the trainer and never writes trainer attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.errors import DataError
from mmalign.families import Family, get_family
from mmalign.nn import eval_mode
from mmalign.online.rounds import (load_round, load_scorers, plan_rows, record_kind, save_round, score_round,
                                   select_records, with_root)
from mmalign.online.samplers import SampleJob, SamplerContext, sample_kind, sampler_for
from mmalign.seeds import ROW, mix_seed
from mmalign.types import Round

ROUND_SEED_OFFSET = 29  # the round's micro-batch stream (apart from SPO's rounds and the prompt stream)


class OnlineSource:
    """The trainer's data source for `online:` runs (see the module docstring).

    kind: "ranked" for online.strategy ranked, "rewarded" for rewards, else "pair"."""

    def __init__(self, cfg: Any, likelihood: Any, processor: Any = None, family: Family | None = None) -> None:
        from mmalign.data.preference import StreamSampler
        from mmalign.modalities.step_sampler import load_prompts, run_fingerprint

        self.cfg, self.settings = cfg, cfg.online
        self.family = family or get_family(cfg.modality)
        self.sampler = sampler_for(self.family)
        self.context = SamplerContext(likelihood, processor, dict(self.settings.sampling),
                                      self.settings.sample_batch_size, cfg.data.chat_template)
        self.kind = record_kind(self.settings.strategy)
        self.prompts = load_prompts(self.settings, "online")
        self.prompt_stream = StreamSampler(len(self.prompts), cfg.train.seed)
        self.scorers: list[tuple[Any, Any]] | None = None  # loaded on the first round (on its device)
        self.fingerprint = run_fingerprint(cfg)
        self.round, self.current = -1, None

    def describe(self) -> str:
        """What the trainer's start-up line says instead of "N examples from FILE"."""
        s = self.settings
        return (f"online {s.strategy} rounds of {s.round_steps} steps ({s.prompts_per_round} prompts x "
                f"{s.group_size} samples from the policy, scored by {', '.join(s.scorer)})")

    def round_folder(self, r: int) -> Path:
        return Path(self.cfg.train.output_dir) / "rounds" / f"round_{r:05d}"

    def round_prompts(self, r: int) -> list[str]:
        """The prompts of round r: entries [r * P, (r + 1) * P) of the seeded prompt stream."""
        p = self.settings.prompts_per_round
        return [self.prompts[i] for i in self.prompt_stream.indices(r * p, p)]

    def records_for_step(self, step: int, model: torch.nn.Module, accelerator: Any) -> Round:
        """The `Round` of optimizer step `step`: read back (resume) or sampled with `model` (the
        unwrapped policy) when it begins, the same object until it ends. Its sampler starts its
        seeded stream at the round's first micro-step."""
        from mmalign.modalities.step_sampler import RoundSampler

        s, t = self.settings, self.cfg.train
        r = step // s.round_steps
        if r != self.round or self.current is None:
            records = self.load_or_sample(r, model, accelerator)
            seed = mix_seed(t.seed, r, strides=(ROW, 1), offset=ROUND_SEED_OFFSET, wrap=False)
            self.current = Round(records, RoundSampler(len(records), seed, r * s.round_steps * t.grad_accum))
            self.round = r
        return self.current

    def load_or_sample(self, r: int, model: torch.nn.Module, accelerator: Any) -> list[dict[str, Any]]:
        """Round r's records: read back from its folder (`online.save_rounds`, same fingerprint), else
        sampled, scored and selected, reported on the main process and saved there."""
        s, folder = self.settings, self.round_folder(r)
        records = load_round(folder, self.fingerprint) if s.save_rounds else None
        if records is not None:
            return records
        rows = self.sample(r, model, accelerator)
        records, selection = select_records(rows, s)
        if accelerator.is_main_process:
            print(f"[mmalign] online round {r}: {selection.summary()}")
        if not records:
            raise DataError(f"online round {r} kept no records ({selection.summary()}): raise online.group_size, "
                            "lower online.margin or use another scorer")
        if s.save_rounds and accelerator.is_main_process:
            save_round(folder, rows, records, self.fingerprint,
                       {"round": r, "counts": dict(selection.counts), "summary": selection.summary()})
        return with_root(records, folder)

    def sample(self, r: int, model: torch.nn.Module, accelerator: Any) -> list[dict[str, Any]]:
        """Round r's scored rows: the policy (eval mode, no grad) samples every row's output with
        the row's seed; then every `online.scorer` scores them (combined into `score`)."""
        s, folder = self.settings, self.round_folder(r)
        rows = plan_rows(self.round_prompts(r), s.group_size, self.cfg.train.seed, r)
        job = SampleJob([row["prompt"] for row in rows], [row["seed"] for row in rows],
                        [row["id"] for row in rows], folder)
        with eval_mode(model), torch.no_grad(), accelerator.autocast():
            outputs = self.sampler(self.context, model, job)
        rows = [{**row, **out} for row, out in zip(rows, outputs, strict=True)]
        if self.scorers is None:
            device = str(accelerator.device) if s.scorer_device == "auto" else s.scorer_device
            self.scorers = load_scorers(list(s.scorer), sample_kind(self.family), device)
        score_round(rows, self.scorers, s.znorm, folder)
        return rows


def build_online_source(cfg: Any, likelihood: Any, processor: Any = None) -> OnlineSource:
    """The `OnlineSource` of `cfg.online` for the family `cfg.modality` (`build_source`)."""
    return OnlineSource(cfg, likelihood, processor)
