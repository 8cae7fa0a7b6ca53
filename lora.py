"""LoRA: train small low-rank adapters beside frozen base weights (Hu et al., 2021).

A target linear layer W (out x in) computes y = W x + (alpha / r) * B A dropout(x), with A (r x in)
random and B (out x r) zero at the start, so the adapted model starts out equal to the base. Only A
and B train: for a rank-8 adapter on the attention projections that is ~1-2% of the parameters, and
AdamW's two state tensors and the gradients exist for those alone.

The adapter is attached with a forward hook, not by swapping modules, so the base weights keep
their names (layers.0.attention.wq.weight) and model.py needs no LoRA code.

    python train.py config/lora_sft.py                       # train: out_dir/ckpt.pt holds adapters only
    python generate.py --checkpoint=BASE --adapter=out/lora_sft/ckpt.pt --chat=True --prompt="..."
    python export.py --format=merged --adapter=out/lora_sft/ckpt.pt --out=out/merged.pt   # a full checkpoint

An adapter checkpoint (train.py's ckpt.pt of a LoRA run) is a dict: "adapter" {"<layer>.lora_A"/"lora_B": tensor},
"lora" {rank, alpha, dropout, targets}, "base_checkpoint" (path), "base_fingerprint", plus the usual
optimizer/RNG/sampler state for an exact resume; checkpoint.py reads and loads it. export.py's PEFT
writer takes adapter_pairs(ckpt).
"""
import contextlib
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from optim import state_numel
from runtime import UsageError

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")  # attention projections; add "w1", "w2", "w3" for the FFN
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # every linear layer an adapter can go on


def _lora_hook(module, inputs, output):
    if module.lora_off:  # adapters_off: the base layer alone
        return output
    x = inputs[0]
    if module.lora_dropout > 0 and module.training:
        x = F.dropout(x, module.lora_dropout)
    return output + (x @ module.lora_A.t() @ module.lora_B.t()) * module.lora_scale


def add_lora(model, targets=DEFAULT_TARGETS, rank=8, alpha=16.0, dropout=0.0):
    """Freeze every base parameter and give each nn.Linear whose name ends in one of targets (e.g. "wq"
    matches layers.*.attention.wq) a trainable lora_A/lora_B pair. Returns the adapted layer names."""
    if not (rank > 0 and alpha > 0 and 0 <= dropout < 1):  # alpha 0 or dropout 1 trains nothing, silently
        raise UsageError(f"lora_rank={rank}, lora_alpha={alpha}, lora_dropout={dropout}: the rank and alpha must be "
                         f"> 0 and the dropout in [0, 1)")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise UsageError(f"lora_targets={tuple(targets)} match no linear layer; use names among "
                         f"wq, wk, wv, wo (attention), w1, w2, w3 (FFN), output")
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for n in names:
        m = modules[n]
        w = m.weight
        m.lora_A = nn.Parameter(torch.empty(rank, m.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA paper's code
        m.lora_B = nn.Parameter(torch.zeros(m.out_features, rank, device=w.device, dtype=w.dtype))
        m.lora_scale, m.lora_dropout, m.lora_off = alpha / rank, dropout, False
        m.lora_handle = m.register_forward_hook(_lora_hook)
    return names


@contextlib.contextmanager
def adapters_off(model):
    """The base model alone while the block runs (every adapter adds nothing), then the adapted one again: DPO's
    reference with one model in memory."""
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    for m in adapted:
        m.lora_off = True
    try:
        yield model
    finally:
        for m in adapted:
            m.lora_off = False


def lora_state_dict(model):
    """The adapter tensors only: {"layers.0.attention.wq.lora_A": ..., ...} (the small file)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def base_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}


def base_fingerprint(model):
    """A hash of the base weights' names, shapes and first values: cheap even for a 7B model, and
    different for any other base (another architecture, another training run, another step)."""
    h = hashlib.sha256()
    for k, v in sorted(base_state_dict(model).items()):
        h.update(f"{k}:{tuple(v.shape)};".encode())
        h.update(v.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()


def memory_report(model, optimizer):
    """One line: trainable vs total parameters, and the gradient + optimizer-state bytes LoRA saves."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bytes_per = next(model.parameters()).element_size()
    # gradient + optimizer state elements, each parameter's state count from the registry (optim.py)
    lora = trainable + state_numel([(n, p) for n, p in model.named_parameters() if p.requires_grad], optimizer)
    full = total + state_numel(model.named_parameters(), optimizer)
    return (f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
            f"gradients + {optimizer} state {lora * bytes_per / 2**20:.2f} MiB instead of "
            f"{full * bytes_per / 2**20:.2f} MiB (saves {(full - lora) * bytes_per / 2**20:.2f} MiB)")


def apply_adapter(model, ckpt, where="adapter"):
    """Attach the adapter checkpoint's LoRA layers to model (a base built from its base checkpoint)
    and load its tensors; refuses an adapter trained on other base weights."""
    fp = base_fingerprint(model)
    if fp != ckpt["base_fingerprint"]:
        raise UsageError(f"{where} was trained on a different base model (base fingerprint "
                         f"{ckpt['base_fingerprint'][:12]}, this base {fp[:12]}); pass the base it was made from: "
                         f"{ckpt.get('base_checkpoint')}")
    cfg = ckpt["lora"]
    add_lora(model, cfg["targets"], cfg["rank"], cfg["alpha"], cfg["dropout"])
    missing, unexpected = model.load_state_dict(ckpt["adapter"], strict=False)
    missing = [k for k in missing if k.endswith((".lora_A", ".lora_B"))]
    if missing or unexpected:
        raise UsageError(f"{where} does not fit this model (missing {missing[:2]}, unexpected {unexpected[:2]}); "
                         f"it is corrupt or from another architecture")
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W += scale * B A) and remove it: an ordinary model again."""
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.weight += (m.lora_B @ m.lora_A * m.lora_scale).to(m.weight.dtype)
            m.lora_handle.remove()
            del m.lora_A, m.lora_B, m.lora_scale, m.lora_dropout, m.lora_off, m.lora_handle
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_pairs(ckpt):
    """{"layers.0.attention.wq": (A (r, in), B (out, r)), ...}: what export.export_peft_adapter takes."""
    a = ckpt["adapter"]
    return {k[:-len(".lora_A")]: (a[k], a[k[:-1] + "B"]) for k in a if k.endswith(".lora_A")}
