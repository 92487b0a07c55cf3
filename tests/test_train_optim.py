"""Learning-rate schedule, optimiser groups and weight EMA."""

import pytest
import torch
from torch import nn

from dashcamd.train.optim import ModelEMA, lr_factor, make_optimizer, set_lr


def test_schedule_warms_up_then_decays_to_the_final_factor():
    assert lr_factor(0.1, 10, 1.0, 0.05) == pytest.approx(0.1, rel=0.01)
    assert lr_factor(1.0, 10, 1.0, 0.05) < 1.0
    values = [lr_factor(e / 10, 10, 1.0, 0.05) for e in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_factor(10, 10, 1.0, 0.05) == pytest.approx(0.05)
    assert lr_factor(12, 10, 1.0, 0.05) == pytest.approx(0.05)  # past the plan: stays at the floor


def test_extending_a_run_raises_the_lr_to_the_longer_plan():
    assert lr_factor(10, 20, 1.0, 0.05) == pytest.approx(0.525)


def test_groups_keep_decay_off_batchnorm_and_biases_and_sgd_bias_warmup():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    opt = make_optimizer(model, "sgd", 0.01, 5e-4)
    kinds = {g["kind"]: g for g in opt.param_groups}
    assert kinds["weight"]["weight_decay"] == 5e-4 and len(kinds["weight"]["params"]) == 2
    assert kinds["bn"]["weight_decay"] == 0 and len(kinds["bn"]["params"]) == 1
    assert kinds["bias"]["weight_decay"] == 0 and len(kinds["bias"]["params"]) == 3
    set_lr(opt, 0.01, 0.5, warmup_left=1.0)
    assert kinds["bias"]["lr"] == pytest.approx(0.1) and kinds["weight"]["lr"] == pytest.approx(0.005)
    set_lr(opt, 0.01, 0.5, warmup_left=0.0)
    assert kinds["bias"]["lr"] == pytest.approx(0.005)


def test_ema_follows_the_model_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, tau=1.0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    before = ema.model[0].weight.clone()
    ema.update(model)
    after = ema.model[0].weight
    assert (after > before).all() and (after < model[0].weight).all()
    assert ema.model[1].num_batches_tracked.item() == 5
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_epochs_that_fit_extends_by_the_mean_pace_and_never_below_the_current_epoch():
    from dashcamd.train.trainer import epochs_that_fit

    # 2 epochs took 20 s of a 100 s budget: 8 more at 10 s each, counted from epoch 12 (a resumed run).
    assert epochs_that_fit(done_here=2, seconds_here=20.0, budget_s=100.0, epoch_now=12) == 20
    assert epochs_that_fit(done_here=1, seconds_here=50.0, budget_s=10.0, epoch_now=3) == 3
