"""Export a llamaforge model to other tools' formats, or import theirs into a ckpt.pt.

    python export.py --checkpoint=out/ckpt.pt --format=llama2c --out=model.bin          # run.c, fp32 (legacy)
    python export.py --checkpoint=out/ckpt.pt --format=llama2c_q8 --out=model_q8.bin    # runq.c, int8 groups
    python export.py --tokenizer=tok512.model --format=llama2c_tokenizer --out=tok512.bin  # run.c -z
    python export.py --checkpoint=out/ckpt.pt --format=hf --out=hf_model/               # transformers
    python export.py --checkpoint=out/ckpt.pt --format=gguf_q8 --out=model.gguf         # llama.cpp
    python export.py --checkpoint=hf_model/ --format=ours --out=out/imported/ckpt.pt    # import (also a .bin)
    python export.py --adapter=out/lora/ckpt.pt --format=ours --out=merged.pt            # LoRA merged into its base

Each format is one writer and one EXPORTS entry at the bottom.

Every output is written under a temporary name and renamed into place, so a refused or failed export
leaves nothing behind. Inputs are read by checkpoint.load_checkpoint, the one loader, which already
understands llama2.c files and Hugging Face folders (formats.py).
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
import torch

from checkpoint import (atomic_dir, atomic_file, build_model, clean_state_dict, load_checkpoint, load_with_adapter,
                        save_checkpoint)
from configurator import configure, print_config, require
from formats import (LLAMA2C_HEADER, LLAMA2C_MAGIC, RUNC_NORM_EPS, RUNC_ROPE_THETA, gguf_name, hf_key, hf_module,
                     llama2c_order, permute_to_hf, rope_tables)
from lora import merge_lora
from runtime import UsageError, handle_errors
from tokenizer import load_tokenizer, make_tokenizer

# ----------------------------------------------------------------------------------------------------
checkpoint = ""      # input: our ckpt.pt or run dir, a llama2.c .bin, or a Hugging Face Llama folder
adapter = ""         # a LoRA run's ckpt.pt: export its base (checkpoint; "" = the one it recorded) with it merged in
format = "llama2c"   # llama2c | llama2c_v1 | llama2c_q8 | llama2c_tokenizer | hf | gguf_f16 | gguf_q8 | ours
out = ""             # output file (folder for hf)
tokenizer = ""       # tokenizer .model / "gpt2" / GPT-2 BPE folder; "" = the one recorded in the checkpoint
group_size = 0       # llama2c_q8: int8 group size; 0 = the largest of 64, 32, ... dividing dim and hidden_dim
dtype = "float32"    # hf: float32 | float16 | bfloat16
# ----------------------------------------------------------------------------------------------------

def f32_bytes(t):
    return t.detach().float().cpu().numpy().astype("<f4").tobytes()


# ---- llama2.c ----------------------------------------------------------------------------------------

def pick_group_size(args, requested=0):
    """runq.c quantizes activations in the same groups, so the group must divide dim and hidden_dim."""
    sizes = [requested] if requested else [64, 32, 16, 8, 4, 2, 1]
    for gs in sizes:
        if gs > 0 and args.dim % gs == 0 and args.hidden_dim % gs == 0:
            return gs
    raise UsageError(f"group_size={requested} does not divide dim={args.dim} and hidden_dim="
                     f"{args.hidden_dim}; pass a divisor of both or group_size=0 to pick one")


def quantize_q8(w, gs):
    """Symmetric int8 in groups of gs (llama2.c's Q8_0): w ~ q * scale, q in [-127, 127]."""
    w = w.detach().float().reshape(-1, gs)
    scale = w.abs().max(dim=1).values / 127.0
    q = torch.round(w / torch.where(scale == 0, 1.0, scale)[:, None]).to(torch.int8)  # all-zero group: q = 0
    return q, scale


def write_llama2c(state, args, path, version=0, group_size=0):
    """version 0: legacy fp32 (run.c); 1: fp32 with a 256-byte header; 2: Q8_0 (runq.c)."""
    if abs(args.norm_eps - RUNC_NORM_EPS) > 1e-12 or args.rope_theta != RUNC_ROPE_THETA:
        raise UsageError(f"llama2.c files cannot store norm_eps={args.norm_eps} or rope_theta={args.rope_theta} "
                         f"(run.c hard-codes 1e-5 and 10000); export to --format=hf or gguf_* instead")
    gs = pick_group_size(args, group_size) if version == 2 else None
    h = dict(dim=args.dim, hidden_dim=args.hidden_dim, n_layers=args.n_layers, n_heads=args.n_heads,
             n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len,
             shared=args.tie_embeddings, group_size=gs)
    fields = [args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size,
              args.max_seq_len]
    if version == 0:
        if not args.tie_embeddings:
            fields[5] = -fields[5]  # legacy's only way to say "the classifier has its own weights"
        header = struct.pack("<7i", *fields)
    else:
        header = struct.pack("<Ii7iB", LLAMA2C_MAGIC, version, *fields, int(args.tie_embeddings))
        if version == 2:
            header += struct.pack("<i", gs)  # at byte 37, unaligned, exactly as llama2.c writes it
        header += b"\0" * (LLAMA2C_HEADER - len(header))
    cos, sin = rope_tables(args)
    extra = {"rope.cos": cos, "rope.sin": sin}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for name, _, how in llama2c_order(version, h):
            t = extra[name] if how == "rope" else state[name]
            if how == "q8":
                q, scale = quantize_q8(t, gs)
                f.write(q.numpy().tobytes())
                f.write(f32_bytes(scale))
            else:
                f.write(f32_bytes(t))
    return gs


def write_llama2c_tokenizer(tok, path):
    """run.c's tokenizer file from a SentencePiece vocab, byte-identical to llama2.c's tokenizer.py."""
    if tok is None or tok.kind != "sentencepiece":
        raise UsageError(f"the llama2.c tokenizer file holds SentencePiece vocabularies only, not "
                         f"{getattr(tok, 'kind', 'no tokenizer')}; pass --tokenizer=path/to/tokenizer.model")
    sp = tok.backend
    pieces, scores = [], []
    for i in range(tok.vocab_size):
        if i >= sp.vocab_size():  # specials we appended after the SentencePiece vocab: their text, score 0
            pieces.append(tok.id_to_special[i].encode())
            scores.append(0.0)
            continue
        p = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}.get(i, sp.id_to_piece(i))
        pieces.append(p.replace("\u2581", " ").encode("utf-8"))  # run.c wants real spaces, not "▁"
        scores.append(sp.get_score(i))
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fI", s, len(p)))
            f.write(p)


# ---- Hugging Face ------------------------------------------------------------------------------------

def hf_state_dict(state, args, dtype=torch.float32):
    out = {}
    for name, w in state.items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # tied: HF re-ties lm_head to embed_tokens on load; safetensors refuses shared storage
        if name.endswith("attention.wq.weight"):
            w = permute_to_hf(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_to_hf(w, args.n_kv_heads)
        out[hf_key(name)] = w.detach().to(dtype).contiguous()
    return out


def hf_config(args, tok, dtype_name):
    bos, eos = (tok.bos_id, tok.eos_id) if tok else (1, 2)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "head_dim": args.dim // args.n_heads, "vocab_size": args.vocab_size,
            "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},  # transformers 5 reads this
            "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None, "use_cache": True,
            "torch_dtype": dtype_name, "dtype": dtype_name}


def gpt2_files(tok):
    """(encoder.json, vocab.bpe) paths for a tiktoken GPT-2 tokenizer, which HF and GGUF both need."""
    folder = tok.path if tok.path and os.path.isdir(tok.path) else os.path.dirname(tok.path or "")
    enc, bpe = os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe")
    if not (tok.path and os.path.isfile(enc) and os.path.isfile(bpe)):
        raise UsageError("exporting a GPT-2 tokenizer needs its BPE files; pass --tokenizer=path/to/folder "
                         "holding encoder.json + vocab.bpe (e.g. shared/data/gpt2_bpe)")
    return enc, bpe


def write_hf_tokenizer(tok, folder, args):
    specials = {i: s for s, i in tok.special_ids.items()}
    added = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, s in specials.items()}
    if tok.kind == "sentencepiece":
        sp = tok.backend
        shutil.copyfile(tok.path, os.path.join(folder, "tokenizer.model"))
        names = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
                 "unk_token": sp.id_to_piece(sp.unk_id())}
        config = {"tokenizer_class": "LlamaTokenizer", **names, "add_bos_token": True, "add_eos_token": False,
                  "legacy": True, "clean_up_tokenization_spaces": False}
    else:
        enc, bpe = gpt2_files(tok)
        for src, dst in ((enc, "vocab.json"), (bpe, "merges.txt"), (enc, "encoder.json"), (bpe, "vocab.bpe")):
            shutil.copyfile(src, os.path.join(folder, dst))  # HF's names, plus ours so the import finds them
        names = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
        config = {"tokenizer_class": "GPT2Tokenizer", **names, "add_prefix_space": False}
    config.update(model_max_length=args.max_seq_len, added_tokens_decoder=added)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({**names, "additional_special_tokens": list(specials.values())}, f, indent=2)


def export_hf(state, args, tok, folder, dtype_name="float32"):
    from safetensors.torch import save_file
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype_name)
    if torch_dtype is None:
        raise UsageError(f"dtype={dtype_name!r} is not one of float32, float16, bfloat16")
    check_vocab(tok, args, "hf")
    with atomic_dir(folder) as tmp:
        save_file(hf_state_dict(state, args, torch_dtype), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = hf_config(args, tok, dtype_name)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, f, indent=2)
        if tok is not None:
            write_hf_tokenizer(tok, tmp, args)


def export_peft_adapter(out_dir, adapters, rank, alpha, target_modules, base_hf_dir):
    """LoRA adapters as a PEFT folder for the HF export of their base model. adapters maps our module
    names ("layers.0.attention.wq") to (A (r, in), B (out, r)); the update is W + alpha/r * B @ A.
    HF's q/k rows are permuted (rotary halves), so B's rows get the same permutation; A is untouched."""
    from safetensors.torch import save_file
    with open(os.path.join(base_hf_dir, "config.json")) as f:
        cfg = json.load(f)
    heads = {"wq": cfg["num_attention_heads"], "wk": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    tensors = {}
    for name, (A, B) in adapters.items():
        kind = name.split(".")[-1]
        if A.shape[0] != rank or B.shape[1] != rank:
            raise UsageError(f"adapter {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, not rank {rank}")
        if kind in heads:
            B = permute_to_hf(B, heads[kind])
        prefix = "base_model.model." + hf_key(name + ".weight")[:-len(".weight")]
        tensors[prefix + ".lora_A.weight"] = A.detach().float().contiguous()
        tensors[prefix + ".lora_B.weight"] = B.detach().float().contiguous()
    hf_targets = sorted({hf_module(t) for t in target_modules})  # "wq" -> "q_proj"
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": hf_targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "base_model_name_or_path": os.path.abspath(base_hf_dir), "inference_mode": True,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)


# ---- GGUF (llama.cpp) --------------------------------------------------------------------------------

def check_vocab(tok, args, fmt):
    if tok is not None and tok.vocab_size > args.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} ids but the model only {args.vocab_size} "
                         f"rows; {fmt} cannot pair them: pass the tokenizer the model was trained with")


def gguf_vocab(writer, tok, args):
    """tokenizer.ggml.*: llama.cpp wants one entry per embedding row, so padded rows get [PADn] names."""
    import gguf
    T = gguf.TokenType
    check_vocab(tok, args, "GGUF")
    if tok.kind == "sentencepiece":
        sp = tok.backend
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                         T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
        writer.add_tokenizer_model("llama")
        writer.add_unk_token_id(sp.unk_id())
    else:
        enc, bpe = gpt2_files(tok)
        with open(enc) as f:
            vocab = json.load(f)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        types = [T.CONTROL if t == "<|endoftext|>" else T.NORMAL for t in tokens]
        scores = None
        with open(bpe, encoding="utf-8") as f:
            merges = [line for line in f.read().split("\n")[1:] if line]  # first line is "#version: 0.2"
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges(merges)
    for i in range(len(tokens), args.vocab_size):  # our appended specials, then padding rows
        tokens.append(tok.id_to_special.get(i, f"[PAD{i}]"))
        types.append(T.CONTROL if i in tok.id_to_special else T.UNUSED)
        if scores is not None:
            scores.append(0.0)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(tok.kind == "sentencepiece")


def export_gguf(state, args, tok, path, qtype="f16"):
    import gguf
    if tok is None:
        raise UsageError("a GGUF file must carry its tokenizer and this checkpoint records none; "
                         "pass --tokenizer=path/to/tokenizer.model (or gpt2 BPE folder)")
    Q = gguf.GGMLQuantizationType
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name("llamaforge")
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.hidden_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_dimension_count(args.dim // args.n_heads)
        w.add_rope_freq_base(args.rope_theta)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        gguf_vocab(w, tok, args)
        for name, t in state.items():
            if name == "output.weight" and args.tie_embeddings:
                continue  # llama.cpp falls back to token_embd when there is no output tensor
            # llama.cpp's converter permutes HF's q/k back to Meta's interleaved rotary pairs, which is
            # our layout already: q and k go in unchanged
            a = t.detach().float().numpy()
            if a.ndim == 1:
                w.add_tensor(gguf_name(name), a.astype(np.float32))  # norms stay fp32, as llama.cpp keeps them
            elif qtype == "q8_0" and a.shape[1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
                w.add_tensor(gguf_name(name), gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
            else:  # rows not a multiple of Q8_0's 32-value block stay F16, as llama.cpp's converter does
                w.add_tensor(gguf_name(name), a.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


# ---- CLI ---------------------------------------------------------------------------------------------

def tensors(ckpt):
    model = build_model(ckpt)
    return {k: v.detach().float() for k, v in model.state_dict().items()}, model.args


def export_ours(ckpt, tok, path):
    if tok is not None:
        if not hasattr(tok, "to_meta"):
            raise UsageError("a llama2.c tokenizer .bin cannot be attached to a checkpoint (it lacks the SentencePiece "
                             "model); pass the .model it was exported from, e.g. --tokenizer=tok512.model")
        check_vocab(tok, build_model(ckpt).args, "the checkpoint")
        ckpt["tokenizer"] = tok.to_meta(embed=True)
    save_checkpoint(ckpt, path)


def export_llama2c(version):
    def write(ckpt, tok, path):
        gs = write_llama2c(*tensors(ckpt), path, version, group_size)
        if gs:
            print(f"quantized to int8 in groups of {gs}")
    return write


# format -> writer(checkpoint dict, tokenizer or None, output path)
EXPORTS = {
    "llama2c": export_llama2c(0), "llama2c_v1": export_llama2c(1), "llama2c_q8": export_llama2c(2),
    "llama2c_tokenizer": lambda ckpt, tok, path: write_llama2c_tokenizer(tok, path),
    "hf": lambda ckpt, tok, path: export_hf(*tensors(ckpt), tok, path, dtype),
    "gguf_f16": lambda ckpt, tok, path: export_gguf(*tensors(ckpt), tok, path, "f16"),
    "gguf_q8": lambda ckpt, tok, path: export_gguf(*tensors(ckpt), tok, path, "q8_0"),
    "ours": export_ours,
}


def merged_checkpoint(base_path, adapter_path):
    """An ordinary checkpoint of the base with the LoRA adapter folded into its weights."""
    model, base, ad = load_with_adapter(base_path, adapter_path)
    merge_lora(model)
    return {"model": clean_state_dict(model.state_dict()), "model_args": model.args.to_dict(),
            "config": ad.get("config", {}), "tokenizer": base.get("tokenizer") or ad.get("tokenizer"),
            "iter_num": ad.get("iter_num", 0), "best_val_loss": ad.get("best_val_loss"),
            "merged_from": {"base": base_path or ad.get("base_checkpoint"), "adapter": os.path.abspath(adapter_path),
                            "lora": ad["lora"]}}


def main():
    config = configure(globals(), sys.argv[1:])
    print_config(config)
    require(config, non_negative=("group_size",))
    if format not in EXPORTS:
        raise UsageError(f"format={format!r} is not one of {', '.join(EXPORTS)}")
    if not out:
        raise UsageError("no --out given; pass the file (or folder, for hf) to write")
    ckpt = merged_checkpoint(checkpoint, adapter) if adapter else load_checkpoint(checkpoint) if checkpoint else None
    tok = make_tokenizer(tokenizer) if tokenizer else (
        load_tokenizer(ckpt["tokenizer"]) if ckpt and ckpt.get("tokenizer") else None)
    if ckpt is None and format != "llama2c_tokenizer":
        raise UsageError("no --checkpoint given; pass a ckpt.pt, run directory, llama2.c .bin or HF folder")
    EXPORTS[format](ckpt, tok, out)
    size = os.path.getsize(out) if os.path.isfile(out) else sum(
        os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out} ({size:,} bytes, format {format})" + (f", {adapter} merged in" if adapter else ""))


if __name__ == "__main__":
    handle_errors()
    main()
