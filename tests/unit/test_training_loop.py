"""The shared training loop: loss falls, checkpoints rotate, resume is exact, cancel is clean."""
import os

import pytest
import torch

from safegen_core.training import TrainCallbacks, TrainConfig, list_checkpoints, train
from safegen_core.weights_io import WeightFileError

TARGET = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))


def loss_fn(params):
    def f(step, g):
        noise = torch.randn(3, 8, generator=g) * 0.1  # per-step randomness from the loop's generator
        return ((params["v"] - TARGET - noise) ** 2).mean()
    return f


def fresh():
    return {"v": torch.zeros(3, 8)}


class Stop(Exception):
    pass


def test_loss_falls_and_checkpoints_rotate(tmp_path):
    p = fresh()
    cfg = TrainConfig(steps=60, lr=0.05, seed=1, checkpoint_every=10, keep_checkpoints=2)
    seen = []
    r = train(p, loss_fn(p), cfg, TrainCallbacks(on_step=lambda s, n, l: seen.append(s)), ckpt_dir=str(tmp_path))
    assert r.losses[-1] < 0.1 * r.losses[0]
    assert seen == list(range(1, 61))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [50, 60]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_resume_equals_uninterrupted(tmp_path, opt):
    cfg = TrainConfig(steps=25, lr=0.05, seed=3, optimizer=opt, checkpoint_every=5)
    p = fresh()
    full = train(p, loss_fn(p), cfg)

    p2 = fresh()

    def interrupt_at_13():
        if len(calls) == 13:
            raise Stop
        calls.append(1)
    calls = []
    with pytest.raises(Stop):
        train(p2, loss_fn(p2), cfg, TrainCallbacks(check_interrupt=interrupt_at_13), ckpt_dir=str(tmp_path))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [5, 10]
    p3 = fresh()
    res = train(p3, loss_fn(p3), cfg, ckpt_dir=str(tmp_path), resume=True)
    assert res.resumed_from == 10
    assert torch.equal(res.params["v"], full.params["v"])
    assert res.losses == full.losses


def test_resume_refuses_other_settings(tmp_path):
    p = fresh()
    train(p, loss_fn(p), TrainConfig(steps=5, lr=0.05, checkpoint_every=5), ckpt_dir=str(tmp_path),
          fingerprint={"concept": "a"})
    p = fresh()
    with pytest.raises(WeightFileError, match="different settings.*concept"):
        train(p, loss_fn(p), TrainConfig(steps=10, lr=0.05, checkpoint_every=5), ckpt_dir=str(tmp_path),
              resume=True, fingerprint={"concept": "b"})


def test_nan_loss_is_an_error():
    p = fresh()
    with pytest.raises(FloatingPointError, match="step 1"):
        train(p, lambda s, g: p["v"].sum() * float("nan"), TrainConfig(steps=3))


def test_guided_prediction_and_retired_objective():
    from safegen_core.inversion import guided_eps, inversion_loss
    g = torch.Generator().manual_seed(0)
    eps, ec, en = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    assert torch.allclose(guided_eps(ec, en, 7.5), en + 7.5 * (ec - en))
    # the old 'guided' objective (guided prediction vs the noise) was not CCE's: it is gone, by name
    with pytest.raises(ValueError, match="unknown objective 'guided'"):
        inversion_loss("guided", eps, ec, en, 7.5)


def test_gradient_accumulation_averages_micro_batches():
    """grad_accum n: n loss_fn calls per step, one optimiser step on the mean gradient; the
    micro-batches draw from the step's generator in turn (different draws, same on resume)."""
    from safegen_core.training import TrainConfig, train
    draws = []

    def loss_fn(step, g):
        x = torch.randn(3, generator=g)
        draws.append((step, x))
        return ((p["v"] - x) ** 2).sum()

    p = {"v": torch.zeros(3)}
    res = train(p, loss_fn, TrainConfig(steps=1, lr=0.1, optimizer="sgd", grad_accum=4))
    assert [s for s, _ in draws] == [1, 1, 1, 1]
    xs = torch.stack([x for _, x in draws])
    assert len({tuple(x.tolist()) for x in xs}) == 4
    # SGD on the mean of (v - x_i)^2 from v = 0: v = 0.1 * 2 * mean(x)
    torch.testing.assert_close(res.params["v"], 0.2 * xs.mean(0))
    assert res.losses[0] == pytest.approx(float((xs ** 2).sum(1).mean()), rel=1e-6)
