"""optim.py: the schedules at their documented points, the optimizer registry, stepping inside backward."""
import math
import re

import pytest
import torch

import optim
from conftest import tiny_model
from runtime import UsageError

TRAIN_CFG = {"learning_rate": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "momentum": 0.9, "nesterov": True,
             "muon_lr": 0.02, "muon_momentum": 0.95, "muon_adjust_lr_fn": "original"}


def lrs(schedule, n=20, lr=0.01, min_lr=0.001, warmup=0, max_iters=20, decay=0):
    return [optim.lr_at(it, schedule, lr, min_lr, warmup, max_iters, decay) for it in range(n)]


def step(model, opts, seed=0):
    g = torch.Generator().manual_seed(seed)
    model(torch.randint(64, (2, 8), generator=g), torch.randint(64, (2, 8), generator=g))[1].backward()
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)


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
    base = {"lr": 1.0, "min_lr": 0.1, "warmup": 10, "max_iters": 110}
    at = lambda it, s, **kw: optim.lr_at(it, s, **{**base, **kw})  # noqa: E731
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
    # wsd: the same warmup, lr until the last cooldown_frac (here 20% of 110: from iter 88), min_lr at max_iters;
    # half-way through the cooldown a straight line is at the middle, 1-sqrt at 1 - sqrt(1/2) of the way
    for shape, mid in (("linear", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))):
        w = lambda it, shape=shape: at(it, "wsd", cooldown_shape=shape)  # noqa: E731
        assert w(0) == pytest.approx(1 / 11) and w(10) == w(87) == w(88) == 1.0 and w(110) == w(500) == 0.1
        assert w(99) == pytest.approx(0.1 + 0.9 * mid) and w(89) < 1.0 and w(109) > 0.1
    assert at(54, "wsd", cooldown_frac=0.5, cooldown_shape="linear") == 1.0  # cooldown from iter 55 ...
    assert at(60, "wsd", cooldown_frac=0.5, cooldown_shape="linear") == pytest.approx(0.1 + 0.9 * (1 - 5 / 55))
    assert at(40, "wsd", decay_iters=50) == 1.0 and at(50, "wsd", decay_iters=50) == 0.1  # ... or to decay_iters


def test_schedules_change_only_the_learning_rate():
    """One-cycle (and every other schedule) leaves momentum and betas as configured: only lr moves."""
    for name in optim.OPTIMIZERS:
        model = tiny_model().train()
        opts = optim.make_optimizers(model.named_parameters(), name, TRAIN_CFG)
        before = [{k: v for k, v in g.items() if k not in ("params", "lr")} for o in opts for g in o.param_groups]
        for it in range(12):
            optim.set_lr(opts, optim.lr_at(it, "onecycle", 0.01, 0.001, 0, 12))
            step(model, opts, it)
        after = [{k: v for k, v in g.items() if k not in ("params", "lr")} for o in opts for g in o.param_groups]
        assert after == before


def test_registry_builds_every_optimizer_with_its_state_count():
    for name, entry in optim.OPTIMIZERS.items():
        model = tiny_model().train()
        opts = optim.make_optimizers(model.named_parameters(), name, TRAIN_CFG)
        step(model, opts)
        w = model.layers[0].attention.wq.weight
        state = next(o.state[w] for o in opts if w in o.state)
        full = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == w.shape]
        assert len(full) == entry.states, (name, list(state))
        decayed = [g for o in opts for g in o.param_groups if g["weight_decay"] > 0]
        assert all(p.dim() >= 2 for g in decayed for p in g["params"])  # norms are never decayed


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_in_backward_steps_like_one_optimizer(name):
    ref, hooked = tiny_model().train(), tiny_model().train()
    opts = optim.make_optimizers(ref.named_parameters(), name, TRAIN_CFG)
    optim.make_optimizers(hooked.named_parameters(), name, TRAIN_CFG, in_backward=True)
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
    with pytest.raises(UsageError, match="optimizer='adam' is not one of 'adamw', 'sgd', 'lion', 'muon'"):
        optim.check_settings("adam", TRAIN_CFG)
    optim.check_settings("sgd", {**TRAIN_CFG, "beta2": 7.0})  # a key SGD does not read is not its business
    for key, bad, fragment in (("muon_lr", 0.0, "muon_lr=0.0 must be > 0"), ("muon_momentum", 1.0, "must be in [0, 1)"),
                               ("muon_adjust_lr_fn", "rms", "muon_adjust_lr_fn='rms' is not one of 'original'")):
        with pytest.raises(UsageError, match=re.escape(fragment)):
            optim.check_settings("muon", {**TRAIN_CFG, key: bad})
    optim.check_settings("adamw", {**TRAIN_CFG, "muon_adjust_lr_fn": "rms"})
    with pytest.raises(UsageError, match="lr_schedule='step' is not one of cosine, constant, onecycle, wsd"):
        optim.check_schedule("step", 0.2, "linear")
    for frac, shape in ((0.0, "linear"), (1.5, "linear"), (0.2, "sqrt")):
        with pytest.raises(UsageError, match="lr_schedule='wsd' needs cooldown_frac in"):
            optim.check_schedule("wsd", frac, shape)
    optim.check_schedule("cosine", 0.0, "sqrt")  # keys only wsd reads


def test_muon_needs_torch_2_9_and_names(monkeypatch):
    with pytest.raises(UsageError, match="chooses parameters by name: pass model.named_parameters()"):
        optim.make_optimizers(tiny_model().parameters(), "muon", TRAIN_CFG)
    monkeypatch.delattr(torch.optim, "Muon")  # as on torch < 2.9
    with pytest.raises(UsageError, match=f"needs torch >= 2.9 .*this is torch {re.escape(torch.__version__)}"):
        optim.check_settings("muon", TRAIN_CFG)


def test_lion_matches_a_hand_computation():
    """Two steps of Chen et al.'s Algorithm 2 (with decoupled weight decay), worked out by hand."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = optim.Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    opt.step()  # m = 0: update = sign(0.1 g) = (1, -1, 0); p = p (1 - 0.05) - 0.1 update
    torch.testing.assert_close(p.data, torch.tensor([0.95 - 0.1, -1.9 + 0.1, 0.475]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.003, -0.001, 0.0]))  # 0.01 g
    p.grad = torch.tensor([-0.001, 0.2, -0.4])
    opt.step()  # c = 0.9 m + 0.1 g = (0.0026, 0.0191, -0.04): signs (1, 1, -1), though the first gradient is < 0
    torch.testing.assert_close(p.data, torch.tensor([0.85 * 0.95 - 0.1, -1.8 * 0.95 - 0.1, 0.475 * 0.95 + 0.1]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.99 * 0.003 - 0.00001, 0.99 * -0.001 + 0.002,
                                                                       -0.004]))


def test_muon_trains_block_matrices_and_adamw_the_rest_each_at_its_own_peak():
    model = tiny_model().train()
    opts = optim.make_optimizers(model.named_parameters(), "muon", TRAIN_CFG)
    muon, adamw = opts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert in_muon == sorted(n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {"tok_embeddings.weight", "norm.weight", "layers.0.attention_norm.weight"} <= in_adamw  # (head: tied)
    assert len(in_muon) + len(in_adamw) == len(names)
    optim.set_lr(opts, optim.lr_at(5, "cosine", 0.01, 0.001, 0, 10))  # half-way: 0.0055 at learning_rate's scale
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.0055) and muon.param_groups[0]["lr"] == pytest.approx(0.011)
    w = model.layers[0].feed_forward.w1.weight  # (96, 32): Muon's original adjustment scales by sqrt(96 / 32)
    ref = torch.nn.Parameter(w.detach().clone())
    step(model, opts)
    ref.grad = None
    alone = torch.optim.Muon([ref], lr=0.011, weight_decay=0.1, momentum=0.95)  # torch's Muon on that matrix alone
    g = torch.Generator().manual_seed(0)
    twin = tiny_model().train()
    twin(torch.randint(64, (2, 8), generator=g), torch.randint(64, (2, 8), generator=g))[1].backward()
    ref.grad = twin.layers[0].feed_forward.w1.weight.grad
    before = ref.detach().clone()
    alone.step()
    torch.testing.assert_close(w.detach(), ref.detach())
    update = (before * (1 - 0.011 * 0.1) - ref.detach()) / (0.011 * math.sqrt(3))  # decay, then lr * sqrt(3) * O
    assert 0.7 < torch.linalg.svdvals(update).max() < 1.5  # Newton-Schulz: the top singular values near 1


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_lora_trains_only_the_adapters_and_reports_the_registry_state(name):
    from lora import add_lora, memory_report
    model = tiny_model().train()
    add_lora(model, ("wq", "w2"), rank=2, alpha=4.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = optim.make_optimizers(model.named_parameters(), name, TRAIN_CFG)
    for it in range(2):  # B starts at 0: A moves from the second step
        step(model, opts, it)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]) != n.endswith((".lora_A", ".lora_B")), n
    # hand count for this model (tied head): adapters 2 layers x (wq: 2x32 + 32x2, w2: 2x96 + 32x2) = 768 elements,
    # all inside the blocks; the base has 2 x 12,288 elements in block matrices and 2,048 + 5 x 32 = 2,208 elsewhere
    states = optim.OPTIMIZERS[name].states
    off_blocks = 2 if name == "muon" else states  # Muon leaves those to AdamW
    assert optim.state_numel([(n, p) for n, p in model.named_parameters() if p.requires_grad], name) == 768 * states
    assert optim.state_numel(model.named_parameters(), name) == (768 + 24_576) * states + 2_208 * off_blocks
    lora, full = 768 * (1 + states), 768 + 24_576 + 2_208 + (768 + 24_576) * states + 2_208 * off_blocks
    mib = lambda n: f"{n * 4 / 2**20:.2f} MiB"  # noqa: E731
    assert memory_report(model, name).endswith(f"gradients + {name} state {mib(lora)} instead of {mib(full)} "
                                               f"(saves {mib(full - lora)})")
