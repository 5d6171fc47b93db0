"""Text DPO, one side per process: mmalign's `PreferenceTrainer` or TRL's `DPOTrainer`.

Both sides train the same Llama-shaped model (loaded from the same `save_pretrained`
folder) with a frozen reference copy, on the same pairs in the same order, in float32,
with AdamW (same lr, betas, eps; no weight decay, no warm-up, constant lr) and the same
gradient clipping. The order is mmalign's: its `StreamSampler` decides which pairs each
step reads, and TRL gets exactly those rows, pre-ordered, with
`train_sampling_strategy="sequential"` (TRL 1.16 / transformers 5 otherwise shuffle with
a `RandomSampler`). TRL's settings that differ from mmalign's defaults are set to match:
`gradient_checkpointing=False` (TRL defaults to True), `optim="adamw_torch"` (the default
is the fused kernel; mmalign uses plain `torch.optim.AdamW`), `lr_scheduler_type="constant"`
(default linear decay), `bf16=False`. Tokenisation agrees exactly (EOS appended, no BOS;
see tests/test_trl_agreement.py).

Worker command (run by `python -m benchmarks`, which prepares WORKDIR)::

    python -m benchmarks.text_dpo --side {mmalign,trl} --workdir WORKDIR --result OUT.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks import measure


@dataclass
class Settings:
    """Everything both sides share; written to WORKDIR/settings.json by `prepare`."""

    steps: int = 60
    warmup: int = 5
    batch_size: int = 8  # pairs per step (16 sequences per forward)
    hidden_size: int = 256
    num_layers: int = 4
    num_pairs: int = 512  # size of the pair file the steps draw from
    lr: float = 1e-4
    beta: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 64
    seed: int = 0
    threads: int = 1


def prepare(workdir: Path, s: Settings) -> None:
    """Save the tiny Llama + tokenizer and the pair file that both sides read."""
    from transformers.utils import logging

    from mmalign.toytext import build_tiny_llama, build_word_tokenizer, make_toy_pairs

    logging.disable_progress_bar()
    tokenizer = build_word_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=s.hidden_size, num_layers=s.num_layers, seed=s.seed)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    with open(workdir / "pairs.jsonl", "w") as f:
        for record in make_toy_pairs(s.num_pairs, seed=s.seed + 1):
            f.write(json.dumps(record) + "\n")
    (workdir / "settings.json").write_text(json.dumps(asdict(s)))


def load_settings(workdir: Path) -> Settings:
    data = json.loads((workdir / "settings.json").read_text())
    return Settings(**{f.name: data[f.name] for f in fields(Settings)})


def read_pairs(workdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in open(workdir / "pairs.jsonl")]


def mmalign_order(s: Settings) -> list[int]:
    """File indices of the pairs mmalign's trainer reads, step after step."""
    from mmalign.data.preference import StreamSampler

    return StreamSampler(s.num_pairs, s.seed).indices(0, s.steps * s.batch_size)


def padding_stats(trainer: Any, steps: int) -> dict[str, float]:
    """Padded and real tokens of the padded batches the trainer read in its first `steps` steps
    (one process): `collate`'s attention masks, untimed."""
    pad = real = 0
    for m in range(steps * trainer.cfg.train.grad_accum):
        rows = trainer.sampler.micro_batch(m, trainer.cfg.train.batch_size, 0, 1)
        mask = trainer.likelihood.collate(trainer.fetch("train", rows), trainer.kind).inputs["attention_mask"]
        pad, real = pad + int((mask == 0).sum()), real + int(mask.sum())
    return {"padded_tokens": pad, "real_tokens": real, "padded_fraction": pad / (pad + real)}


def mmalign_steps(workdir: Path, s: Any, padding: bool = False, **sections: dict[str, Any] | str) -> dict[str, Any]:
    """Build mmalign's trainer from a config dict (`sections` extend or replace its sections: the
    VLM benchmark adds `modality="llava"`) and call `train_step()` `s.steps` times; `padding`: also
    return the padded batches' token counts (`padding_stats`) under "extra"."""
    from mmalign.config import Config, from_dict, validate
    from mmalign.modalities import build_modality
    from mmalign.train.trainer import PreferenceTrainer

    tic = time.perf_counter()
    config: dict[str, Any] = {
        "model": {"path": str(workdir / "model"), "dtype": "float32"},
        "data": {"train": str(workdir / "pairs.jsonl"), "max_length": s.max_length},
        "loss": {"name": "dpo", "beta": s.beta},
        "reference": {"strategy": "frozen"},
        "optim": {"name": "adamw", "lr": s.lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                  "scheduler": "constant", "warmup_steps": 0, "max_grad_norm": s.max_grad_norm},
        "train": {"output_dir": str(workdir / "mmalign_run"), "max_steps": s.steps, "batch_size": s.batch_size,
                  "mixed_precision": "no", "seed": s.seed, "cpu": True, "progress": False, "tensorboard": False},
    }
    for name, value in sections.items():
        config[name] = {**config.get(name, {}), **value} if isinstance(value, dict) else value
    cfg = from_dict(Config, config)
    validate(cfg)
    model, likelihood, processor = build_modality(cfg)
    trainer = PreferenceTrainer(cfg, model, likelihood, processor)
    start = time.perf_counter()
    ends, losses = [], []
    for _ in range(s.steps):
        losses.append(trainer.train_step()["loss"])
        ends.append(time.perf_counter())
    out = {"setup_s": start - tic, "start": start, "step_ends": ends, "losses": losses}
    return {**out, "extra": padding_stats(trainer, s.steps)} if padding else out


def run_mmalign(workdir: Path, s: Settings) -> dict[str, Any]:
    """mmalign's trainer on the tiny Llama-shaped model."""
    return mmalign_steps(workdir, s)


def _trl_recorder(record: dict[str, Any]) -> Any:
    """A TrainerCallback storing step end times and the logged per-step loss."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_ends"].append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))

    return Recorder()


def run_trl(workdir: Path, s: Settings) -> dict[str, Any]:
    """TRL's DPOTrainer on the pairs mmalign reads, pre-ordered, sampled sequentially."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tic = time.perf_counter()
    pairs = read_pairs(workdir)
    ordered = Dataset.from_list([pairs[i] for i in mmalign_order(s)])
    path = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return train_trl(workdir, s, policy, reference, tokenizer, ordered, tic)


def train_trl(workdir: Path, s: Settings, policy: Any, reference: Any, processing_class: Any, dataset: Any,
              tic: float, gradient_checkpointing: bool = False, **overrides: Any) -> dict[str, Any]:
    """Run TRL's DPOTrainer with every default that differs from mmalign's set to match it
    (fp32, torch AdamW, constant lr, no checkpointing, sequential order); shared by the rows.
    `overrides`: other DPOConfig values (the GPU rows: use_cpu=False, bf16=True)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**dict(dict(
        output_dir=str(workdir / "trl_run"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=s.batch_size, max_steps=s.steps, max_length=None, beta=s.beta,
        loss_type=["sigmoid"], learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        max_grad_norm=s.max_grad_norm, gradient_checkpointing=gradient_checkpointing, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=s.seed, dataloader_num_workers=0,
    ), **overrides))
    record: dict[str, Any] = {"step_ends": [], "losses": []}
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=processing_class,
                         train_dataset=dataset, callbacks=[_trl_recorder(record)])
    trainer.train()
    record["setup_s"] = record["start"] - tic
    return record


SIDES = {"mmalign": run_mmalign, "trl": run_trl}


def _import_both_stacks() -> None:
    """Import everything either side uses (transformers imports Llama and torchvision lazily)
    before the clock and the memory baseline, so neither side pays for imports and both
    start from the same kind of process."""
    import datasets  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    import mmalign.modalities.causal_lm  # noqa: F401
    import mmalign.train.trainer  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    measure.run_side(__doc__, SIDES, load_settings, _import_both_stacks, argv)


if __name__ == "__main__":
    main()
