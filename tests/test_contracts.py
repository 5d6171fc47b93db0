"""The contracts of mmalign/types.py are the real ones: every built likelihood satisfies the
runtime-checkable `Likelihood` protocol and exactly the ability protocols it has; the trainer
trains on what a `DataSource` returns; modalities do not import the trainer and library code does
not call the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import build_for, write_tiny_run

from mmalign.config import ConfigError, LossConfig, StepConfig, load_config
from mmalign.modalities import build_modality, build_source
from mmalign.train.image_terms import ImageTerms
from mmalign.train.setup import check_contracts
from mmalign.train.trainer import PreferenceTrainer
from mmalign.types import (
    DataSource, Likelihood, Round, ScoresModifiedImages, TokenValues, Validates,
)

PACKAGE = Path(__file__).resolve().parents[1] / "mmalign"


def abilities(likelihood) -> set[str]:
    return {p.__name__ for p in (Validates, ScoresModifiedImages, TokenValues) if isinstance(likelihood, p)}


# -- likelihoods ------------------------------------------------------------------------------------
def test_causal_lm_likelihood_is_a_likelihood_with_token_values(make_config):
    cfg = load_config(make_config(), [])
    _, likelihood, _ = build_modality(cfg)
    assert isinstance(likelihood, Likelihood) and likelihood.deterministic is True
    assert abilities(likelihood) == {"TokenValues"}
    assert likelihood.to("cpu") is likelihood
    batch = likelihood.collate([{"prompt": "a b", "chosen": "c", "rejected": "d e"}], "pair")
    ids = likelihood.scored_token_ids(batch, 3)
    assert torch.equal(ids, batch.inputs["input_ids"][:, -3:])
    assert build_source(cfg, likelihood) is None  # offline: records come from data.train


def test_diffusion_and_step_likelihoods_are_likelihoods_that_validate(tmp_path):
    from mmalign.modalities.step import StepLikelihood

    data = write_tiny_run(tmp_path)
    _, likelihood, _ = build_for(tmp_path / "pipeline", data, "sd")
    assert isinstance(likelihood, Likelihood) and likelihood.deterministic is False
    assert abilities(likelihood) == {"Validates"}
    step = StepLikelihood(likelihood, StepConfig())
    assert isinstance(step, Likelihood) and abilities(step) == {"Validates"}


def test_an_object_missing_part_of_the_contract_is_refused(make_config):
    cfg = load_config(make_config(), [])
    _, likelihood, _ = build_modality(cfg)

    class NoTo:  # collate, draw, logps and deterministic, but no `to`
        deterministic = True
        collate, draw, logps = likelihood.collate, likelihood.draw, likelihood.logps

    with pytest.raises(TypeError, match="NoTo is not a mmalign.types.Likelihood"):
        check_contracts(cfg, NoTo(), None)
    with pytest.raises(TypeError, match="is not a mmalign.types.DataSource"):
        check_contracts(cfg, likelihood, object())


def test_abilities_the_config_needs_are_checked_against_the_protocols(make_config, tmp_path):
    data = write_tiny_run(tmp_path / "sd")
    _, diffusion, _ = build_for(tmp_path / "sd" / "pipeline", data, "sd")
    dense = load_config(make_config(loss={"dense_gamma": 2.0}), [])
    with pytest.raises(ConfigError, match="loss.dense_gamma needs per-token log-probs"):
        check_contracts(dense, diffusion, None)
    _, text, _ = build_modality(load_config(make_config(), []))
    with pytest.raises(ConfigError, match="scores answers with modified images"):
        ImageTerms(LossConfig(image_term="mdpo"), text, "pair", "frozen", [])


# -- data sources -----------------------------------------------------------------------------------
class FirstRows:
    """A sampler that always reads rows 0 .. batch_size-1 of the round, on every process."""

    def micro_batch(self, micro_step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
        return list(range(batch_size))


class StubSource:
    """Two rounds of 4 pairs: steps 0-1 train on round 0, steps 2+ on round 1."""

    kind = "pair"

    def __init__(self) -> None:
        self.rounds = [Round([{"prompt": f"r{r} p{i}", "chosen": f"yes {r}", "rejected": f"no {i}"} for i in range(4)],
                             FirstRows()) for r in range(2)]
        self.asked: list[int] = []

    def describe(self) -> str:
        return "a stub source"

    def records_for_step(self, step, model, accelerator) -> Round:
        assert isinstance(model, torch.nn.Module)
        self.asked.append(step)
        return self.rounds[min(step // 2, 1)]


def test_the_trainer_trains_on_exactly_the_records_its_source_returns(make_config, monkeypatch, capsys):
    cfg = load_config(make_config(train={"max_steps": 3, "batch_size": 2}), [])
    model, likelihood, tokenizer = build_modality(cfg)
    source = StubSource()
    assert isinstance(source, DataSource)
    trainer = PreferenceTrainer(cfg, model, likelihood, tokenizer, source=source)
    assert trainer.records == [] and trainer.kind == "pair"
    seen: list[list[str]] = []
    forward = trainer.forward

    def spy(records, seed):
        seen.append([r["prompt"] for r in records])
        return forward(records, seed)

    monkeypatch.setattr(trainer, "forward", spy)
    trainer.fit()
    assert source.asked == [0, 1, 2]
    assert seen == [["r0 p0", "r0 p1"], ["r0 p0", "r0 p1"], ["r1 p0", "r1 p1"]]
    assert trainer.records is source.rounds[1].records and trainer.sampler is source.rounds[1].sampler
    assert "[mmalign] a stub source;" in capsys.readouterr().out


# -- imports ----------------------------------------------------------------------------------------
def imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` statement of the file names (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_modality_imports_the_trainer():
    files = sorted((PACKAGE / "modalities").glob("*.py"))
    assert files
    bad = {f.name: sorted(m for m in imported_modules(f) if m == "mmalign.train" or m.startswith("mmalign.train."))
           for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_library_evaluation_code_does_not_call_the_cli():
    files = sorted((PACKAGE / "evaluation").glob("*.py"))
    bad = {f.name: sorted(m for m in imported_modules(f) if m == "mmalign.cli" or m.startswith("mmalign.cli.")
                          or m.startswith("mmalign.commands")) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}
