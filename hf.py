"""Hugging Face's formats, read and written: a LlamaForCausalLM folder (config.json + safetensors, single or
sharded, and the tokenizer files) and a PEFT LoRA adapter folder. checkpoint.load_checkpoint reads HF folders
through read_hf, so every script that takes a checkpoint takes one.
"""
import json
import os
import shutil

import torch

from chat import JINJA_TEMPLATE, has_chat_tokens
from formats import check_vocab, gpt2_files, hf_key, hf_module, imported_ckpt, layer_keys
from model import ModelArgs
from runtime import UsageError, atomic_dir
from tokenizer import END_OF_TURN, make_tokenizer, normalizer_spec


def permute_to_hf(w, n_heads):
    """Rows of wq/wk (or of a LoRA B feeding them) from interleaved rotary pairs (x0,x1),(x2,x3)... to
    HF's halves (x0,x2,...,x1,x3,...): the permute of transformers' convert_llama_weights_to_hf."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w, n_heads):
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


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


def tokenizer_json(tok):
    """A tokenizers-library tokenizer.json that encodes exactly as our SentencePiece BPE does, or None where the
    model's normalization (e.g. nmt_nfkc) has no exact equivalent. transformers' own conversion of a
    tokenizer.model drops or merges leading and repeated spaces (" a", "\\n    return" come out differently).
    Merges are every split of a piece into two pieces, ranked by the merged piece's score: SentencePiece's BPE
    always merges the best-scoring result first."""
    sp, spec = tok.backend, normalizer_spec(tok.backend.serialized_model_proto())
    if spec["name"] != "identity":
        return None
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges = sorted((-sp.get_score(i), i, vocab[p[:k]], p[:k], p[k:]) for i, p in enumerate(vocab)
                    if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or i in tok.id_to_special)
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    replace = lambda find, by, how="String": {"type": "Replace", "pattern": {how: find}, "content": by}  # noqa: E731
    normalizer = []  # \A, \z: the regexes are Oniguruma's, where ^ and $ also match at line breaks
    if spec["remove_extra_whitespaces"]:  # SentencePiece strips the ends and collapses runs of spaces (only " ")
        normalizer = [replace(r"\A +| +\z", "", "Regex"), replace(" {2,}", " ", "Regex")]
    normalizer += [{"type": "Prepend", "prepend": "\u2581"}] if spec["add_dummy_prefix"] else []
    decoder = [replace("\u2581", " "), {"type": "ByteFallback"}, {"type": "Fuse"}]
    decoder += [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if spec["add_dummy_prefix"] else []
    controls = [(i, sp.id_to_piece(i)) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0]
    bos = sp.id_to_piece(sp.bos_id())
    with_bos = lambda seq, type_id: [{"SpecialToken": {"id": bos, "type_id": type_id}},  # noqa: E731
                                     {"Sequence": {"id": seq, "type_id": type_id}}]
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}
                             for i, s in sorted(controls + list(tok.id_to_special.items()))],
            "normalizer": {"type": "Sequence", "normalizers": normalizer + [replace(" ", "\u2581")]},
            "pre_tokenizer": None,
            "post_processor": {"type": "TemplateProcessing", "single": with_bos("A", 0),
                               "pair": with_bos("A", 0) + with_bos("B", 1),
                               "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}}},
            "decoder": {"type": "Sequence", "decoders": decoder},
            "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()),
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                      "merges": [[a, b] for *_, a, b in merges]}}


def write_hf_tokenizer(tok, folder, args):
    specials = {i: s for s, i in tok.special_ids.items()}
    added = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, s in specials.items()}
    if tok.kind == "sentencepiece":
        sp = tok.backend
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:  # the model itself: its file may be gone
            f.write(sp.serialized_model_proto())
        names = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
                 "unk_token": sp.id_to_piece(sp.unk_id())}
        fast = tokenizer_json(tok)
        if fast is not None:  # the generic fast tokenizer takes tokenizer.json as it is
            with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
                json.dump(fast, f, ensure_ascii=False)
        config = {"tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer", **names,
                  "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False}
    else:
        enc, bpe = gpt2_files(tok)
        for src, dst in ((enc, "vocab.json"), (bpe, "merges.txt"), (enc, "encoder.json"), (bpe, "vocab.bpe")):
            shutil.copyfile(src, os.path.join(folder, dst))  # HF's names, plus ours so the import finds them
        names = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
        config = {"tokenizer_class": "GPT2Tokenizer", **names, "add_prefix_space": False}
    config.update(model_max_length=args.max_seq_len, added_tokens_decoder=added)
    if has_chat_tokens(tok):
        config["chat_template"] = JINJA_TEMPLATE
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
        # a chat model ends its answer with <|end_of_turn|>: generate() must stop there as generate.py --chat does
        chat = tok is not None and has_chat_tokens(tok)
        stops = [cfg["eos_token_id"]] + ([tok.special_ids[END_OF_TURN]] if chat else [])
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": stops if len(stops) > 1 else stops[0]}, f,
                      indent=2)
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
