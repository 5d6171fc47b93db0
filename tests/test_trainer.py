"""The common trainer on the tiny Llama: learning, resume, references, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import load_config
from mmalign.modalities import build_modality
from mmalign.train.trainer import NonFiniteLossError, PreferenceTrainer


def trainer_for(path, *overrides: str) -> PreferenceTrainer:
    cfg = load_config(path, list(overrides))
    model, likelihood, tokenizer = build_modality(cfg)
    return PreferenceTrainer(cfg, model, likelihood, tokenizer)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]


def params(trainer: PreferenceTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def test_dpo_learns_the_rule_on_held_out_pairs(make_config, toy_data, tmp_path, capsys):
    """A short DPO run through the CLI raises reward accuracy on pairs it never saw."""
    cfg = make_config(data={"eval": str(toy_data["eval"])}, train={"max_steps": 40, "batch_size": 16, "log_every": 10})
    assert main(["train", str(cfg)]) == 0
    rows = read_metrics(tmp_path / "run")
    first_eval = rows[0]
    assert first_eval["step"] == 0
    # policy == reference before training: every margin is 0, dpo loss is log 2.
    assert first_eval["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first_eval["eval/rewards/accuracies"] == 0.0
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    assert last_eval["step"] == 40
    assert last_eval["eval/rewards/accuracies"] >= 0.8
    assert last_eval["eval/rewards/margins"] > 0
    assert last_eval["eval/loss"] < math.log(2)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "eval/rewards/accuracies=" in capsys.readouterr().out


@pytest.mark.parametrize("loss,data,first_loss", [
    ("kto", "unpaired", 0.5),         # h = z = 0: λ(1 - σ(0)) = 0.5 for every item
    ("ranked", "ranked", math.log(2)),  # all h equal: every pair term is log 2, weighted mean log 2
    ("ipo", "train", (1 / (2 * 0.1)) ** 2),  # d = 0: (0 - 1/(2β))² = 25
])
def test_first_step_loss_of_other_formats(make_config, toy_data, tmp_path, loss, data, first_loss):
    cfg = make_config(data={"train": str(toy_data[data])}, loss={"name": loss}, train={"max_steps": 3})
    assert main(["train", str(cfg)]) == 0
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
    assert rows[0]["rewards/chosen"] == 0.0  # policy == reference at step 0
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] != rows[0]["loss"]


def straight_and_resumed(cfg, stop: int):
    """(a trainer run straight to train.max_steps, a NEW trainer resumed from a checkpoint saved after
    `stop` steps of another one and run to the end), both in cfg's folder tree."""
    straight = trainer_for(cfg, "train.output_dir=" + str(cfg.parent / "straight"))
    straight.fit()
    interrupted = trainer_for(cfg)
    for _ in range(stop):
        interrupted.train_step()
    interrupted.save()
    del interrupted  # the "crash"
    resumed = trainer_for(cfg, "train.resume=true")
    resumed.fit()
    return straight, resumed


def test_resume_equals_uninterrupted_run(make_config):
    """3 steps, checkpoint, a NEW trainer resumes to 6: same weights as 6 straight steps."""
    cfg = make_config(optim={"scheduler": "linear", "warmup_steps": 2, "lr": 1e-3},
                      train={"max_steps": 6, "grad_accum": 2, "batch_size": 4})
    straight, resumed = straight_and_resumed(cfg, 3)
    assert resumed.step == 6
    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    # The optimizer state matches too (Adam moments), not only the weights.
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg_sq"], sa[i]["exp_avg_sq"], rtol=0, atol=0)


def test_existing_checkpoints_are_not_overwritten(make_config):
    cfg = make_config(train={"max_steps": 1})
    trainer_for(cfg).fit()
    with pytest.raises(FileExistsError, match="train.resume=true"):
        trainer_for(cfg).fit()


def test_nan_loss_stops_with_step_and_keeps_checkpoint(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 5, "save_every": 1})
    trainer = trainer_for(cfg)
    original = trainer.likelihood.logps

    def poisoned(model, batch, draw=None):
        out = original(model, batch, draw)
        if trainer.step == 2 and model.training:
            out.logps = out.logps * float("nan")
        return out

    trainer.likelihood.logps = poisoned
    with pytest.raises(NonFiniteLossError, match="at step 2.*step_00000002"):
        trainer.fit()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000001", "step_00000002"]
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_lora_disabled_reference_is_exactly_the_base(make_config, tiny_lm):
    base, _ = tiny_lm
    cfg = make_config(lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
                      optim={"lr": 5e-2}, train={"max_steps": 3})
    trainer = trainer_for(cfg)
    assert trainer.strategy == "lora_disabled"
    trainer.fit()
    batch = trainer._batch(trainer.records[:8])
    ref = trainer.reference.logps(batch, trainer.likelihood.draw(batch)).logps
    expected = trainer.likelihood.logps(base, batch).logps
    assert torch.equal(ref, expected)
    with torch.no_grad():
        policy = trainer.likelihood.logps(trainer.model, batch).logps
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapters did train
    trainable = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_precomputed_reference_matches_frozen_copy(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 3})
    frozen = trainer_for(cfg, "reference.strategy=frozen", f"train.output_dir={tmp_path / 'frozen'}")
    frozen.fit()
    pre = trainer_for(cfg, "reference.strategy=precomputed", f"train.output_dir={tmp_path / 'pre'}")
    pre.fit()
    assert (tmp_path / "pre" / "reference_logps_train.safetensors").is_file()
    a, b = params(frozen), params(pre)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tr_dpo_sync_moves_reference_toward_policy(make_config):
    cfg = make_config(reference={"strategy": "frozen", "sync_every": 2, "sync_alpha": 1.0},
                      train={"max_steps": 2})
    trainer = trainer_for(cfg)
    before = [p.clone() for p in trainer.reference.model.parameters()]
    trainer.fit()
    after = list(trainer.reference.model.parameters())
    for ref_p, pol_p, old in zip(after, trainer.unwrapped.parameters(), before):
        assert torch.equal(ref_p, pol_p.detach())  # alpha = 1: a hard copy
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_unknown_key_is_a_clear_cli_error(make_config, capsys):
    cfg = make_config(train={"max_step": 3})
    assert main(["train", str(cfg)]) == 2
    assert "unknown config key 'train.max_step'; did you mean 'max_steps'?" in capsys.readouterr().err


def test_missing_column_is_a_clear_cli_error(make_config, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "scene : cat . describe :", "chosen": "a cat", "rejected": "a dog"}\n'
                   '{"prompt": "scene : dog . describe :", "chosen": "a dog"}\n')
    cfg = make_config(data={"train": str(bad)})
    assert main(["train", str(cfg)]) == 2
    assert "row 1 has no column 'rejected'" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients(make_config, tmp_path):
    """Checkpointing trades memory for recompute; with LoRA the frozen embeddings must still
    feed gradients into the checkpointed blocks (enable_input_require_grads)."""
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    grads = []
    for checkpointing in (False, True):
        cfg = make_config(lora=lora, model={"gradient_checkpointing": checkpointing},
                          train={"output_dir": str(tmp_path / f"gc{checkpointing}")})
        trainer = trainer_for(cfg)
        losses, _ = trainer.forward(trainer.fetch("train", list(range(8))), seed=0)
        losses.mean().backward()
        grads.append({n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_bf16_mixed_precision_runs(make_config, tmp_path):
    cfg = make_config(train={"mixed_precision": "bf16", "max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(rows[-1]["loss"])


@pytest.mark.parametrize("estimate", ["mismatched", "batch"])
def test_kto_reference_point(make_config, toy_data, estimate):
    """z = max(0, mean log-ratio) of (prompt_i, completion_{i+1}) items (TRL's estimate) or
    of the batch's own items, computed independently here."""
    from mmalign.data.preference import mismatched

    from transformers import AutoModelForCausalLM

    from mmalign.config import resolve_path

    cfg = make_config(data={"train": str(toy_data["unpaired"])}, loss={"name": "kto", "kto_reference_point": estimate})
    trainer = trainer_for(cfg)
    # Reference = the trained shipped model, which is sure that an answer naming objects
    # absent from the scene is wrong; policy = the random-init model. Mismatched answers
    # then get large positive log-ratios, so that z is far from the clamp at 0.
    trainer.reference.model = AutoModelForCausalLM.from_pretrained(resolve_path("pkg://tiny_lm")).eval()
    records = trainer.fetch("train", list(range(6)))
    items = mismatched(records) if estimate == "mismatched" else records
    assert [r["completion"] for r in mismatched(records)][:2] == [records[1]["completion"], records[2]["completion"]]
    with torch.no_grad():
        batch = trainer._batch(items)
        h = trainer.likelihood.logps(trainer.model, batch).logps - trainer.reference.logps(batch, None).logps
        _, metrics = trainer.forward(records, seed=0)
    if estimate == "mismatched":
        assert float(h.mean()) > 1.0  # so the clamp at 0 is not all the assertion below sees
    assert float(metrics["kl"]) == pytest.approx(max(0.0, float(h.mean())), abs=1e-5)


def test_frozen_reference_is_moved_to_the_training_device(make_config, monkeypatch):
    """accelerate's prepare() moves only the policy: the frozen copy must be moved by us
    (on a GPU a CPU copy would fail at the first reference forward). On this CPU machine the
    move is shown with the meta device, and the trainer must hand over its device."""
    from contextlib import nullcontext

    from mmalign.train import reference as reference_module
    from mmalign.train import trainer as trainer_module

    model = torch.nn.Linear(2, 2)
    copy = reference_module.FrozenReference(model, None, nullcontext, device="meta")
    assert next(copy.model.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"  # the policy is left alone
    seen = {}

    class Spy(reference_module.FrozenReference):
        def __init__(self, *args, **kwargs):
            seen["device"] = args[3] if len(args) > 3 else kwargs.get("device")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "FrozenReference", Spy)
    trainer = trainer_for(make_config(reference={"strategy": "frozen"}))
    assert seen["device"] == trainer.accelerator.device


def test_compiled_model_trains_like_the_eager_one(make_config, tmp_path):
    """train.compile captures the policy's graph (aot_eager: no C++ build in CI); the losses
    and trained weights equal the eager run's, and the checkpoint keys are the plain ones."""
    from torch._dynamo.utils import counters

    results, graphs = [], []
    for backend in ("", "aot_eager"):
        torch._dynamo.reset()
        counters.clear()
        cfg = make_config(train={"compile": backend, "max_steps": 3, "output_dir": str(tmp_path / f"c{backend}")})
        trainer = trainer_for(cfg)
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        results.append((losses, params(trainer)))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == 0 and graphs[1] > 0  # the compiled run really went through dynamo
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert eager_losses[0] == pytest.approx(math.log(2), abs=1e-6) and eager_losses[-1] != eager_losses[0]
    assert compiled_params.keys() == eager_params.keys()
    for name in eager_params:
        torch.testing.assert_close(compiled_params[name], eager_params[name], rtol=1e-4, atol=1e-5, msg=name)
