"""The one tokenizer wrapper every llamaforge script imports.

Two kinds behind one small interface:
- "sentencepiece": a .model file, either one we trained (tokenize_data.py train_vocab, which bakes
  the chat specials in as real pieces) or a user's own such as the Llama 2 tokenizer.model.
- "tiktoken": the GPT-2 BPE, built offline from local vocab.bpe + encoder.json (or r50k_base.tiktoken),
  or from tiktoken's own cache via tiktoken.get_encoding("gpt2").
and, for sampling from llama2.c files, its tokenizer.bin (Llama2cTokenizer: encode and decode only).
Every one streams text through StreamDecoder, one token at a time, in constant work per token.

A tokenizer is described on disk by to_meta() (a small JSON dict saved in data/<name>/meta.json and in
checkpoints) and rebuilt with load_tokenizer(meta), so a checkpoint always decodes with the ids it
was trained on.
"""
import codecs
import os
import re
import struct

from runtime import UsageError

USER, ASSISTANT, END_OF_TURN = "<|user|>", "<|assistant|>", "<|end_of_turn|>"
SPECIAL_TOKENS = [USER, ASSISTANT, END_OF_TURN]  # the chat specials (chat.py's template), in this order

GPT2_EOT = "<|endoftext|>"


class Tokenizer:
    """Use make_tokenizer / load_tokenizer to build one; the attributes are the interface."""

    def __init__(self, kind, path, backend, base_vocab, bos_id, eos_id, pad_id, special_ids):
        self.kind = kind                  # "sentencepiece" | "tiktoken"
        self.path = path                  # .model file, GPT-2 BPE folder/file, or None (tiktoken's "gpt2")
        self.backend = backend            # SentencePieceProcessor or tiktoken.Encoding
        self.base_vocab = base_vocab      # ids below this belong to the backend's own vocab
        self.vocab_size = base_vocab + sum(i >= base_vocab for i in special_ids.values())
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.special_ids = dict(special_ids)
        self.id_to_special = {i: s for s, i in special_ids.items()}
        # SentencePiece: we cut the text at the specials ourselves. Appended ones are unknown to
        # SentencePiece, and for trained-in ones it would put a dummy-prefix "▁" before a leading special
        names = sorted(special_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def __repr__(self):
        return f"Tokenizer(kind={self.kind!r}, path={self.path!r}, vocab_size={self.vocab_size})"

    # ---- encode / decode

    def encode(self, text, bos=False, eos=False):
        if self.kind == "tiktoken":
            # specials become single ids only if added; anything else (even "<|endoftext|>" typed in
            # the text) is ordinary text, so user data can never inject control tokens
            ids = self.backend.encode(text, allowed_special=set(self.special_ids), disallowed_special=())
        elif self._split_re is None:
            ids = self.backend.encode(text)
        else:
            # Llama-2-chat style: each chunk between specials is encoded on its own (so each gets
            # SentencePiece's dummy-prefix space); decode() cuts at the same places, so round trips are
            # exact, and a special is one id wherever it stands
            ids = []
            for chunk in self._split_re.split(text):
                if chunk in self.special_ids:
                    ids.append(self.special_ids[chunk])
                elif chunk:
                    ids.extend(self.backend.encode(chunk))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts, bos=False, eos=False, threads=1):
        """encode() of many texts at once, in the backend's own threads (SentencePiece's and tiktoken's batch
        encoders release the GIL): what pretokenize spends its time in."""
        texts = list(texts)
        if (self.kind == "sentencepiece" and not (self._split_re and self._split_re.search("\0".join(texts)))
                and (not bos or self.bos_id == self.backend.bos_id())
                and (not eos or self.eos_id == self.backend.eos_id())):
            # the common case, no specials in the batch: SentencePiece adds BOS/EOS itself, no Python per text
            return self.backend.encode(texts, num_threads=threads, add_bos=bos, add_eos=eos)
        if self.kind == "tiktoken":
            out = self.backend.encode_batch(texts, num_threads=threads, allowed_special=set(self.special_ids),
                                            disallowed_special=())
        elif self._split_re is None:
            out = self.backend.encode(list(texts), num_threads=threads)
        else:  # cut at the specials, encode every piece of every text in one call, then put each text together
            parts = [self._split_re.split(t) for t in texts]
            plain = [c for p in parts for c in p if c and c not in self.special_ids]
            pieces, out = iter(self.backend.encode(plain, num_threads=threads)), []
            for p in parts:
                ids = []
                for c in p:
                    if c in self.special_ids:
                        ids.append(self.special_ids[c])
                    elif c:
                        ids.extend(next(pieces))
                out.append(ids)
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

    def decode(self, ids):
        # ids at or past vocab_size are dropped: a model's embedding table is often padded
        # (e.g. 50260 -> 50304) and an undertrained model can sample those rows
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self.kind == "tiktoken":  # like SentencePiece's control tokens, BOS/EOS are not text
            return self.backend.decode([i for i in ids if i != self.eos_id], errors="replace")
        # byte tokens that are no UTF-8 (a model emits some): one U+FFFD per invalid run, as StreamDecoder does
        out = b"".join(self.token_bytes(ids[k - 1] if k else None, i) for k, i in enumerate(ids))
        if (text := out.decode("utf-8", errors="replace")).encode() != out:
            return text  # (sp.decode puts one per bad byte: streamed and whole text would differ)
        if self._split_re is None:
            return self.backend.decode(ids)
        text, run = [], []
        for i in ids + [None]:
            if i is None or i in self.id_to_special:
                text += [self.backend.decode(run)] + ([self.id_to_special[i]] if i is not None else [])
                run = []
            else:
                run.append(i)
        return "".join(text)

    def token_bytes(self, prev_id, id):
        """The raw bytes one token adds to the text (a UTF-8 character may span several tokens)."""
        if not 0 <= id < self.vocab_size or id in (self.bos_id, self.eos_id):
            return b""
        if id in self.id_to_special:
            return self.id_to_special[id].encode()
        if self.kind == "tiktoken":
            return self.backend.decode_single_token_bytes(id)
        sp = self.backend
        if sp.is_byte(id):  # byte-fallback pieces look like <0x0A>
            return bytes([int(sp.id_to_piece(id)[3:5], 16)])
        if sp.is_control(id) or sp.is_unknown(id):
            return b""
        piece = sp.id_to_piece(id).replace("\u2581", " ")  # "▁" marks a space in SentencePiece
        # the first piece of a text (at the start, after BOS, or after a special we cut at) carries the
        # dummy-prefix space that encode added; llama2.c strips it the same way
        if (prev_id is None or prev_id == self.bos_id or prev_id in self.id_to_special) and piece[:1] == " ":
            piece = piece[1:]
        return piece.encode()

    def stream(self, prev_id=None):
        """A StreamDecoder for tokens that follow prev_id (the last prompt token; None at the start)."""
        return StreamDecoder(self, prev_id)

    def to_meta(self, embed=False):
        """A small description to rebuild this tokenizer from. embed=True (for checkpoints) also carries
        a SentencePiece model's own bytes, so the checkpoint decodes on a machine without the .model
        file, and keeps decoding right after the file is overwritten by a new train_vocab."""
        meta = {"kind": self.kind, "path": self.path, "special_tokens": list(self.special_ids),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "sha256": self.content_hash()}
        if embed and self.kind == "sentencepiece":
            meta["model_proto"] = self.backend.serialized_model_proto()
        return meta

    def content_hash(self):
        """sha256 of what the ids mean, not of where the file lives: SentencePiece's serialized model,
        or the GPT-2 BPE merges in rank order. Two tokenizers with equal hashes encode alike."""
        import hashlib
        h = hashlib.sha256()
        if self.kind == "sentencepiece":
            h.update(self.backend.serialized_model_proto())
        else:
            ranks = self.backend._mergeable_ranks
            for piece in sorted(ranks, key=ranks.get):
                h.update(len(piece).to_bytes(2, "little") + piece)
        return h.hexdigest()


class StreamDecoder:
    """The text of a growing token sequence, one token at a time: add(id) returns only the new text, so
    streaming costs the same per token however long the sequence is (re-decoding the whole sequence for
    each token would be quadratic). The bytes of a UTF-8 character split over several tokens are held
    until the token that completes it. The concatenated pieces equal decode() of the same ids."""

    def __init__(self, tok, prev_id=None):
        self.tok, self.prev = tok, prev_id
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, id):
        text = self._utf8.decode(self.tok.token_bytes(self.prev, int(id)))
        self.prev = int(id)
        return text

    def flush(self):
        """What is left of an unfinished character at the end of the stream (as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ---- llama2.c's tokenizer file (what run.c -z reads): uint32 max_token_length, then per token float32
# score, int32 byte length, UTF-8 bytes. The vocab size is not stored; run.c takes it from the model.

class Llama2cTokenizer:
    """Enough of the Tokenizer interface (encode, decode, token_bytes, stream, bos_id, eos_id, vocab_size)
    to use a .bin tokenizer file on its own. encode is run.c's: greedy merge of the best-scoring pair."""
    kind = "llama2c"

    def __init__(self, path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"cannot read tokenizer {path} ({e.strerror}); check the path")
        if len(data) < 4:
            raise UsageError(f"{path} holds {len(data)} bytes, too few for a llama2.c tokenizer file")
        self.path, self.max_token_length = os.path.abspath(path), struct.unpack_from("<I", data, 0)[0]
        self.pieces, self.scores, pos, end, most = [], [], 4, len(data) - 8, self.max_token_length
        header = struct.Struct("<fi").unpack_from  # bound once: 32,000 tokens in 23 ms, not 40
        while pos <= end:
            score, n = header(data, pos)
            if not 0 <= n <= most:
                raise UsageError(f"{path}: token {len(self.pieces)} claims {n} bytes (at most {most}); the file is "
                                 f"corrupt or not a llama2.c tokenizer file")
            self.pieces.append(data[pos + 8:pos + 8 + n])
            self.scores.append(score)
            pos += 8 + n
        if pos != len(data):
            raise UsageError(f"{path} ends inside token {len(self.pieces) - (pos > len(data))}: truncated or corrupt")
        self.vocab_size, self.bos_id, self.eos_id = len(self.pieces), 1, 2  # llama2.c's fixed ids
        self.special_ids, self.id_to_special = {}, {}
        self.lookup = dict(zip(reversed(self.pieces), range(len(self.pieces) - 1, -1, -1)))  # a repeat: its first id
        # byte-fallback pieces found by their text: <0x00> is 3 in Llama 2's vocab, after any user-defined pieces
        self.byte_ids = [self.lookup.get(f"<0x{b:02X}>".encode()) for b in range(256)]

    def token_bytes(self, prev_id, id):
        if id in (self.bos_id, self.eos_id) or not 0 <= id < self.vocab_size:
            return b""
        piece = self.pieces[id]
        if (prev_id is None or prev_id == self.bos_id) and piece[:1] == b" ":  # as run.c: no dummy-prefix space
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            return bytes([int(piece[3:5], 16)])
        return piece

    def stream(self, prev_id=None):
        return StreamDecoder(self, prev_id)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        out = b"".join(self.token_bytes(ids[k - 1] if k else None, i) for k, i in enumerate(ids))
        return out.decode("utf-8", errors="replace")

    def encode(self, text, bos=False, eos=False):
        ids = []
        for ch in (" " + text if text else ""):  # the dummy prefix SentencePiece adds
            b = ch.encode()
            if b in self.lookup:
                ids.append(self.lookup[b])
            elif all(self.byte_ids[x] is not None for x in b):  # byte fallback
                ids.extend(self.byte_ids[x] for x in b)
            else:
                raise UsageError(f"{self.path} has no piece for {ch!r} and no byte-fallback pieces; "
                                 f"use the tokenizer's .model file instead")
        while True:
            best = max(((self.scores[self.lookup[self.pieces[a] + self.pieces[b]]], k)
                        for k, (a, b) in enumerate(zip(ids, ids[1:]))
                        if self.pieces[a] + self.pieces[b] in self.lookup),
                       default=None, key=lambda t: (t[0], -t[1]))
            if best is None:
                break
            k = best[1]
            ids[k:k + 2] = [self.lookup[self.pieces[ids[k]] + self.pieces[ids[k + 1]]]]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


def _varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if b < 0x80:
            return n, i


def _proto_fields(buf):
    """(field number, value) of a serialized protobuf message: varints as ints, everything else as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            n = {1: 8, 5: 4}[wire]
            v, i = buf[i:i + n], i + n
        yield key >> 3, v


def normalizer_spec(model_proto):
    """What a SentencePiece model does to text before BPE (its NormalizerSpec, ModelProto field 3): the rule
    name, whether it adds a dummy-prefix space, whether it collapses runs of spaces and strips the ends."""
    spec = {"name": "nmt_nfkc", "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for field, value in _proto_fields(model_proto):
        if field == 3:
            for f, v in _proto_fields(value):
                if f == 1:
                    spec["name"] = v.decode()
                elif f in (3, 4):
                    spec[{3: "add_dummy_prefix", 4: "remove_extra_whitespaces"}[f]] = bool(v)
    return spec


def append_user_pieces(model_proto, pieces):
    """A serialized SentencePiece model with `pieces` appended as USER_DEFINED pieces (score 0): the ids after
    every trained piece. Trained vocabularies get the chat specials this way, not through SentencePiece's
    user_defined_symbols, which would put them at ids 3.. and push the 256 byte pieces to 3+len(pieces): run.c
    and llama2.c's tokenizer assume the bytes at 3..258. Appending a repeated field's element to a serialized
    protobuf message is appending its bytes (ModelProto.pieces = field 1; SentencePiece: piece 1, score 2, type 3)."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    out = bytes(model_proto)
    for p in pieces:
        text = p.encode()
        body = b"\x0a" + varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + varint(4)
        out += b"\x0a" + varint(len(body)) + body
    return out


# ---- building

def _sentencepiece(path, special_tokens, model_proto=None):
    import sentencepiece as spm
    if model_proto is None and not os.path.isfile(path):
        raise UsageError(f"tokenizer model {path} not found; train one with "
                         f"python tokenize_data.py train_vocab, or pass --tokenizer=path/to/tokenizer.model")
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto) if model_proto is not None else \
            spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # the C++ error is a multi-line RuntimeError; keep its gist
        raise UsageError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]}); "
                         f"pass a .model file written by SentencePiece")
    base = sp.vocab_size()
    special_ids, next_id = {}, base
    # specials already in the vocab (our trained models have them) keep their ids: a trained vocab
    # always knows its specials, even if the caller did not ask for them
    for s in list(dict.fromkeys(list(special_tokens) + SPECIAL_TOKENS)):
        i = sp.piece_to_id(s)
        if i != sp.unk_id() and sp.id_to_piece(i) == s:
            special_ids[s] = i
        elif s in special_tokens:
            special_ids[s], next_id = next_id, next_id + 1
    pad = sp.pad_id() if sp.pad_id() >= 0 else None
    return Tokenizer("sentencepiece", os.path.abspath(path) if path else None, sp, base, sp.bos_id(), sp.eos_id(), pad,
                     special_ids)


def _gpt2_base(path):
    """The GPT-2 encoding: from local BPE files if path is given, else tiktoken's (cached) download."""
    import tiktoken
    if path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UsageError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); offline, "
                             f"set TIKTOKEN_CACHE_DIR to a tiktoken cache or pass --tokenizer=path/to/gpt2_bpe_folder")
    if not os.path.exists(path):
        raise UsageError(f"GPT-2 BPE path {path} not found; pass a folder holding vocab.bpe + encoder.json "
                         f"(or r50k_base.tiktoken), or --tokenizer=gpt2 to use tiktoken's cache")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex, reused not pasted
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    bpe, enc_json, tk = (os.path.join(folder, f) for f in ("vocab.bpe", "encoder.json", "r50k_base.tiktoken"))
    if path.endswith(".tiktoken") or (os.path.isdir(path) and os.path.isfile(tk) and not os.path.isfile(bpe)):
        ranks = load_tiktoken_bpe(path if path.endswith(".tiktoken") else tk)
    elif os.path.isfile(bpe) and os.path.isfile(enc_json):
        ranks = data_gym_to_mergeable_bpe_ranks(bpe, enc_json)
    else:
        raise UsageError(f"no GPT-2 BPE files at {path}; pass a folder holding vocab.bpe + encoder.json "
                         f"(or r50k_base.tiktoken), or --tokenizer=gpt2 to use tiktoken's cache")
    eot = len(ranks)  # 50256: <|endoftext|> follows the merges, as in tiktoken's own gpt2
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={GPT2_EOT: eot})


def _tiktoken(path, special_tokens):
    import tiktoken
    base = _gpt2_base(path)
    eot = base.eot_token
    special_ids = {s: base.n_vocab + k for k, s in enumerate(dict.fromkeys(special_tokens))}
    enc = base
    if special_ids:  # the tiktoken way to add tokens: a new Encoding over the same merges
        enc = tiktoken.Encoding(name=base.name + "_chat", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                special_tokens={**base._special_tokens, **special_ids})
    # GPT-2 has no BOS: <|endoftext|> separates documents, so it serves as both
    return Tokenizer("tiktoken", os.path.abspath(path) if path else None, enc, base.n_vocab, eot, eot, None,
                     special_ids)


def make_tokenizer(spec, special_tokens=()):
    """spec: a SentencePiece .model path, "gpt2" (tiktoken's cache), a folder/file with GPT-2 BPE files,
    or a llama2.c tokenizer .bin.
    special_tokens (e.g. SPECIAL_TOKENS) get single ids: their own if the vocab has them, else appended."""
    spec = os.fspath(spec)
    if spec.endswith(".bin"):  # a llama2.c tokenizer file (what run.c -z reads): decode/encode only
        return Llama2cTokenizer(spec)
    if spec == "gpt2":
        return _tiktoken(None, special_tokens)
    if os.path.isdir(spec) or spec.endswith((".tiktoken", ".bpe", "encoder.json")):
        return _tiktoken(spec, special_tokens)
    return _sentencepiece(spec, special_tokens)


def tokenizer_mismatch(a, b):
    """None if tokenizer metas a and b (to_meta() dicts, e.g. a checkpoint's and a dataset's) describe
    the same tokenizer, else a short description of the first difference. The content hash is compared
    when both record one (metas written before it existed do not)."""
    for key in ("kind", "vocab_size", "special_tokens", "sha256"):
        va, vb = a.get(key), b.get(key)
        if key == "sha256" and (va is None or vb is None):
            continue
        if key == "special_tokens":
            va, vb = list(va or []), list(vb or [])
        if va != vb:
            return f"{key} {va if key != 'sha256' else va[:12]} vs {vb if key != 'sha256' else vb[:12]}"
    return None


def embedded(meta):
    """The meta of a SentencePiece tokenizer with its model's own bytes in it (what checkpoints carry)."""
    if meta.get("kind") == "sentencepiece" and meta.get("path"):
        return load_tokenizer(meta).to_meta(embed=True)
    return meta


def load_tokenizer(meta):
    """Rebuild the tokenizer described by Tokenizer.to_meta() (e.g. meta["tokenizer"] of a dataset)."""
    if meta.get("kind") not in ("sentencepiece", "tiktoken"):
        raise UsageError(f"unknown tokenizer kind {meta.get('kind')!r} in metadata; "
                         f"re-run python tokenize_data.py pretokenize")
    spec = meta["path"] or "gpt2"
    if meta["kind"] == "sentencepiece" and not meta.get("path") and meta.get("model_proto") is None:
        raise UsageError("the tokenizer metadata names no SentencePiece model and carries none; pass "
                         "--tokenizer=path/to/tokenizer.model")
    if meta.get("model_proto") is not None:  # a checkpoint carries its SentencePiece model: no file needed
        tok = _sentencepiece(meta["path"], meta.get("special_tokens", ()), model_proto=bytes(meta["model_proto"]))
    else:
        tok = make_tokenizer(spec, meta.get("special_tokens", ()))
    if meta.get("sha256") and tok.content_hash() != meta["sha256"]:
        raise UsageError(f"tokenizer {spec} is not the one the data/checkpoint was made with (its content "
                         f"changed, e.g. by a new train_vocab); re-run python tokenize_data.py pretokenize with it, "
                         f"or restore the original file")
    if tok.vocab_size != meta["vocab_size"]:
        raise UsageError(f"tokenizer {spec} has {tok.vocab_size} ids but the metadata says "
                         f"{meta['vocab_size']}; the file changed since pretokenize, re-run "
                         f"python tokenize_data.py pretokenize")
    return tok
