"""optim.py: the schedules at their documented points, the optimizer registry, stepping inside backward."""
import math

import pytest
import torch

import optim
from conftest import tiny_model
from runtime import UsageError

TRAIN_CFG = {"learning_rate": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "momentum": 0.9, "nesterov": True}


def lrs(schedule, n=20, lr=0.01, min_lr=0.001, warmup=0, max_iters=20, decay=0):
    return [optim.lr_at(it, schedule, lr, min_lr, warmup, max_iters, decay) for it in range(n)]


def test_schedules_as_train_py_logs_them():
    """The checks the subprocess test made on train.py's logged lr, now on the function train.py calls."""
    const = lrs("constant", warmup=4)
    assert const[0] < const[3] and all(lr == 0.01 for lr in const[4:])
    cycle = lrs("onecycle", warmup=6)
    peak = cycle.index(max(cycle))
    assert peak == 6 and cycle[0] == pytest.approx(0.01 / 25) and cycle[-1] < cycle[peak] and cycle[-1] >= 0.001
    cos = lrs("cosine", warmup=2)
    assert max(cos) == pytest.approx(0.01, rel=0.05) and all(a >= b for a, b in zip(cos[2:], cos[3:]))


def test_schedules_at_their_documented_points():
    at = lambda it, s, **kw: optim.lr_at(it, s, **{"lr": 1.0, "min_lr": 0.1, "warmup": 10, "max_iters": 110, **kw})  # noqa: E731
    # cosine: linear warmup from lr/(warmup+1), the peak right after it, half-way at the middle, min_lr from decay_iters
    assert at(0, "cosine") == pytest.approx(1 / 11) and at(9, "cosine") == pytest.approx(10 / 11)
    assert at(10, "cosine") == 1.0 and at(60, "cosine") == pytest.approx(0.55) and at(110, "cosine") == 0.1
    assert at(500, "cosine") == 0.1 and at(50, "cosine", decay_iters=50) == 0.1
    assert at(30, "cosine", decay_iters=50) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    # constant: the same warmup, then lr for good
    assert at(0, "constant") == pytest.approx(1 / 11) and at(10, "constant") == at(10_000, "constant") == 1.0
    # one-cycle: lr/25 at the start, lr at the end of warmup (30% of the run by default), min_lr at max_iters
    assert at(0, "onecycle", warmup=0) == pytest.approx(1 / 25) and at(33, "onecycle", warmup=0) == 1.0
    assert at(110, "onecycle", warmup=0) == pytest.approx(0.1) and at(72, "onecycle", warmup=1) < 1.0


def test_registry_builds_every_optimizer_with_its_state_count():
    for name, entry in optim.OPTIMIZERS.items():
        model = tiny_model().train()
        opts = optim.make_optimizers(model.parameters(), name, TRAIN_CFG)
        model(torch.randint(64, (2, 8)), torch.randint(64, (2, 8)))[1].backward()
        for o in opts:
            o.step()
        w = model.layers[0].attention.wq.weight
        state = next(o.state[w] for o in opts if w in o.state)
        full = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == w.shape]
        assert len(full) == entry.states, (name, list(state))
        decayed = [g for o in opts for g in o.param_groups if g["weight_decay"] > 0]
        assert all(p.dim() >= 2 for g in decayed for p in g["params"])  # norms are never decayed


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_in_backward_steps_like_one_optimizer(name):
    ref, hooked = tiny_model().train(), tiny_model().train()
    opts = optim.make_optimizers(ref.parameters(), name, TRAIN_CFG)
    optim.make_optimizers(hooked.parameters(), name, TRAIN_CFG, in_backward=True)
    for step in range(3):
        x, y = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(step)), torch.randint(64, (2, 8))
        ref(x, y)[1].backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        hooked(x, y)[1].backward()  # the hooks step each parameter as its gradient completes
        assert all(p.grad is None for p in hooked.parameters())  # and free it
    for a, b in zip(ref.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b)


def test_settings_are_checked_by_meaning():
    for key, bad in (("learning_rate", 0.0), ("learning_rate", -1.0), ("weight_decay", -0.1), ("beta2", 1.0),
                     ("momentum", 1.5)):
        name = "sgd" if key == "momentum" else "adamw"
        with pytest.raises(UsageError, match=f"{key}={bad} must be"):
            optim.check_settings(name, {**TRAIN_CFG, key: bad})
    with pytest.raises(UsageError, match="optimizer='adam' is not one of 'adamw', 'sgd'"):
        optim.check_settings("adam", TRAIN_CFG)
    optim.check_settings("sgd", {**TRAIN_CFG, "beta2": 7.0})  # a key SGD does not read is not its business
