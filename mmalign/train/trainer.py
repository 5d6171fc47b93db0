"""The preference trainer: one loop for every modality and loss.

Per optimizer step: with online data, ask the `DataSource` for the step's records; for each
micro-step, draw the randomness once, score chosen and rejected under the policy and the
reference with that SAME draw, turn the log-likelihoods into per-example losses, backward;
then clip, step, log, evaluate, checkpoint. Processes are coordinated by accelerate (DDP over
NCCL or gloo).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.config import Config, to_dict
from mmalign.data.length_grouping import build_sampler
from mmalign.data.preference import load_run_split, mismatched
from mmalign.errors import ConfigError, NonFiniteLossError
from mmalign.losses_combined import loss_spec_for
from mmalign.online.guards import check_refresh, round_kl
from mmalign.seeds import MICRO, RUN, STEP, mix_seed
from mmalign.train import checkpoint as ckpt
from mmalign.train import sharding
from mmalign.train.image_terms import build_image_terms
from mmalign.train.nft import NFTObjective
from mmalign.train.metrics import Meter, MetricsLogger, format_metrics
from mmalign.train.objective import RunningMean, preference_losses
from mmalign.train.optim import build_optimizer, build_scheduler
from mmalign.train.reference import FrozenReference, LoraDisabledReference, PrecomputedReference
from mmalign.train.setup import (apply_lora, check_contracts, make_accelerator, precompute_reference,
                                 resolve_strategy)
from mmalign.train.sharded_checkpoint import is_sharded_checkpoint, save_sharded
from mmalign.types import DataSource, Likelihood, LogpOutput, MicroBatchSampler, PreferenceBatch, Round, Validates


__all__ = ["NonFiniteLossError", "PreferenceTrainer", "step_seed", "train"]

# Config keys a resumed run must share with the checkpoint's run (else a different experiment);
# train.batch_size is compared as the world micro-batch (x processes): a 2 x 2 run resumes as 1 x 4.
RESUME_KEYS = (("data", "train"), ("data", "group_by_length"), ("loss", "name"), ("loss", "beta"),
               ("train", "grad_accum"))


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Every random draw of micro-step `micro` of step `step` on process `rank`."""
    return mix_seed(seed, step, micro, rank, strides=(RUN, STEP, MICRO, 1))


class PreferenceTrainer:
    """Trains `model` on preference data scored by `likelihood` (see the module docstring).

    source: online data (SPO / D3PO rounds, ...), asked for its records before every optimizer
        step; None reads `cfg.data.train`.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, likelihood: Likelihood, processor: Any = None,
                 source: DataSource | None = None) -> None:
        check_contracts(cfg, likelihood, source)
        if cfg.loss.use_weighting:  # WPO: the likelihood also returns log sum p^2 per token
            likelihood.square_mass = True
        self.cfg, self.likelihood, self.processor, self.source = cfg, likelihood, processor, source
        t = cfg.train
        self.accelerator = make_accelerator(t)
        likelihood.to(self.accelerator.device)  # frozen parts it owns (VAE, text encoders)
        self.output_dir = Path(t.output_dir)
        self.loss_spec = loss_spec_for(cfg.loss.name, cfg.loss.weights)  # one loss, or a weighted list (MPO)
        # Records are read by index only (a lazy dataset works too) and never mutated. An online
        # source replaces them (and the sampler) with each round it returns (`train_step`).
        d = cfg.data
        self.records: Sequence[dict[str, Any]]
        self.records, self.kind = ([], source.kind) if source is not None else load_run_split(cfg, "train")
        self.eval_records = load_run_split(cfg, "eval", self.kind)[0] if d.eval else []
        self.ref_values: dict[str, list[list[float]] | None] = {"train": None, "eval": None}
        self.strategy = resolve_strategy(cfg, self.loss_spec, likelihood)
        check_refresh(cfg, self.strategy)
        sharding.check_sharding(cfg)
        shard = sharding.wants_sharding(cfg, self.accelerator)
        self.image_terms = build_image_terms(cfg, likelihood, self.kind, self.strategy, self.records)
        frozen = (FrozenReference(model, likelihood, self.accelerator.autocast, self.accelerator.device)
                  if self.strategy == "frozen" else None)
        model = apply_lora(model, cfg)
        if self.strategy == "precomputed":
            self.ref_values = precompute_reference(self, model)
        if shard:  # FSDP2 in place of accelerate's DDP wrapper: the policy and frozen copy sharded alike
            model = sharding.shard_model(model, self.accelerator.device)
            if frozen is not None:
                sharding.shard_model(frozen.model, self.accelerator.device)
        optimizer = build_optimizer(model.parameters(), cfg.optim)
        if t.compile:  # in place: the module (and its state_dict keys) stay as they are
            model.compile(backend=t.compile)
        self.model, self.optimizer = (model, optimizer) if shard else self.accelerator.prepare(model, optimizer)
        self.model.train()  # from_pretrained returns eval mode: dropout (LoRA's too) would stay off
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.reference = frozen or {
            "lora_disabled": lambda: LoraDisabledReference(self.unwrapped, likelihood, self.accelerator.autocast),
            "precomputed": PrecomputedReference,
            "none": lambda: None,
        }[self.strategy]()
        # DiffusionNFT (loss nft): its own losses and the "old" policy that samples the rounds
        self.nft = (NFTObjective(cfg, likelihood, self.unwrapped, self.reference, self.accelerator.autocast)
                    if self.loss_spec.kind == "rewarded" else None)
        self.loss_state = RunningMean()
        self.sampler: MicroBatchSampler | None = (build_sampler(cfg, likelihood, self.records, self.kind)
                                                  if source is None else None)
        self.round: Round | None = None  # the online round trained on, and its guard values to log
        self.round_values: dict[str, float] = {}
        self.step = 0
        self.skipped_steps = 0  # non-finite steps skipped (train.skip_nonfinite_steps)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # -- one micro-batch ---------------------------------------------------------
    def fetch(self, split: str, indices: list[int]) -> list[dict[str, Any]]:
        """Records `indices` of "train" or "eval", tagged with their row (`_index`) and, with a
        precomputed reference, their cached reference log-likelihoods (`_ref_logps`)."""
        source = self.records if split == "train" else self.eval_records
        refs = self.ref_values[split]
        return [dict(source[i], _index=i, **({"_ref_logps": refs[i]} if refs else {})) for i in indices]

    def _batch(self, records: list[dict[str, Any]]) -> PreferenceBatch:
        return self.likelihood.collate(records, self.kind).to(self.accelerator.device)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(x) if self.accelerator.num_processes > 1 else x

    def _score(self, batch: PreferenceBatch, generator: torch.Generator) -> tuple[LogpOutput, LogpOutput]:
        """Policy and reference outputs on ONE shared draw."""
        draw = self.likelihood.draw(batch, generator).to(self.accelerator.device)
        policy_out = self.likelihood.logps(self.model, batch, draw)
        if self.reference is None:
            return policy_out, LogpOutput(torch.zeros_like(policy_out.logps).detach())
        return policy_out, self.reference.logps(batch, draw)

    def forward(self, records: list[dict[str, Any]], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses and metric values for some records (policy in its current mode)."""
        if self.nft is not None:
            return self.nft.losses(self.model, self.unwrapped, self._batch(records), seed)
        generator = torch.Generator().manual_seed(seed)
        batch = self._batch(records)
        policy_out, ref_out = self._score(batch, generator)
        kl_logratios = None
        if self.kind == "unpaired" and self.cfg.loss.kto_reference_point == "mismatched":
            with torch.no_grad():  # z is detached: no activations kept for these items
                kl_policy, kl_ref = self._score(self._batch(mismatched(records)), generator)
            kl_logratios = kl_policy.logps - kl_ref.logps
        losses, metrics = preference_losses(self.loss_spec, self.cfg.loss, batch, policy_out, ref_out, self._gather,
                                            self.loss_state, kl_logratios)
        if self.image_terms is not None:  # mDPO / Re-Align: the chosen answers again, with modified images
            losses, metrics = self.image_terms.add(records, seed, policy_out, ref_out, losses, metrics, self._score,
                                                   self.accelerator.device)
        return losses, metrics

    def _any_process(self, bad: bool) -> bool:
        """True when `bad` holds on any process (one small all-reduce with several)."""
        flag = torch.tensor([1.0 if bad else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return flag.item() > 0

    def _check_finite(self, loss: torch.Tensor, indices: list[int], micro: int) -> None:
        if self._any_process(not torch.isfinite(loss)):
            last = ckpt.latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.step} (micro-step {micro}, examples "
                f"{indices} on this process); training stopped. Last good checkpoint: "
                f"{last or 'none written yet'}. Lower optim.lr or loss.beta, or check the data.")

    def _check_finite_grads(self, values: dict[str, float]) -> bool:
        """Compute the gradient norm (clipping to optim.max_grad_norm when > 0, then logged as
        `grad_norm`); True when it is finite. A non-finite norm skips the step while
        train.skip_nonfinite_steps allows (gradients zeroed, counted in `skipped_steps`), else
        stops the run naming the step, before `optimizer.step` (so no checkpoint holds NaN)."""
        acc, max_norm, allowed = self.accelerator, self.cfg.optim.max_grad_norm, self.cfg.train.skip_nonfinite_steps
        if max_norm > 0:
            norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
            values["grad_norm"] = float(norm)
        else:
            norm = sharding.grad_norm(self.model.parameters())
        if allowed:
            values["skipped_steps"] = self.skipped_steps
        if acc.scaler is not None or not self._any_process(not torch.isfinite(torch.as_tensor(norm))):
            return True  # fp16: the grad scaler skips overflowing steps itself
        self.skipped_steps += 1
        if self.skipped_steps <= allowed:
            values["skipped_steps"] = self.skipped_steps
            print(f"[mmalign] warning: gradient norm is {float(norm)} at step {self.step}; step skipped "
                  f"({self.skipped_steps} of train.skip_nonfinite_steps={allowed})")
            self.optimizer.zero_grad(set_to_none=True)
            return False
        last = ckpt.latest_checkpoint(self.output_dir)
        raise NonFiniteLossError(
            f"gradient norm is {float(norm)} at step {self.step}; training stopped before the optimizer step"
            f"{f' ({self.skipped_steps - 1} step(s) skipped before)' if allowed else ''}. Last good checkpoint: "
            f"{last or 'none written yet'}. Lower optim.lr or loss.beta, check the data, or allow a few "
            "skipped steps with train.skip_nonfinite_steps.")

    def _check_finite_params(self) -> None:
        """After the optimizer step: every trained weight is finite, else stop naming the step
        (before any checkpoint could keep the weights)."""
        trained = [sharding.local(p.detach()).isfinite().all() for p in self.model.parameters() if p.requires_grad]
        bad = bool(trained) and not bool(torch.stack(trained).all())  # one device sync, not one per tensor
        if self._any_process(bad):
            last = ckpt.latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"weights became NaN or inf in the optimizer step of step {self.step}; training stopped. Last good "
                f"checkpoint: {last or 'none written yet'}. Lower optim.lr, or raise optim.eps.")

    # -- one optimizer step ------------------------------------------------------
    def _take_round(self) -> None:
        """Train on the records (and with the sampler) the online source gives for this step."""
        with self.nft.sampling(self.unwrapped, self.step) if self.nft is not None else nullcontext():
            current = self.source.records_for_step(self.step, self.unwrapped, self.accelerator)
        if current is not self.round:
            self.round = current
            self._start_round(current)
        self.records, self.sampler = current.records, current.sampler

    def _start_round(self, current: Round) -> None:
        """At an online round's first step (not on a resume inside it): its guard values plus the KL
        estimate to the reference on its online records (before any refresh: the reference the
        policy trained against) go to the step's log; then `online.reference_update: every_round`
        loads the policy into the frozen reference."""
        if not current.metrics or current.first_step != self.step:
            return
        values = dict(current.metrics)
        if self.reference is not None:
            online = list(current.records[: int(values["online/kept_records"])])
            values["online/kl"] = round_kl(self.likelihood, self.unwrapped, self.reference, online, self.kind,
                                           self.accelerator.device, self.cfg.train.eval_batch_size,
                                           step_seed(self.cfg.train.seed, self.step, 0, 0), self.accelerator.autocast)
        if self.cfg.online is not None and self.cfg.online.reference_update == "every_round":
            self.reference.refresh(self.unwrapped)
        self.round_values = values
        root = current.records[0].get("_root") if len(current.records) else None
        if root and self.accelerator.is_main_process:  # the round's sampled images, as media
            self.logger.log_media(self.step, Path(root), "online/samples")

    def train_step(self) -> dict[str, float]:
        t, acc = self.cfg.train, self.accelerator
        meter = Meter()
        if self.source is not None:
            self._take_round()
        for micro in range(t.grad_accum):
            micro_step = self.step * t.grad_accum + micro
            seed = step_seed(t.seed, self.step, micro, acc.process_index)
            torch.manual_seed(seed)  # dropout etc.: a pure function of the step, so resume is exact
            idx = self.sampler.micro_batch(micro_step, t.batch_size, acc.process_index, acc.num_processes)
            records = self.fetch("train", idx)
            # Gradients are all-reduced on the last micro-step only.
            sync = acc.no_sync(self.model) if micro < t.grad_accum - 1 else nullcontext()
            with sync:
                # Draws (t, ε, ...) come from (step, example row), not (process, micro-step): a
                # pair gets the same noise however the global batch is split.
                losses, metrics = self.forward(records, step_seed(t.seed, self.step, 0, 0))
                loss = losses.mean()
                self._check_finite(loss, idx, micro)
                acc.backward(loss / t.grad_accum)
            meter.add(metrics)
        values = meter.reduce(acc)
        finite = self._check_finite_grads(values)
        values["lr"] = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
            self._check_finite_params()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        ref_cfg = self.cfg.reference
        if ref_cfg.sync_every and self.step % ref_cfg.sync_every == 0:
            self.reference.sync(self.unwrapped, ref_cfg.sync_alpha)
        values.update(self.round_values)  # an online round began at this step: its guard values
        self.round_values = {}
        return values

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out records (each process scores its share)."""
        acc = self.accelerator
        mine = list(range(acc.process_index, len(self.eval_records), acc.num_processes))
        meter = Meter()
        self.model.eval()
        try:
            for start in range(0, len(mine), self.cfg.train.eval_batch_size):
                records = self.fetch("eval", mine[start : start + self.cfg.train.eval_batch_size])
                meter.add(self.forward(records, step_seed(self.cfg.train.seed, -1, 0, 0))[1])
        finally:
            self.model.train()
        return {f"eval/{k}": v for k, v in meter.reduce(acc).items()}

    # -- checkpoints -------------------------------------------------------------
    def save(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        sharded = sharding.is_sharded(self.model)
        info = {"config": to_dict(self.cfg), "num_processes": acc.num_processes}
        if sharded and self.cfg.train.fsdp_checkpoint == "sharded":  # every process writes its own shards
            save_sharded(self.output_dir, self.step, self.model, self.optimizer, self._trainer_state(), info,
                         self.cfg.train.keep_last)
            return
        # full state: every process gathers it (when sharded), the main one writes it
        weights = sharding.full_trainable_state(self.model) if sharded else None
        optim = sharding.full_optimizer_state(self.model, self.optimizer) if sharded else None
        if acc.is_main_process:
            state = dict(self._trainer_state(), optimizer=optim or self.optimizer.state_dict())
            synced = self.reference.model if self._reference_moves() else None
            ckpt.save_checkpoint(self.output_dir, self.step, self.unwrapped, state, info, synced,
                                 self.cfg.train.keep_last, weights)
        acc.wait_for_everyone()

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights and the optimizer state."""
        state = {"scheduler": self.scheduler.state_dict(), "loss_state": self.loss_state.state_dict(),
                 "skipped_steps": self.skipped_steps}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        if self.nft is not None:
            state["nft_old"] = self.nft.state_dict()
        return state

    def resume(self) -> None:
        """Continue from the newest intact checkpoint (a damaged newest one is named and the one
        before it used); refuse one whose run differs in a RESUME_KEYS value."""
        synced = self.reference.model if self._reference_moves() else None
        found = ckpt.load_latest(self.output_dir, self.unwrapped, synced, self._check_resume_config, self.optimizer)
        if found is None:
            if (self.output_dir / "final").exists():
                raise FileExistsError(f"train.resume=true but {self.output_dir} holds a finished run's final/ and "
                                      "no checkpoint to resume from; choose another train.output_dir")
            if self.accelerator.is_main_process:
                print(f"[mmalign] train.resume: no checkpoint in {self.output_dir}, starting from step 0")
            return
        path, self.step, state = found
        self.skipped_steps = state.get("skipped_steps", 0)
        if is_sharded_checkpoint(path):
            pass  # its optimizer shards were loaded with the weights (each process its slices)
        elif sharding.is_sharded(self.model):
            sharding.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_state.load_state_dict(state["loss_state"])
        if self.nft is not None:
            self.nft.load_state_dict(state["nft_old"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.accelerator.is_main_process:
            print(f"[mmalign] resumed from {path} at step {self.step}")

    def _reference_moves(self) -> bool:
        """The reference changes during training (TR-DPO sync, online refresh): checkpoints keep it."""
        online = self.cfg.online
        return bool(self.cfg.reference.sync_every) or (online is not None and online.reference_update == "every_round")

    def _check_resume_config(self, path: Path, info: dict[str, Any]) -> None:
        """ConfigError naming the first RESUME_KEYS value that differs from the checkpoint's run."""
        stored, now = info.get("config") or {}, to_dict(self.cfg)
        changed = [(f"{section}.{key}", now[section][key], stored[section][key]) for section, key in RESUME_KEYS
                   if key in stored.get(section, {}) and stored[section][key] != now[section][key]]
        if "batch_size" in stored.get("train", {}):
            processes = (info.get("num_processes", 1), self.accelerator.num_processes)
            world = (stored["train"]["batch_size"] * processes[0], self.cfg.train.batch_size * processes[1])
            if world[0] != world[1]:
                changed.append(("train.batch_size", f"{self.cfg.train.batch_size} x {processes[1]} process(es)",
                                f"{stored['train']['batch_size']} x {processes[0]} process(es)"))
        for key, value, old in changed[:1]:
            raise ConfigError(f"train.resume: {key} is {value!r} but the run in {path} used {old!r}; resume with "
                              "the same value, or start a new run in another train.output_dir")

    def _check_output_dir(self) -> None:
        """Without train.resume, refuse a folder holding another run's checkpoints, final/ or
        metrics.jsonl (nothing finished is overwritten); then clean what killed writers left."""
        out = self.output_dir
        if not self.cfg.train.resume:
            held = [name for name, there in (
                ("checkpoints", bool(ckpt.checkpoint_candidates(out)) or ckpt.latest_checkpoint(out) is not None),
                ("final/", (out / "final").exists()), ("metrics.jsonl", (out / "metrics.jsonl").exists())) if there]
            if held:
                raise FileExistsError(f"{out} already holds {', '.join(held)} of another run; set train.resume=true "
                                      "to continue that run, or choose another train.output_dir")
        if self.accelerator.is_main_process:
            ckpt.clean_stale_writes(out)
        self.accelerator.wait_for_everyone()

    # -- the loop ----------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        t, acc = self.cfg.train, self.accelerator
        self._check_output_dir()
        if t.resume:
            self.resume()
        self.logger = logger = MetricsLogger(self.output_dir, acc.is_main_process, self.step, t.tensorboard,
                                             t.report_to, dataclasses.asdict(self.cfg) if t.report_to else None)
        if acc.is_main_process:
            self._print_summary()
        last: dict[str, float] = {}
        if self.eval_records and self.step == 0:
            logger.log(0, last := self.evaluate())
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", disable=not (t.progress and acc.is_main_process))
        examples_per_step = t.batch_size * t.grad_accum * acc.num_processes
        while self.step < t.max_steps:
            tic = time.perf_counter()
            values = self.train_step()
            values["examples_per_s"] = examples_per_step / (time.perf_counter() - tic)
            bar.update(1)
            bar.set_postfix_str(format_metrics(values))
            if self.step % t.log_every == 0 or self.step == t.max_steps or "online/round" in values:
                logger.log(self.step, values)
                last.update(values)
            if self.eval_records and ((t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps):
                logger.log(self.step, ev := self.evaluate())
                last.update(ev)
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps:
                self.save()
            if t.validate_every and self.step % t.validate_every == 0:
                self.validate()
        bar.close()
        logger.close()
        self.export(self.output_dir / "final")
        return last

    def validate(self) -> None:
        """Modality-defined samples for a human to watch (e.g. images for fixed prompts and
        seeds): `likelihood.validate(model, step, folder) -> {metric: value}`, main process.
        Only for a likelihood with that ability (`mmalign.types.Validates`)."""
        if not isinstance(self.likelihood, Validates):
            return
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            folder = self.output_dir / "validation" / f"step_{self.step:08d}"
            with torch.no_grad():
                values = self.likelihood.validate(self.unwrapped, self.step, folder) or {}
            if values:
                self.logger.log(self.step, values)
            self.logger.log_media(self.step, folder)
        acc.wait_for_everyone()

    def _print_summary(self) -> None:
        c = self.cfg
        files = c.data.train if isinstance(c.data.train, str) else " + ".join(c.data.train)
        source = (self.source.describe() if self.source is not None
                  else f"{len(self.records)} {self.kind} examples from {files}")
        print(f"[mmalign] {source}"
              f"{f', {len(self.eval_records)} held out' if self.eval_records else ''}; loss {c.loss.name} "
              f"(beta {c.loss.beta}); reference {self.strategy}; {self.accelerator.num_processes} process(es) "
              f"x batch {c.train.batch_size} x accum {c.train.grad_accum}; {c.train.max_steps} steps")

    def export(self, path: Path) -> None:
        """Save the final model (the adapter alone with LoRA) with `save_pretrained`."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if sharding.is_sharded(self.model):  # the run is over: full weights for save_pretrained
            sharding.gather_in_place(self.model)
        if acc.is_main_process:
            ckpt.save_pretrained_atomic(self.unwrapped, self.processor, path)
        acc.wait_for_everyone()


def train(cfg: Config) -> dict[str, float]:
    """Build the modality named in the config (and its online data source, if any) and train it;
    returns the last metrics."""
    from mmalign.modalities import build_modality, build_source

    model, likelihood, processor = build_modality(cfg)
    return PreferenceTrainer(cfg, model, likelihood, processor, build_source(cfg, likelihood, processor)).fit()
