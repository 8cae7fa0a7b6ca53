"""Optimizers and learning-rate schedules: parameter groups, a registry of optimizers (each with the number
of full-size state tensors it keeps per parameter), stepping inside backward, and the schedules as pure
functions of the iteration. train.py and bench.py's memory trace both build their optimizers here.

Adding an optimizer is one OPTIMIZERS entry (and its README row): a builder that takes (name, parameter) pairs,
the training config dict and whether to use fused kernels, and returns a list of torch optimizers. An optimizer
meant for some parameters only (Muon: the matrices inside the blocks) says which in `takes`; AdamW trains the rest.
"""
import math
import re
from collections import namedtuple

import torch

from runtime import UsageError, any_rank

# keys: the config keys it reads; takes(name, param): the parameters it trains itself (None = all)
Optimizer = namedtuple("Optimizer", "build states keys takes", defaults=(None,))


def _adamw(named, cfg, fused=False, foreach=None):
    # fused: one kernel for all parameters instead of a loop of small ones (CUDA only)
    return [torch.optim.AdamW(param_groups(named, cfg["weight_decay"]), lr=cfg["learning_rate"],
                              betas=(cfg["beta1"], cfg["beta2"]), fused=fused or None, foreach=foreach)]


def _sgd(named, cfg, fused=False, foreach=None):
    return [torch.optim.SGD(param_groups(named, cfg["weight_decay"]), lr=cfg["learning_rate"], momentum=cfg["momentum"],
                            nesterov=cfg["nesterov"] and cfg["momentum"] > 0, fused=fused or None, foreach=foreach)]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): every weight moves by lr times the
    sign of an interpolation of momentum and gradient; one state tensor (exp_avg, half AdamW's); decoupled weight
    decay. torch has no Lion, and these few lines are its whole algorithm."""

    def __init__(self, params, lr, betas, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(m.lerp(p.grad, 1 - beta1).sign_(), alpha=-group["lr"])  # sign(beta1 m + (1 - beta1) g)
                m.lerp_(p.grad, 1 - beta2)                                       # m = beta2 m + (1 - beta2) g
        return loss


def _lion(named, cfg, fused=False, foreach=None):
    return [Lion(param_groups(named, cfg["weight_decay"]), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))]


BLOCK_MATRIX = re.compile(r"(^|\.)layers\.\d+\.")  # attention and MLP weights (and LoRA factors) of a block


def _in_blocks(name, p):
    return p.dim() == 2 and BLOCK_MATRIX.search(name) is not None


def _muon(named, cfg, fused=False, foreach=None):
    # the group remembers its peak relative to learning_rate, so set_lr follows the schedule at muon_lr's scale
    return [torch.optim.Muon([{"params": [p for _, p in named], "lr_ratio": cfg["muon_lr"] / cfg["learning_rate"]}],
                             lr=cfg["muon_lr"], weight_decay=cfg["weight_decay"], momentum=cfg["muon_momentum"],
                             adjust_lr_fn=cfg["muon_adjust_lr_fn"])]


OPTIMIZERS = {
    "adamw": Optimizer(_adamw, 2, ("learning_rate", "weight_decay", "beta1", "beta2")),     # exp_avg, exp_avg_sq
    "sgd": Optimizer(_sgd, 1, ("learning_rate", "weight_decay", "momentum", "nesterov")),   # momentum buffer
    "lion": Optimizer(_lion, 1, ("learning_rate", "weight_decay", "beta1", "beta2")),       # exp_avg
    # momentum buffer on the block matrices; AdamW (learning_rate, beta1, beta2) trains embeddings, norms and head
    "muon": Optimizer(_muon, 1, ("learning_rate", "weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum",
                                 "muon_adjust_lr_fn"), _in_blocks),
}
MUON_ADJUST = ("original", "match_rms_adamw")  # torch's adjust_lr_fn: Keller Jordan's, or Moonshot's RMS match


def check_settings(name, cfg):
    """Stop on settings torch would reject mid-run, or that make no sense, before any work is done."""
    if name not in OPTIMIZERS:
        raise UsageError(f"optimizer='{name}' is not one of {', '.join(repr(k) for k in OPTIMIZERS)}")
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        raise UsageError(f"optimizer='muon' needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}: "
                         f"upgrade torch or choose another optimizer")
    ranges = {"learning_rate": (0, None, "> 0"), "muon_lr": (0, None, "> 0"), "weight_decay": (0, None, ">= 0"),
              "beta1": (0, 1, "in [0, 1)"), "beta2": (0, 1, "in [0, 1)"), "momentum": (0, 1, "in [0, 1)"),
              "muon_momentum": (0, 1, "in [0, 1)")}
    for key in OPTIMIZERS[name].keys:
        lo, hi, what = ranges.get(key, (None, None, ""))
        v = cfg[key]
        bad = (lo is not None and (v < lo or (what == "> 0" and v == 0))) or (hi is not None and v >= hi)
        if bad:
            raise UsageError(f"{key}={v} must be {what} for optimizer='{name}'")
    if "muon_adjust_lr_fn" in OPTIMIZERS[name].keys and cfg["muon_adjust_lr_fn"] not in MUON_ADJUST:
        raise UsageError(f"muon_adjust_lr_fn={cfg['muon_adjust_lr_fn']!r} is not one of "
                         f"{', '.join(map(repr, MUON_ADJUST))}")


def param_groups(named, weight_decay):
    """Weight decay on matrices and embeddings only; norms and biases (1-D) are left alone. No empty group."""
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def split_params(params, name):
    """params as [(optimizer name, (name, param) pairs)]: the optimizer's own, then AdamW's for what it does not
    take. params: model.named_parameters() (plain tensors do for optimizers that take everything)."""
    named = [(None, x) if torch.is_tensor(x) else tuple(x) for x in params]
    takes = OPTIMIZERS[name].takes
    if takes is None:
        return [(name, named)]
    if any(n is None for n, _ in named):
        raise UsageError(f"optimizer='{name}' chooses parameters by name: pass model.named_parameters()")
    own = [(n, p) for n, p in named if takes(n, p)]
    rest = [(n, p) for n, p in named if not takes(n, p)]
    return [(opt, pairs) for opt, pairs in ((name, own), ("adamw", rest)) if pairs]


def state_numel(params, name):
    """Elements of full-size optimizer state that params need under optimizer `name`."""
    return sum(OPTIMIZERS[opt].states * p.numel() for opt, pairs in split_params(params, name) for _, p in pairs)


def use_fused(name, device_type, dtype):
    """Fused kernels on CUDA, except SGD under float16 loss scaling: fused SGD creates its momentum buffers
    even on a step the scaler skips for inf/nan gradients, leaving them uninitialised memory that later
    steps then use as momentum."""
    return device_type == "cuda" and not (name == "sgd" and dtype == "float16")


def step_in_backward(opts):
    def hook(p):  # autograd calls this once p.grad holds this backward's full gradient
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)  # free it now: only the gradients still being computed are alive
    return hook


def check_in_backward(grad_clip, accumulation, ddp, dtype):
    """optimizer_in_backward steps each parameter the moment its own gradient is complete, so nothing may
    need all gradients at once."""
    if grad_clip > 0:
        raise UsageError(f"optimizer_in_backward=True cannot clip the global grad norm (grad_clip={grad_clip}): "
                         f"no step holds every gradient; set --grad_clip=0")
    if accumulation > 1:
        raise UsageError(f"optimizer_in_backward=True steps after every backward, so gradient_accumulation_steps="
                         f"{accumulation} cannot accumulate; set --gradient_accumulation_steps=1 (raise batch_size "
                         f"instead)")
    if ddp:
        raise UsageError("optimizer_in_backward=True would step on each rank's local gradient before DDP averages it; "
                         "run without torchrun")
    if dtype == "float16":
        raise UsageError("optimizer_in_backward=True cannot use float16 loss scaling (it checks every gradient for inf "
                         "before stepping); use --dtype=bfloat16")


def make_optimizers(params, name, cfg, fused=False, in_backward=False, foreach=None):
    """The optimizers for the trainable params (model.named_parameters()), as a list: one, or Muon's and AdamW's.
    in_backward: one small optimizer per parameter tensor (same math as one over all of them), stepped by a hook
    the moment that tensor's gradient is complete and then freed, so no full set of gradients is ever held."""
    trainable = [x for x in params if (x if torch.is_tensor(x) else x[1]).requires_grad]
    parts = [(OPTIMIZERS[opt].build, pairs) for opt, pairs in split_params(trainable, name)]
    if not in_backward:
        return [o for build, pairs in parts for o in build(pairs, cfg, fused, foreach)]
    opts = []
    for build, pairs in parts:
        for n, p in pairs:
            mine = build([(n, p)], cfg, fused, foreach)
            p.register_post_accumulate_grad_hook(step_in_backward(mine))
            opts += mine
    return opts


def clip_and_step(opts, scaler, params, grad_clip, skip_nonfinite=None, stepped_in_backward=False):
    """End an optimizer step whose gradients are accumulated: unscale them (float16), clip their global norm to
    grad_clip (0 = no clipping), step and zero every optimizer. skip_nonfinite: the step's loss, and if it or any
    gradient is nan/inf on any rank the step is skipped on every rank (one host sync). Returns (grad_norm, skipped).
    stepped_in_backward: the hooks have already stepped every parameter; only the check is left."""
    params = [p for p in params if p.grad is not None]
    if grad_clip > 0:
        for o in opts:
            scaler.unscale_(o)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.zeros(())
    skip = False
    if skip_nonfinite is not None:
        total = torch.stack([p.grad.norm() for p in params]).norm() if params else torch.zeros(())
        skip = any_rank(~(torch.isfinite(skip_nonfinite) & torch.isfinite(total.to(skip_nonfinite.device))))
    if skip:
        for o in opts:
            o.zero_grad(set_to_none=True)
        if scaler.is_enabled():  # as the scaler does for an inf gradient: a smaller scale, no step
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    elif not stepped_in_backward:
        for o in opts:
            scaler.step(o)
        scaler.update()
        for o in opts:
            o.zero_grad(set_to_none=True)
    return grad_norm, skip


def set_lr(opts, lr):
    """lr is the schedule's value at learning_rate's scale; a group with its own peak (Muon's) keeps its ratio."""
    for o in opts:
        for group in o.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)


# ---- schedules -----------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "constant", "onecycle", "wsd")
COOLDOWN_SHAPES = ("linear", "1-sqrt")


def check_schedule(schedule, cooldown_frac, cooldown_shape):
    if schedule not in SCHEDULES:
        raise UsageError(f"lr_schedule='{schedule}' is not one of {', '.join(SCHEDULES)}")
    if schedule == "wsd" and not (0 < cooldown_frac <= 1 and cooldown_shape in COOLDOWN_SHAPES):
        raise UsageError(f"lr_schedule='wsd' needs cooldown_frac in (0, 1] (got {cooldown_frac}) and cooldown_shape "
                         f"one of {', '.join(map(repr, COOLDOWN_SHAPES))} (got {cooldown_shape!r})")


def lr_at(it, schedule, lr, min_lr, warmup, max_iters, decay_iters=0, cooldown_frac=0.2, cooldown_shape="1-sqrt"):
    """The learning rate of iteration it (0-based).
    cosine:   linear warmup to lr over `warmup` iterations, cosine down to min_lr at decay_iters (0 = max_iters),
              then min_lr.
    constant: the same warmup, then lr for good (continual training on new data).
    onecycle: from lr/25 up to lr over warmup iterations (0 = 30% of the run), then cosine to min_lr at max_iters.
    wsd:      warmup-stable-decay: the same warmup, lr until the last cooldown_frac of the run to decay_iters
              (0 = max_iters), then down to min_lr there, on a straight line or as 1 - sqrt(progress) (Hägele et al.
              2024: a 20% 1-sqrt cooldown matches cosine, and the stable phase can be continued before it).
    Only the learning rate changes; momentum and betas stay as configured."""
    if schedule == "onecycle":
        warmup = warmup or max(1, int(0.3 * max_iters))
        if it < warmup:
            return lr / 25 + (lr - lr / 25) * it / warmup
        ratio = min(1.0, (it - warmup) / max(1, max_iters - warmup))
        return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    decay_iters = decay_iters or max_iters
    if it >= decay_iters:
        return min_lr
    if schedule == "wsd":
        start = max(warmup, decay_iters - round(cooldown_frac * decay_iters))
        if it < start:
            return lr
        done = (it - start) / max(1, decay_iters - start)
        return min_lr + (lr - min_lr) * (1 - (done if cooldown_shape == "linear" else math.sqrt(done)))
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    assert 0 <= ratio <= 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)
