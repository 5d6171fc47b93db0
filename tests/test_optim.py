"""Learning-rate schedules: hand-computed factors."""

from __future__ import annotations

import pytest
import torch

from mmalign.config import OptimConfig
from mmalign.train.optim import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize("scheduler,step,expected", [
    ("constant", 0, 0.25), ("constant", 3, 1.0), ("constant", 9, 1.0),  # warm-up 4: (0+1)/4
    ("linear", 4, 1.0), ("linear", 7, 0.5), ("linear", 10, 0.0),        # 1 - (7-4)/6
    ("cosine", 7, 0.5), ("cosine", 5, 0.5 * (1 + 0.5)),                 # cos(pi/6 * ... ) see below
])
def test_lr_factor(scheduler, step, expected):
    # cosine at step 5: progress (5-4)/6 = 1/6, 0.5 (1 + cos(pi/6)) = 0.9330; cos(pi/3)=0.5 at progress 1/3.
    cfg = OptimConfig(scheduler=scheduler, warmup_steps=4)
    if scheduler == "cosine" and step == 5:
        expected = 0.9330127
    assert lr_factor(step, cfg, max_steps=10) == pytest.approx(expected, abs=1e-6)


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(lr=0.1, scheduler="linear", warmup_steps=2)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, max_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.05])


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_optimizers_build_and_step(name):
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = build_optimizer([p], OptimConfig(name=name, lr=0.1))
    p.grad = torch.ones(3, 3)
    opt.step()
    assert (p < 1).all()


def test_no_trainable_parameters_is_an_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)], OptimConfig())


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    from mmalign.config import ConfigError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], OptimConfig(name="adamw8bit"))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_kernels_make_the_same_update(name):
    """optim.fused changes the kernel, not the math: three steps agree with the default to rounding."""
    torch.manual_seed(0)
    start, grads = torch.randn(4, 5), [torch.randn(4, 5) for _ in range(3)]
    results = []
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer([p], OptimConfig(name=name, lr=0.1, weight_decay=0.01, fused=fused))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    assert not torch.equal(results[0], start)
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)


def test_fused_needs_a_fused_optimizer():
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match="optim.fused.*adafactor"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], OptimConfig(name="adafactor", fused=True))
