"""The one checkpoint writer and loader, and the one atomic writer of files and folders.

A checkpoint is a dict of plain data and tensors: {"model": state_dict, "model_args": dict,
"config": dict, "tokenizer": dict, "iter_num": int, "best_val_loss": float, "optimizer": ...,
"rng": ..., "sampler": ...}. It is written atomically and read with torch.load(weights_only=True),
which refuses pickled code: opening a checkpoint from a stranger cannot run their code.
"""
import hashlib
import json
import os
import struct

import torch

from formats import LLAMA2C_MAGIC, read_gguf, read_llama2c
from hf import read_hf
from lora import apply_adapter, merge_lora
from model import ModelArgs, Transformer
from quant import is_int8, to_int8
from runtime import UsageError, atomic_file
from tokenizer import load_tokenizer, make_tokenizer, tokenizer_mismatch

def save_checkpoint(ckpt, path):
    """Atomically (see atomic_file): the previous checkpoint survives any failure to write this one."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)


def read_foreign(path, int8=False):
    """A checkpoint dict if path is a llama2.c model file, a GGUF file or a Hugging Face folder, else None.
    int8=True keeps a llama2.c version-2 file's int8 weights as they are (formats.read_llama2c)."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) \
            and not os.path.isfile(os.path.join(path, "ckpt.pt")):
        return read_hf(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"GGUF":
            return read_gguf(path)
        if path.endswith(".bin") or (len(head) == 4 and struct.unpack("<I", head)[0] == LLAMA2C_MAGIC):
            return read_llama2c(path, int8=int8)
    return None


def read_pt(path, what, fix, map_location="cpu", mmap=False):
    """torch.load with weights_only=True: tensors and plain data only, never pickled code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read {what} '{path}' ({first}); {fix}")


def load_checkpoint(path, map_location="cpu", int8=False):
    """Read one of our checkpoints (a .pt file, or a run directory holding ckpt.pt) into its dict.
    A llama2.c model file (.bin) or a Hugging Face Llama folder is converted into the same dict."""
    foreign = read_foreign(path, int8)
    if foreign is not None:
        return foreign
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        what = "is a folder with no ckpt.pt (nor a Hugging Face config.json)" if os.path.isdir(path) else "not found"
        raise UsageError(f"checkpoint '{path}' {what}; pass the ckpt.pt written by train.py (e.g. out/ckpt.pt) or "
                         f"its run directory, a llama2.c .bin, a GGUF file or a Hugging Face Llama folder")
    ckpt = read_pt(path, "checkpoint", "it is truncated, corrupt or not a llamaforge checkpoint: re-train or "
                                       "re-export it", map_location)
    if isinstance(ckpt, dict) and "adapter" in ckpt and "model" not in ckpt:
        rank = ckpt.get("lora", {}).get("rank", "R")
        raise UsageError(f"'{path}' is a LoRA adapter, not a full model; resume its run with --lora_rank={rank}, "
                         f"sample with generate.py --checkpoint=BASE --adapter={path}, or merge it with "
                         f"python export.py --adapter={path} --format=ours --out=merged.pt")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UsageError(f"'{path}' is not a llamaforge checkpoint (no model/model_args entries); "
                         f"pass a ckpt.pt written by train.py")
    return ckpt


def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def materialize(model):
    """Uninitialised CPU tensors for a meta-device model's parameters, a tied one once (what module.to_empty
    does, without its meta empty_like, whose first call imports ~0.4 s of torch's symbolic-shape code)."""
    made = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                m._parameters[name] = made[id(p)]


def build_model(ckpt, device="cpu"):
    """A Transformer with the checkpoint's architecture and weights."""
    try:
        args = ModelArgs.from_dict(ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"checkpoint has invalid model_args ({e}); re-train or re-export it")
    with torch.device("meta"):  # no memory and no random init: every weight comes from the checkpoint
        model = Transformer(args)
    state = clean_state_dict(ckpt["model"])
    int8 = any(k.endswith(".q") for k in state)
    if int8:  # a llama2.c v2 file read as stored: the int8 layers take its tensors as they are (inference only)
        try:
            to_int8(model, state=state)
        except KeyError as e:
            raise UsageError(f"checkpoint has int8 weights but no {e.args[0]}; the file is corrupt")
    else:  # real tensors, uninitialised, then loaded by copy (the model never shares memory with ckpt)
        materialize(model)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=int8)
    # a tied head shares the embedding tensor: its absence from the file is expected
    missing = [k for k in missing if not (args.tie_embeddings and k.startswith("output."))]
    if missing or unexpected:
        raise UsageError(f"checkpoint weights do not match its model_args (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); the file is from another model or corrupt")
    model = model.to(device)
    if int8 and args.tie_embeddings:  # .to() moves each module's buffers on their own: one int8 table again
        model.output.q, model.output.scale = model.tok_embeddings.q, model.tok_embeddings.scale
    return model


def load_model(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint path."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, device)
    model.eval()
    return model, ckpt


def tokenizer_for(ckpt, override="", model_vocab=None):
    """The tokenizer to use with a checkpoint: override (a .model, 'gpt2', a GPT-2 BPE folder or a
    llama2.c tokenizer .bin) if given, else the one the checkpoint records (llama2.c files record none)."""
    if override:
        tok = make_tokenizer(override)
    elif ckpt.get("tokenizer"):
        tok = load_tokenizer(ckpt["tokenizer"])
    else:
        raise UsageError("the checkpoint records no tokenizer (llama2.c files carry none); "
                         "pass --tokenizer=PATH (a SentencePiece .model, gpt2, or a llama2.c tokenizer .bin)")
    if model_vocab is not None and tok.vocab_size > model_vocab:
        raise UsageError(f"tokenizer has {tok.vocab_size} tokens but the model only {model_vocab}; "
                         f"pass the model's own tokenizer")
    return tok


def read_adapter(path):
    """A LoRA run's checkpoint (adapters, settings, base path and fingerprint), refusing anything else."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UsageError(f"adapter '{path}' not found; pass the ckpt.pt of a LoRA run (train.py with lora_rank > 0)")
    ckpt = read_pt(path, "adapter", "re-train it")
    if not isinstance(ckpt, dict) or "adapter" not in ckpt or "lora" not in ckpt:
        raise UsageError(f"'{path}' is not a LoRA adapter (no adapter/lora entries); pass the ckpt.pt of a run with "
                         f"lora_rank > 0")
    return ckpt


def check_tokenizers(ckpt_tok, other_tok, what, fix):
    """Refuse to pair a checkpoint with data or an adapter made with another tokenizer: kind, vocab size,
    chat specials and the vocab's content hash must all agree."""
    diff = ckpt_tok is not None and other_tok is not None and tokenizer_mismatch(ckpt_tok, other_tok)
    if diff:
        raise UsageError(f"tokenizer mismatch: {what} differ in {diff}; {fix}")


def load_with_adapter(base_path, adapter_path, device="cpu"):
    """(model in eval mode with the adapter attached, base checkpoint dict, adapter checkpoint dict).
    base_path "" means the base the adapter recorded when it was trained."""
    ad = read_adapter(adapter_path)
    base_path = base_path or ad.get("base_checkpoint")
    base = load_checkpoint(base_path)
    check_tokenizers(base.get("tokenizer"), ad.get("tokenizer"), f"adapter {adapter_path} and {base_path}",
                     f"pass the base it was made from: {ad.get('base_checkpoint')}")
    model = apply_adapter(build_model(base), ad, f"adapter {adapter_path}")
    return model.to(device).eval(), base, ad


def load_for_training(path, resume, adapter, data_tokenizer, data_dir, dropout):
    """(model, checkpoint dict, absolute path of the base weights) to continue or fine-tune from `path`. A LoRA
    run's own checkpoint (resume with adapter) holds adapters only: its weights come from the base it names.
    The base must have been trained with the data's tokenizer."""
    ckpt = read_adapter(path) if resume and adapter else load_checkpoint(path)
    base = load_checkpoint(ckpt["base_checkpoint"]) if "adapter" in ckpt else ckpt
    tok = base.get("tokenizer") or {}
    check_tokenizers(base.get("tokenizer"), data_tokenizer, f"checkpoint {path} and {data_dir}",
                     f"pretokenize the data with --tokenizer={tok.get('path') or tok.get('kind')}")
    base["model_args"]["dropout"] = dropout  # dropout is a training choice, not architecture
    return build_model(base), ckpt, os.path.abspath(ckpt.get("base_checkpoint") or path)


WEIGHTS = ("auto", "fp32", "int8")


def load_any(path, adapter="", device="cpu", weights="auto"):
    """(model in eval mode, checkpoint dict) for generate/evaluate/export: a checkpoint, or a base plus a
    LoRA adapter on top of it. weights: 'auto' as the file stores them (a llama2.c version-2 file stays int8,
    read without dequantizing), 'fp32' (a v2 file dequantized), 'int8' (quant.to_int8 in llama2.c's groups;
    an adapter is merged into the base first)."""
    if weights not in WEIGHTS:
        raise UsageError(f"weights={weights!r} is not one of {', '.join(map(repr, WEIGHTS))}")
    if adapter:
        model, base, _ = load_with_adapter(path, adapter, device)
        return (to_int8(merge_lora(model)) if weights == "int8" else model), base
    ckpt = load_checkpoint(path, int8=weights != "fp32")
    model = build_model(ckpt, device).eval()
    if weights == "int8" and not is_int8(model):
        to_int8(model)
    return model, ckpt


# what a resumed run may not change (its weights and optimizer state would not fit), and what changes its
# learning-rate curve; keys of the running session (where to write, which device, speed knobs) are the
# new command's own and are never taken from the checkpoint
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "hidden_dim", "tie_embeddings", "norm_eps",
                "rope_theta", "optimizer", "optimizer_in_backward", "lora_rank", "lora_alpha", "lora_targets")
SCHEDULE = ("max_iters", "learning_rate", "lr_schedule", "warmup_iters", "lr_decay_iters", "min_lr", "muon_lr",
            "cooldown_frac", "cooldown_shape")
SESSION = ("init_from", "out_dir", "device", "compile", "progress", "stop_at_iter", "eval_only", "overwrite",
           "write_checkpoints", "memory_cap_gb", "activation_checkpointing", "checkpoint_blocks", "loss_chunk_size")


def resume_config(path, config, explicit):
    """The config of a run resumed from checkpoint `path`: the saved config, with the keys given on this
    command line (`explicit`) and the session keys on top. Returns (config, notes to print); refuses a new
    architecture or optimizer, and notes a changed schedule (the run's curve from here then differs)."""
    if not os.path.isfile(path):
        raise UsageError(f"init_from='resume' but {path} does not exist; train with init_from='scratch' first or fix "
                         f"out_dir")
    ckpt = read_pt(path, "checkpoint", "it is truncated or corrupt: resume from a copy or train from scratch",
                   mmap=True)  # mmap: only the config is read now
    saved = ckpt.get("config") or {}
    out, notes = dict(config), [f"resuming {path} from iter {ckpt.get('iter_num', 0):,} of "
                                f"{config['max_iters'] if 'max_iters' in explicit else saved.get('max_iters')}"]
    for key, old in saved.items():
        if key not in out or key in SESSION:
            continue
        if key not in explicit or out[key] == old:
            out[key] = old
        elif key in ARCHITECTURE:
            raise UsageError(f"{key}={out[key]!r} but {path} was trained with {key}={old!r}; a resumed run keeps "
                             f"it: drop the flag, or start a new run from its weights with --init_from={path}")
        elif key in SCHEDULE:
            notes.append(f"warning: {key} changed from {old!r} to {out[key]!r}: the learning-rate curve from here "
                         f"differs from the uninterrupted run's")
    return out, notes


def restore_training(ckpt, where, opts, scaler, sampler, rank, device):
    """Put back what a run saved besides its weights, so that it continues exactly: optimizer states, the
    loss scaler, this rank's data sampler and its CPU/CUDA random states (dropout)."""
    states = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
    if len(states) != len(opts):
        raise UsageError(f"{where} holds optimizer state saved with a different optimizer_in_backward setting; "
                         f"resume with the same setting")
    for o, state in zip(opts, states):
        ratios = [g.get("lr_ratio") for g in o.param_groups]  # this run's (muon_lr is a schedule key, like lr)
        o.load_state_dict(state)
        for g, r in zip(o.param_groups, ratios):
            if r is not None:
                g["lr_ratio"] = r
    if ckpt.get("scaler") and scaler.is_enabled():  # empty when saved by a bf16/fp32 run
        scaler.load_state_dict(ckpt["scaler"])
    if rank < len(ckpt.get("sampler", [])):
        sampler.set_state(ckpt["sampler"][rank])
    rng = ckpt.get("rng", {})
    if rank < len(rng.get("cpu", [])):
        torch.set_rng_state(rng["cpu"][rank])
    if torch.device(device).type == "cuda" and rank < len(rng.get("cuda", [])):
        torch.cuda.set_rng_state(rng["cuda"][rank], device)


class MetricsLog:
    """A run's metrics.jsonl: one JSON line per record. A new run starts a new log; a resumed one keeps the
    lines up to its checkpoint and drops the rest, which it will write again, identically. The same numbers
    can go to TensorBoard (event files in tensorboard_dir; a resumed run purges the steps it repeats) and to
    Weights & Biases (project wandb_project; one run id per out_dir, so a resumed run continues its run)."""

    def __init__(self, path, resume_iter=None, enabled=True, tensorboard_dir="", wandb_project="", config=None):
        self.path, self.enabled, self.tb, self.wandb = path, enabled, None, None
        if not enabled:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("tensorboard=True needs the tensorboard package: pip install tensorboard")
            self.tb = SummaryWriter(tensorboard_dir, purge_step=resume_iter)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UsageError("wandb_project needs the wandb package: pip install wandb (WANDB_MODE=offline to "
                                 "log without an account)")
            run_id = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
            self.wandb = wandb.init(project=wandb_project, id=run_id, resume="allow", config=config,
                                    dir=os.path.dirname(os.path.abspath(path)))
        if not os.path.exists(path):
            return
        if resume_iter is None:
            os.remove(path)
            return
        with open(path) as f:
            kept = [ln for ln in f if ln.strip() and json.loads(ln).get("iter", 0) <= resume_iter]
        with atomic_file(path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        kind, step = record.get("type", "log"), record.get("iter", 0)
        numbers = {f"{kind}/{k}": v for k, v in record.items() if k not in ("type", "iter")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            if kind == "sample":
                self.tb.add_text(f"sample/{record['prompt']}", record["text"], step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers if kind != "sample" else {f"sample/{record['prompt']}": record["text"]}, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
