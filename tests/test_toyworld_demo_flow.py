"""`mmalign demo --flow` (mmalign/toyworld/demo_flow.py): the three methods get equal sampled-image budgets
from the real configs, and every step is a valid command."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.config import load_config
from mmalign.toyworld.demo_flow import CONFIGS, QUICK_FLOW, FlowDemoSettings, flow_steps, train_overrides
from mmalign.toyworld.world import TRAIN_PROMPTS

ROOT = Path(__file__).resolve().parents[1]


def loaded(method: str, s: FlowDemoSettings, out: Path):
    overrides = [f"{k}={v}" for k, v in train_overrides(method, out, s).items()]
    return load_config(ROOT / CONFIGS[method], overrides)


@pytest.mark.parametrize("s", [FlowDemoSettings(), QUICK_FLOW, FlowDemoSettings(groups=3, group_size=2)])
def test_online_methods_sample_the_dpo_pairs_budget(s, tmp_path):
    """rounds · prompts per round · group size == groups · group_size · |prompts| (the DPO samples), and each
    round's items (GRPO: 9 trained steps per trajectory) fill exactly round_steps batches."""
    assert s.budget() == s.groups * s.group_size * 10 and len(TRAIN_PROMPTS) == 10
    for method, section in (("grpo", "grpo"), ("nft", "online")):
        cfg = loaded(method, s, tmp_path)
        o = getattr(cfg, section)
        rounds = cfg.train.max_steps // o.round_steps
        assert cfg.train.max_steps % o.round_steps == 0 and rounds == s.groups
        assert sorted(o.prompt_list) == sorted(TRAIN_PROMPTS) and o.prompts_per_round == len(TRAIN_PROMPTS)
        assert rounds * o.prompts_per_round * o.group_size == s.budget()
        per_item = int(o.num_steps * o.timestep_fraction) if method == "grpo" else 1
        assert cfg.train.batch_size * o.round_steps == o.prompts_per_round * o.group_size * per_item
    dpo = loaded("dpo", s, tmp_path)
    assert dpo.train.max_steps == s.dpo_steps and str(dpo.data.train).endswith("pairs/pairs.jsonl")


def test_steps_generate_the_budget_and_evaluate_every_method(tmp_path):
    s = FlowDemoSettings()
    phases = flow_steps(tmp_path, s)
    assert list(phases) == ["pairs", "dpo", "grpo", "nft", "eval"]
    gen = next(st for st in phases["pairs"] if st.argv[0] == "generate")
    assert gen.argv[gen.argv.index("--num-samples") + 1] == str(s.group_size)
    repeat = next(st for st in phases["pairs"] if "--repeat" in st.argv)
    assert repeat.argv[repeat.argv.index("--repeat") + 1] == str(s.groups)
    evals = [st for st in phases["eval"] if st.argv[:2] == ["eval", "images"]]
    assert [st.argv[st.argv.index("--aligned") + 1] for st in evals] == [str(tmp_path / "eval" / m) for m in CONFIGS]
    seeds = {st.argv[st.argv.index("--seed") + 1] for st in phases["eval"] if st.argv[0] == "generate"}
    assert seeds == {str(s.eval_seed)} and s.eval_seed >= 10_000  # held-out seeds only


def test_unknown_phase_is_one_clear_error(tmp_path):
    from mmalign.errors import ConfigError
    from mmalign.toyworld.demo_flow import run_flow_demo

    with pytest.raises(ConfigError, match=r"phases \['rlhf'\] unknown: choose from pairs, dpo, grpo, nft, eval"):
        run_flow_demo(tmp_path, phases=["grpo", "rlhf"])
    assert not (tmp_path / "times").exists()  # nothing ran
