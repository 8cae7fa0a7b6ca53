"""The one checkpoint writer and loader.

A checkpoint is a dict of plain data and tensors: {"model": state_dict, "model_args": dict,
"config": dict, "tokenizer": dict, "iter_num": int, "best_val_loss": float, "optimizer": ...,
"rng": ..., "sampler": ...}. It is written atomically and read with torch.load(weights_only=True),
which refuses pickled code: opening a checkpoint from a stranger cannot run their code.
"""
import contextlib
import os
import tempfile

import torch

from formats import read_foreign
from model import ModelArgs, Transformer


def current_umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path beside `path`; renamed onto it only if the body finishes, removed if it
    fails. Rename is atomic on POSIX: a crash or a full disk mid-write leaves the previous file intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual mode of a new file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(ckpt, path):
    """Atomically, and fsynced before the rename so a power cut cannot leave a renamed empty file."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, map_location="cpu"):
    """Read one of our checkpoints (a .pt file, or a run directory holding ckpt.pt) into its dict.
    A llama2.c model file (.bin) or a Hugging Face Llama folder is converted into the same dict."""
    foreign = read_foreign(path)
    if foreign is not None:
        return foreign
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint '{path}' not found; pass the ckpt.pt written by train.py "
                         f"(e.g. out/ckpt.pt) or its run directory")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: cannot read checkpoint '{path}' ({first[:200]}); it is truncated, corrupt "
                         f"or not a llamaforge checkpoint: re-train or re-export it")
    if isinstance(ckpt, dict) and "adapter" in ckpt and "model" not in ckpt:
        rank = ckpt.get("lora", {}).get("rank", "R")
        raise SystemExit(f"error: '{path}' is a LoRA adapter, not a full model; resume its run with --lora_rank={rank}, "
                         f"sample with generate.py --checkpoint=BASE --adapter={path}, or merge it with python lora.py merge")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise SystemExit(f"error: '{path}' is not a llamaforge checkpoint (no model/model_args entries); "
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


def build_model(ckpt, device="cpu"):
    """A Transformer with the checkpoint's architecture and weights."""
    try:
        args = ModelArgs.from_dict(ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: checkpoint has invalid model_args ({e}); re-train or re-export it")
    model = Transformer(args)
    state = clean_state_dict(ckpt["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head shares the embedding tensor: its absence from the file is expected
    missing = [k for k in missing if not (args.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise SystemExit(f"error: checkpoint weights do not match its model_args (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); the file is from another model or corrupt")
    return model.to(device)


def load_model(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint path."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, device)
    model.eval()
    return model, ckpt


def tokenizer_for(ckpt, override="", model_vocab=None):
    """The tokenizer to use with a checkpoint: override (a .model, 'gpt2', a GPT-2 BPE folder or a
    llama2.c tokenizer .bin) if given, else the one the checkpoint records (llama2.c files record none)."""
    from tokenizer import load_tokenizer, make_tokenizer
    if override:
        tok = make_tokenizer(override)
    elif ckpt.get("tokenizer"):
        tok = load_tokenizer(ckpt["tokenizer"])
    else:
        raise SystemExit("error: the checkpoint records no tokenizer (llama2.c files carry none); "
                         "pass --tokenizer=PATH (a SentencePiece .model, gpt2, or a llama2.c tokenizer .bin)")
    if model_vocab is not None and tok.vocab_size > model_vocab:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens but the model only {model_vocab}; "
                         f"pass the model's own tokenizer")
    return tok
