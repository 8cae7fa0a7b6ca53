"""Other tools' model files, one home per format (Hugging Face's is hf.py): llama2.c's model and tokenizer
files, read and written; llama.cpp's GGUF (F16, Q8_0, Q4_0), read and written; and the one tensor-name table for
HF and GGUF. Quantized weights are rounded by quant.py, the one quantizer, which QAT trains against.

checkpoint.load_checkpoint reads llama2.c files through read_llama2c and GGUF files through read_gguf, so every
script that takes a checkpoint also takes a llama2.c model file (.bin: legacy, version 1 or version 2 / Q8_0) or a
GGUF file. Sizes and header fields are
checked before a single weight is read, so a truncated download is one line of error, not a reshape crash
deep inside numpy. Writers write through runtime's atomic writer: a failed export leaves nothing behind.

Tensor names: ours (llama2.c's) -> Hugging Face (hf_key) and GGUF (gguf_name), from one table (NAMES).
"""
import json
import os
import struct

import numpy as np
import torch

from chat import JINJA_TEMPLATE, has_chat_tokens
from model import ModelArgs, Transformer, precompute_rope
from quant import GGUF_BLOCK, ggml_blocks, quantize
from quant import group_size as group_size_for
from runtime import UsageError, atomic_file
from tokenizer import END_OF_TURN

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
    state = {k: v.contiguous() if k.endswith(".q") else v.float().contiguous() for k, v in state.items()}
    if args.tie_embeddings:  # what model.state_dict() holds for a tied head: the same tensor twice
        for part in ("weight", "q", "scale"):
            if f"tok_embeddings.{part}" in state:
                state[f"output.{part}"] = state[f"tok_embeddings.{part}"]
    return {"model": state, "model_args": args.to_dict(), "config": {"imported_from": os.path.abspath(source),
            "format": fmt}, "tokenizer": tokenizer, "iter_num": 0, "best_val_loss": None}


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


def torch_copy(array):
    """A numpy array (of a memory-mapped file) copied into memory torch allocates, not numpy: torch backs a tensor of
    2 MB or more with 2 MB pages where asked to (runtime.huge_pages), and decoding streams these weights every token."""
    out = torch.empty(array.shape, dtype={"i1": torch.int8, "f4": torch.float32}[array.dtype.str[1:]])
    out.numpy()[...] = array
    return out


def read_llama2c(path, tokenizer=None, int8=False):
    """A checkpoint dict from a llama2.c model file. A version-2 file's matrices are dequantized to fp32, or with
    int8=True kept as they are stored: name.q (rows, cols) int8 and name.scale (rows, cols // group_size) fp32,
    the buffers of quant.Int8Linear (checkpoint.build_model then builds an int8 model, no fp32 copy ever made)."""
    version, h, offset = llama2c_header(path)
    # llama2.c's own export only asks group_size to divide dim: its groups may then run across the rows of w2,
    # which int8 layers (scales per row) cannot hold; such a file is dequantized as before
    int8 = int8 and version == 2 and h["hidden_dim"] % h["group_size"] == 0
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
            q = raw[pos:pos + n].view(np.int8)
            scale = raw[pos + n:pos + n + 4 * (n // h["group_size"])].view("<f4")
            if int8:
                state[name[:-len("weight")] + "q"] = torch_copy(q.reshape(shape))
                state[name[:-len("weight")] + "scale"] = torch_copy(scale.reshape(shape[0], -1))
            else:
                q = q.astype(np.float32).reshape(-1, h["group_size"])
                state[name] = torch.from_numpy((q * scale[:, None]).reshape(shape))
            pos += n + 4 * (n // h["group_size"])
        else:
            t = torch_copy(raw[pos:pos + 4 * n].view("<f4").reshape(shape))
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


def f32_bytes(t):
    return t.detach().float().cpu().numpy().astype("<f4").tobytes()


def write_llama2c(state, args, path, version=0, group_size=0):
    """version 0: legacy fp32 (run.c); 1: fp32 with a 256-byte header; 2: Q8_0 (runq.c)."""
    if abs(args.norm_eps - RUNC_NORM_EPS) > 1e-12 or args.rope_theta != RUNC_ROPE_THETA:
        raise UsageError(f"llama2.c files cannot store norm_eps={args.norm_eps} or rope_theta={args.rope_theta} "
                         f"(run.c hard-codes 1e-5 and 10000); export to --format=hf or gguf_* instead")
    gs = group_size_for("llama2c_q8", args, group_size) if version == 2 else None
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
                q, scale = quantize(t, "llama2c_q8", gs)
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


# ---------------------------------------------------------------------------------------------------
# GGUF (llama.cpp): written with the gguf package, llama.cpp's own

def check_vocab(tok, args, fmt):
    if tok is not None and tok.vocab_size > args.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} ids but the model only {args.vocab_size} "
                         f"rows; {fmt} cannot pair them: pass the tokenizer the model was trained with")


def gpt2_files(tok):
    """(encoder.json, vocab.bpe) paths for a tiktoken GPT-2 tokenizer, which HF and GGUF both need."""
    folder = tok.path if tok.path and os.path.isdir(tok.path) else os.path.dirname(tok.path or "")
    enc, bpe = os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe")
    if not (tok.path and os.path.isfile(enc) and os.path.isfile(bpe)):
        raise UsageError("exporting a GPT-2 tokenizer needs its BPE files; pass --tokenizer=path/to/folder "
                         "holding encoder.json + vocab.bpe (e.g. shared/data/gpt2_bpe)")
    return enc, bpe


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
        writer.add_tokenizer_pre("default")
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
    tokens += [f"[PAD{i}]" for i in range(len(tokens), args.vocab_size)]  # appended specials, padding rows
    types += [T.UNUSED] * (len(tokens) - len(types))
    # the chat specials are CONTROL tokens with score -1000, as llama.cpp's converter marks added special tokens:
    # llama.cpp then matches them whole in a prompt (with special parsing on) and never makes them of pieces
    for i, s in tok.id_to_special.items():
        tokens[i], types[i] = s, T.CONTROL
    if scores is not None:
        scores += [-1000.0] * (len(tokens) - len(scores))
        for i in tok.id_to_special:
            scores[i] = -1000.0
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(tok.kind == "sentencepiece")
    writer.add_add_eos_token(False)
    if has_chat_tokens(tok):  # end of generation at the end of a turn (llama.cpp puts the EOT id in its EOG set)
        writer.add_eot_token_id(tok.special_ids[END_OF_TURN])
        writer.add_chat_template(JINJA_TEMPLATE)


def export_gguf(state, args, tok, path, qtype="f16"):
    """A llama.cpp model file: qtype f16, q8_0 or q4_0 (every matrix whose rows are whole 32-value blocks)."""
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
        w.add_key_length(args.dim // args.n_heads)
        w.add_value_length(args.dim // args.n_heads)
        w.add_rope_freq_base(args.rope_theta)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gguf_vocab(w, tok, args)
        for name, t in state.items():
            if name == "output.weight" and args.tie_embeddings:
                continue  # llama.cpp falls back to token_embd when there is no output tensor
            # llama.cpp's converter permutes HF's q/k back to Meta's interleaved rotary pairs, which is
            # our layout already: q and k go in unchanged
            t = t.detach().float().cpu()
            if t.ndim == 1:
                w.add_tensor(gguf_name(name), t.numpy())  # norms stay fp32, as llama.cpp keeps them
            elif qtype != "f16" and t.shape[1] % GGUF_BLOCK == 0:
                qt = Q.Q8_0 if qtype == "q8_0" else Q.Q4_0
                w.add_tensor(gguf_name(name), ggml_blocks(*quantize(t, qtype), qtype, t.shape[0]), raw_dtype=qt)
            else:  # rows not a multiple of the 32-value block stay F16, as llama.cpp's converter does
                w.add_tensor(gguf_name(name), t.numpy().astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_gguf(path, tokenizer=None):
    """A llama-architecture GGUF file (ours, or llama.cpp's converter's: both keep Meta's q/k layout) as a checkpoint
    dict, every tensor dequantized by gguf's own reader. It carries no SentencePiece model: pass --tokenizer."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, struct.error) as e:
        raise UsageError(f"cannot read GGUF file {path} ({e}); the file is truncated or corrupt")
    field = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
    if field("general.architecture") != "llama":
        raise UsageError(f"{path} holds a {field('general.architecture')!r} model; only 'llama' GGUF files are read")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UsageError(f"{path} has no token_embd.weight tensor; the file is not a complete llama model")
    n_heads, dim = field("llama.attention.head_count"), field("llama.embedding_length")
    args = ModelArgs(dim=dim, n_layers=field("llama.block_count"), n_heads=n_heads,
                     n_kv_heads=field("llama.attention.head_count_kv", n_heads),
                     vocab_size=int(tensors["token_embd.weight"].shape[1]),
                     hidden_dim=field("llama.feed_forward_length"),
                     norm_eps=field("llama.attention.layer_norm_rms_epsilon", 1e-5),
                     max_seq_len=field("llama.context_length"), tie_embeddings="output.weight" not in tensors,
                     rope_theta=field("llama.rope.freq_base", 10000.0))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state = {}
    for ours, shape in shapes.items():
        if ours == "output.weight" and args.tie_embeddings:
            continue
        t = tensors.get(gguf_name(ours))
        if t is None:
            raise UsageError(f"{path} lacks the tensor {gguf_name(ours)}; the file is not a complete llama model")
        state[ours] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)
    qtype = {gguf.LlamaFileType.MOSTLY_Q8_0: "gguf_q8", gguf.LlamaFileType.MOSTLY_Q4_0: "gguf_q4"}.get(
        field("general.file_type"), "gguf")
    return imported_ckpt(state, args, path, qtype, tokenizer)
