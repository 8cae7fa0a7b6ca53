"""Optimizers and learning-rate schedules: parameter groups, a registry of optimizers (each with the number
of full-size state tensors it keeps per parameter), stepping inside backward, and the schedules as pure
functions of the iteration. train.py and bench.py's memory trace both build their optimizers here.

Adding an optimizer is one OPTIMIZERS entry (and its README row): a builder that takes the parameter
groups, the training config dict and whether to use fused kernels, and returns a list of torch optimizers.
"""
import math
from collections import namedtuple

import torch

from runtime import UsageError, any_rank

Optimizer = namedtuple("Optimizer", "build states keys")  # keys: the config keys it reads


def _adamw(groups, cfg, fused=False, foreach=None):
    # fused: one kernel for all parameters instead of a loop of small ones (CUDA only)
    return [torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                              fused=fused or None, foreach=foreach)]


def _sgd(groups, cfg, fused=False, foreach=None):
    return [torch.optim.SGD(groups, lr=cfg["learning_rate"], momentum=cfg["momentum"],
                            nesterov=cfg["nesterov"] and cfg["momentum"] > 0, fused=fused or None, foreach=foreach)]


OPTIMIZERS = {
    "adamw": Optimizer(_adamw, 2, ("learning_rate", "weight_decay", "beta1", "beta2")),     # exp_avg, exp_avg_sq
    "sgd": Optimizer(_sgd, 1, ("learning_rate", "weight_decay", "momentum", "nesterov")),   # momentum buffer
}


def check_settings(name, cfg):
    """Stop on settings torch would reject mid-run, or that make no sense, before any work is done."""
    if name not in OPTIMIZERS:
        raise UsageError(f"optimizer='{name}' is not one of {', '.join(repr(k) for k in OPTIMIZERS)}")
    ranges = {"learning_rate": (0, None, "> 0"), "weight_decay": (0, None, ">= 0"), "beta1": (0, 1, "in [0, 1)"),
              "beta2": (0, 1, "in [0, 1)"), "momentum": (0, 1, "in [0, 1)")}
    for key in OPTIMIZERS[name].keys:
        lo, hi, what = ranges.get(key, (None, None, ""))
        v = cfg[key]
        bad = (lo is not None and (v < lo or (key == "learning_rate" and v == 0))) or (hi is not None and v >= hi)
        if bad:
            raise UsageError(f"{key}={v} must be {what} for optimizer='{name}'")


def param_groups(params, weight_decay):
    """Weight decay on matrices and embeddings only; norms and biases (1-D) are left alone."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


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
    """The optimizers for the trainable params, as a list. in_backward: one small optimizer per parameter
    tensor (same math as one over all of them), stepped by a hook the moment that tensor's gradient is
    complete and then freed, so no full set of gradients is ever held."""
    groups = param_groups([p for p in params if p.requires_grad], cfg["weight_decay"])
    build = OPTIMIZERS[name].build
    if not in_backward:
        return build(groups, cfg, fused, foreach)
    opts = []
    for g in groups:
        for p in g["params"]:
            mine = build([{**g, "params": [p]}], cfg, fused, foreach)
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
    for o in opts:
        for group in o.param_groups:
            group["lr"] = lr


# ---- schedules -----------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "constant", "onecycle")


def lr_at(it, schedule, lr, min_lr, warmup, max_iters, decay_iters=0):
    """The learning rate of iteration it (0-based).
    cosine:   linear warmup to lr over `warmup` iterations, cosine down to min_lr at decay_iters (0 = max_iters),
              then min_lr.
    constant: the same warmup, then lr for good (continual training on new data).
    onecycle: from lr/25 up to lr over warmup iterations (0 = 30% of the run), then cosine to min_lr at max_iters.
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
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    assert 0 <= ratio <= 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)
