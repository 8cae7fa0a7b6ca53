"""Readers for other tools' model files, and the name tables export.py shares with them.

load_checkpoint (checkpoint.py) calls read_foreign(path) first, so every script that takes a checkpoint
also takes a llama2.c model file (.bin: legacy, version 1 or version 2 / Q8_0) or a Hugging Face Llama
folder (config.json + model.safetensors, or shards listed in model.safetensors.index.json). Both become
the same checkpoint dict train.py writes. Sizes and header fields are checked before a single weight
is read, so a truncated download is one line of error, not a reshape crash deep inside numpy.

Tensor names: ours (llama2.c's) -> Hugging Face (hf_key) and GGUF (gguf_name), from one table (NAMES).
"""
import json
import os
import struct

import numpy as np
import torch

from model import ModelArgs, precompute_rope
from runtime import UsageError
from tokenizer import make_tokenizer

LLAMA2C_MAGIC = 0x616b3432  # "ak42" as a little-endian uint32: llama2.c's versioned files start with it
LLAMA2C_HEADER = 256        # versioned files pad their header to 256 bytes
RUNC_NORM_EPS, RUNC_ROPE_THETA = 1e-5, 10000.0  # hard-coded in run.c, so not stored in its files


def layer_keys(i):
    """Our names for layer i's tensors, in the order llama2.c's files group them."""
    p = f"layers.{i}."
    return {"attention_norm": p + "attention_norm.weight", "wq": p + "attention.wq.weight",
            "wk": p + "attention.wk.weight", "wv": p + "attention.wv.weight", "wo": p + "attention.wo.weight",
            "ffn_norm": p + "ffn_norm.weight", "w1": p + "feed_forward.w1.weight",
            "w2": p + "feed_forward.w2.weight", "w3": p + "feed_forward.w3.weight"}


def imported_ckpt(state, args, source, fmt, tokenizer=None):
    """The checkpoint dict train.py would have written, for weights that came from elsewhere."""
    state = {k: v.float().contiguous() for k, v in state.items()}
    if args.tie_embeddings:  # what model.state_dict() holds for a tied head: the same tensor twice
        state["output.weight"] = state["tok_embeddings.weight"]
    return {"model": state, "model_args": args.to_dict(), "config": {"imported_from": os.path.abspath(source),
            "format": fmt}, "tokenizer": tokenizer, "iter_num": 0, "best_val_loss": None}


def read_foreign(path):
    """A checkpoint dict if path is a llama2.c model file or a Hugging Face folder, else None."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) \
            and not os.path.isfile(os.path.join(path, "ckpt.pt")):
        return read_hf(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if path.endswith(".bin") or (len(head) == 4 and struct.unpack("<I", head)[0] == LLAMA2C_MAGIC):
            return read_llama2c(path)
    return None


# ---------------------------------------------------------------------------------------------------
# llama2.c model files (layout: karpathy/llama2.c export.py; run.c reads legacy, runq.c version 2)

def llama2c_header(path):
    """(version, header dict, offset of the first weight) from the first bytes of a llama2.c file."""
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER)
    if len(head) < 28:
        raise UsageError(f"{path} holds {len(head)} bytes, too few for a llama2.c header (28); "
                         f"the file is truncated or not a llama2.c model")
    magic = struct.unpack_from("<I", head, 0)[0]
    if magic == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2) or len(head) < LLAMA2C_HEADER:
            raise UsageError(f"{path} is a llama2.c file of version {version} with a {len(head)}-byte "
                             f"header; only versions 1 and 2 (256-byte header) are known")
        fields, offset = struct.unpack_from("<7i", head, 8), LLAMA2C_HEADER
        shared = head[36] == 1
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else None
    else:  # legacy: seven int32s, a negative vocab_size flags an unshared classifier
        version, fields, offset, group_size = 0, struct.unpack_from("<7i", head, 0), 28, None
        shared = fields[5] > 0
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = fields
    h = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
             vocab_size=abs(vocab), max_seq_len=seq, shared=shared, group_size=group_size)
    sane = (0 < dim <= 65536 and 0 < hidden <= 1 << 20 and 0 < n_layers <= 1024 and 0 < n_heads <= dim
            and 0 < n_kv <= n_heads and n_heads % n_kv == 0 and dim % n_heads == 0
            and (dim // n_heads) % 2 == 0 and 0 < abs(vocab) <= 1 << 22 and 0 < seq <= 1 << 22
            and (group_size is None or (0 < group_size and dim % group_size == 0)))
    if not sane:
        raise UsageError(f"{path} has an impossible llama2.c header {h} (version {version}); "
                         f"the file is corrupt or not a llama2.c model")
    return version, h, offset


def llama2c_shapes(h):
    """[(name, shape)] of every weight a llama2.c file stores, grouped by kind across layers as it
    stores them (all wq, then all wk, ...). Legacy order; versions 1/2 reorder, see llama2c_order."""
    d, hd, L, kv = h["dim"], h["hidden_dim"], h["n_layers"], h["dim"] * h["n_kv_heads"] // h["n_heads"]
    shape = {"attention_norm": (d,), "wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d),
             "ffn_norm": (d,), "w1": (hd, d), "w2": (d, hd), "w3": (hd, d)}
    per_layer = lambda kind: [(layer_keys(i)[kind], shape[kind]) for i in range(L)]
    return {"tok": [("tok_embeddings.weight", (h["vocab_size"], d))],
            **{kind: per_layer(kind) for kind in shape},
            "norm": [("norm.weight", (d,))],
            "out": [] if h["shared"] else [("output.weight", (h["vocab_size"], d))]}


def llama2c_order(version, h):
    """[(name, shape, how)] in file order; how is "f32", "q8" (int8 + fp32 scales) or "rope" (skipped)."""
    s = llama2c_shapes(h)
    if version == 0:
        hs = h["dim"] // h["n_heads"]
        rope = [("rope.cos", (h["max_seq_len"], hs // 2)), ("rope.sin", (h["max_seq_len"], hs // 2))]
        kinds = ["tok", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm"]
        return [(n, sh, "f32") for k in kinds for n, sh in s[k]] + [(n, sh, "rope") for n, sh in rope] \
            + [(n, sh, "f32") for n, sh in s["out"]]
    norms = [(n, sh, "f32") for k in ("attention_norm", "ffn_norm", "norm") for n, sh in s[k]]
    mats = [(n, sh) for k in ("tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "out") for n, sh in s[k]]
    if version == 1:  # norms first, then the embedding and matrices, all fp32
        return norms + [(n, sh, "f32") for n, sh in mats]
    return norms + [(n, sh, "q8") for n, sh in mats]


def llama2c_nbytes(order, group_size):
    total = 0
    for _, shape, how in order:
        n = int(np.prod(shape))
        total += n + 4 * (n // group_size) if how == "q8" else 4 * n
    return total


def read_llama2c(path, tokenizer=None):
    version, h, offset = llama2c_header(path)
    order = llama2c_order(version, h)
    expected, actual = offset + llama2c_nbytes(order, h["group_size"]), os.path.getsize(path)
    if expected != actual:
        raise UsageError(f"{path} should hold {expected:,} bytes for its llama2.c header "
                         f"(version {version}, {h}) but holds {actual:,}; the file is truncated or corrupt")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    state, pos = {}, offset
    for name, shape, how in order:
        n = int(np.prod(shape))
        if how == "q8":
            q = raw[pos:pos + n].view(np.int8).astype(np.float32).reshape(-1, h["group_size"])
            scale = raw[pos + n:pos + n + 4 * (n // h["group_size"])].view("<f4")
            state[name] = torch.from_numpy((q * scale[:, None]).reshape(shape))
            pos += n + 4 * (n // h["group_size"])
        else:
            t = torch.from_numpy(raw[pos:pos + 4 * n].view("<f4").reshape(shape).copy())
            pos += 4 * n
            if how == "f32":
                state[name] = t
    args = ModelArgs(dim=h["dim"], n_layers=h["n_layers"], n_heads=h["n_heads"], n_kv_heads=h["n_kv_heads"],
                     vocab_size=h["vocab_size"], hidden_dim=h["hidden_dim"], norm_eps=RUNC_NORM_EPS,
                     max_seq_len=h["max_seq_len"], tie_embeddings=h["shared"], rope_theta=RUNC_ROPE_THETA)
    return imported_ckpt(state, args, path, ["llama2c", "llama2c_v1", "llama2c_q8"][version], tokenizer)


def rope_tables(args):
    """The freq_cis_real / freq_cis_imag tables legacy files carry (run.c skips them; we write them
    so the file is byte-for-byte what llama2.c's own exporter would write)."""
    return precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)


# ---------------------------------------------------------------------------------------------------
# Hugging Face Llama folders

def permute_to_hf(w, n_heads):
    """Rows of wq/wk (or of a LoRA B feeding them) from interleaved rotary pairs (x0,x1),(x2,x3)... to
    HF's halves (x0,x2,...,x1,x3,...): the permute of transformers' convert_llama_weights_to_hf."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w, n_heads):
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---- the one name table: our tensor (llama2.c's names) -> (Hugging Face name, GGUF name); {i} is the layer
NAMES = {"tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
         "norm.weight": ("model.norm.weight", "output_norm.weight"),
         "output.weight": ("lm_head.weight", "output.weight"),
         "attention_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
         "wq": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
         "wk": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
         "wv": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
         "wo": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
         "ffn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
         "w1": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
         "w2": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
         "w3": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight")}


def _foreign_name(ours, which):
    if ours in NAMES:
        return NAMES[ours][which]
    i = ours.split(".")[1]
    kind = {v: k for k, v in layer_keys(i).items()}[ours]
    return NAMES[kind][which].format(i=i)


def hf_key(ours):
    """Our tensor name -> the LlamaForCausalLM one."""
    return _foreign_name(ours, 0)


def gguf_name(ours):
    """Our tensor name -> llama.cpp's."""
    return _foreign_name(ours, 1)


def hf_module(kind):
    """A linear layer by our short name ("wq", "output") -> the HF module name PEFT targets ("q_proj", "lm_head")."""
    return NAMES[kind if kind in NAMES else kind + ".weight"][0].split(".")[-2]


def read_hf(folder, tokenizer=None):
    from safetensors.torch import load_file
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"a JSON {type(cfg).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"{folder}/config.json is not a Hugging Face config ({type(e).__name__}: {str(e)[:120]}); "
                         f"re-download or re-export the folder")
    if cfg.get("model_type") != "llama":
        raise UsageError(f"{folder}/config.json has model_type {cfg.get('model_type')!r}; only Llama "
                         f"(model_type 'llama') folders can be imported")
    try:
        args, tied = hf_model_args(folder, cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise UsageError(f"{folder}/config.json does not describe a Llama model ({type(e).__name__}: {str(e)[:120]}); "
                         f"re-download or re-export the folder")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise UsageError(f"{index} is damaged ({type(e).__name__}: {str(e)[:120]}); re-download the folder")
    else:
        files = ["model.safetensors"]
    hf = {}
    for name in files:
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            raise UsageError(f"{p} not found; a Hugging Face import needs safetensors weights "
                             f"(convert .bin weights with transformers' save_pretrained(safe_serialization=True))")
        try:
            hf.update(load_file(p))
        except Exception as e:
            raise UsageError(f"cannot read {p} ({str(e).splitlines()[0][:200]}); it is truncated or corrupt")
    names = ["tok_embeddings.weight", "norm.weight"] + [k for i in range(args.n_layers) for k in layer_keys(i).values()]
    if not tied:
        names.append("output.weight")
    missing = [hf_key(n) for n in names if hf_key(n) not in hf]
    if missing:
        raise UsageError(f"{folder} lacks {len(missing)} tensors its config.json promises (e.g. "
                         f"{missing[:2]}); the download is incomplete")
    state, kv = {}, args.n_kv_heads
    for n in names:
        w = hf[hf_key(n)]
        if n.endswith("attention.wq.weight"):
            w = permute_from_hf(w, args.n_heads)
        elif n.endswith("attention.wk.weight"):
            w = permute_from_hf(w, kv)
        state[n] = w
    if tokenizer is None:
        tokenizer = hf_tokenizer_meta(folder)
    return imported_ckpt(state, args, folder, "hf", tokenizer)


def hf_model_args(folder, cfg):
    """(ModelArgs, tied) from a Hugging Face config dict; UsageError for what our model cannot be."""
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    unsupported = {"rope type": rope_type != "default",
                   "attention/mlp bias": cfg.get("attention_bias") or cfg.get("mlp_bias"),
                   "activation": cfg.get("hidden_act", "silu") != "silu",
                   "head_dim": head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UsageError(f"{folder} uses {', '.join(bad)} that llamaforge's model does not have; "
                         f"only plain Llama (default rope, no biases, silu) can be imported")
    tied = bool(cfg.get("tie_word_embeddings", False))
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                     vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6), max_seq_len=cfg.get("max_position_embeddings", 2048),
                     tie_embeddings=tied, rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    return args, tied


def hf_tokenizer_meta(folder):
    """Our tokenizer meta for the tokenizer files a HF folder carries, or None if it has none we read."""
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return make_tokenizer(os.path.join(folder, "tokenizer.model")).to_meta()
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.bpe", "encoder.json")):
        return make_tokenizer(folder).to_meta()  # GPT-2 BPE files our HF export writes beside vocab.json
    return None
