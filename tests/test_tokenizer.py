"""tokenizer.py: round trips, chat specials, streaming decode, metadata, against real vocabularies."""
import json
import os
from pathlib import Path

import pytest

from conftest import SHARED_DATA, trained_vocab
from runtime import UsageError
from tokenizer import SPECIAL_TOKENS, load_tokenizer, make_tokenizer

SHARED = SHARED_DATA
LLAMA = SHARED / "llama2_tokenizer" / "tokenizer.model"
GPT2_DIR = SHARED / "gpt2_bpe"
need_llama = pytest.mark.skipif(not LLAMA.is_file(), reason=f"Llama 2 tokenizer not at {LLAMA}")
need_gpt2 = pytest.mark.skipif(not (GPT2_DIR / "vocab.bpe").is_file(), reason=f"GPT-2 BPE files not at {GPT2_DIR}")

# code with indentation, blank lines, digits, non-Latin text, an emoji (byte fallback) and the chat specials
TEXT = ("def f(x):\n    return x + 12345\n\n\n  two  spaces  \ttab\n"
        "<|user|> héllo 日本語 🦙<|assistant|>ok<|end_of_turn|>\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 400-token vocab trained by our own train_vocab on ~300 KB of the stdlib."""
    return make_tokenizer(trained_vocab(tmp_path_factory.mktemp("data")))


def stream(tok, ids):
    decoder = tok.stream()
    return "".join(decoder.add(i) for i in ids)


def test_trained_sentencepiece_round_trip_and_specials(trained):
    tok = trained
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400
    # specials are real pieces inside the 400, after the merges: llama2.c's layout (<unk> <s> </s>, then the 256
    # byte pieces at 3..258) holds, as run.c assumes
    assert tok.special_ids == {"<|user|>": 397, "<|assistant|>": 398, "<|end_of_turn|>": 399}
    assert [tok.backend.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]
    assert all(tok.backend.is_byte(i) for i in range(3, 259))
    for s, i in tok.special_ids.items():
        assert tok.encode(s) == [i] and tok.decode([i]) == s
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == TEXT  # identity normalization, spaces kept, byte fallback for 🦙
    assert stream(tok, ids) == TEXT
    assert "<0x0A>" in {tok.backend.id_to_piece(i) for i in ids}  # newline is a byte piece, streamed as "\n"
    # a model can emit byte tokens that are no UTF-8 (a lead byte then another lead byte, a stray continuation):
    # the streamed pieces still add up to decode(), U+FFFD for each maximal invalid run, as Python's decoder
    bad = [3 + 0xE6, 3 + 0xE6, 3 + 0x97, 3 + 0xA5, 3 + 0x80, 3 + 0xC3] + tok.encode("ok")  # "▁ok": " ok"
    assert stream(tok, bad) == tok.decode(bad) == "\ufffd\u65e5\ufffd\ufffd ok"


def test_trained_to_meta_load_round_trip(trained):
    meta = trained.to_meta()
    import hashlib
    digest = hashlib.sha256(trained.backend.serialized_model_proto()).hexdigest()
    assert meta == {"kind": "sentencepiece", "path": trained.path, "special_tokens": SPECIAL_TOKENS,
                    "vocab_size": 400, "bos_id": 1, "eos_id": 2, "sha256": digest}
    again = load_tokenizer(meta)
    assert again.encode(TEXT) == trained.encode(TEXT) and again.special_ids == trained.special_ids


@need_llama
def test_llama2_model_golden_ids_and_appended_specials():
    plain = make_tokenizer(LLAMA)
    assert plain.vocab_size == 32000 and (plain.bos_id, plain.eos_id, plain.pad_id) == (1, 2, None)
    assert plain.encode("Hello world") == [15043, 3186]  # the ids Meta's tokenizer gives
    assert len(plain.encode("<|user|>")) > 1  # without specials added they are plain text
    tok = make_tokenizer(LLAMA, SPECIAL_TOKENS)
    assert tok.vocab_size == 32003
    assert tok.special_ids == {"<|user|>": 32000, "<|assistant|>": 32001, "<|end_of_turn|>": 32002}
    ids = tok.encode(TEXT, bos=True)
    assert [i for i in ids if i >= 32000] == [32000, 32001, 32002]
    assert tok.decode(ids) == TEXT and stream(tok, ids) == TEXT
    assert load_tokenizer(tok.to_meta()).encode(TEXT) == ids[1:]


@need_gpt2
def test_gpt2_local_files_match_tiktoken_reference(monkeypatch):
    import tiktoken
    tok = make_tokenizer(GPT2_DIR, SPECIAL_TOKENS)
    assert tok.kind == "tiktoken" and tok.vocab_size == 50260
    assert tok.bos_id == tok.eos_id == 50256 and tok.pad_id is None
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.special_ids == {"<|user|>": 50257, "<|assistant|>": 50258, "<|end_of_turn|>": 50259}
    assert make_tokenizer(GPT2_DIR / "r50k_base.tiktoken").encode(TEXT) == make_tokenizer(GPT2_DIR).encode(TEXT)
    # the reference: tiktoken's own gpt2 encoding, from the offline cache
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(GPT2_DIR / "tiktoken_cache"))
    ref = tiktoken.get_encoding("gpt2")
    plain = "no specials here, just text\n\n  x = 1"
    assert tok.encode(plain) == ref.encode(plain)
    assert make_tokenizer("gpt2", SPECIAL_TOKENS).encode(TEXT) == tok.encode(TEXT)
    assert load_tokenizer(make_tokenizer("gpt2").to_meta()).path is None


@need_gpt2
def test_gpt2_specials_round_trip_and_streaming_split_utf8():
    tok = make_tokenizer(GPT2_DIR, SPECIAL_TOKENS)
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert [i for i in ids if i > 50256] == [50257, 50258, 50259]
    assert tok.decode(ids) == TEXT
    # 日 is split over two byte tokens: the streaming decoder holds the first half back
    ja = tok.encode("日")
    decoder = tok.stream()
    assert len(ja) == 2 and decoder.add(ja[0]) == "" and decoder.add(ja[1]) == "日"
    assert stream(tok, ids) == TEXT
    # specials only when asked for, and typed <|endoftext|> is text, never the control id
    assert len(make_tokenizer(GPT2_DIR).encode("<|user|>")) > 1
    assert 50256 not in tok.encode("a <|endoftext|> b")


@need_gpt2
def test_decode_drops_ids_of_a_padded_embedding():
    tok = make_tokenizer(GPT2_DIR)
    assert tok.decode(tok.encode("hi") + [50300]) == "hi" and tok.stream().add(50300) == ""


def test_errors_are_one_line(tmp_path, trained):
    with pytest.raises(UsageError, match="not found; train one"):
        make_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UsageError, match="is not a SentencePiece model"):
        make_tokenizer(tmp_path / "junk.model")
    with pytest.raises(UsageError, match="no GPT-2 BPE files"):
        make_tokenizer(tmp_path)
    with pytest.raises(UsageError, match="GPT-2 BPE path .* not found"):
        make_tokenizer(tmp_path / "r50k_base.tiktoken")
    meta = dict(trained.to_meta(), vocab_size=401)
    with pytest.raises(UsageError, match="has 400 ids but the metadata says 401"):
        load_tokenizer(meta)
    with pytest.raises(UsageError, match="unknown tokenizer kind"):
        load_tokenizer(dict(meta, kind="bert"))
    assert "\n" not in str(pytest.raises(UsageError, make_tokenizer, os.fspath(tmp_path / "x.model")).value)


def test_changed_tokenizer_file_is_refused_and_embedded_model_needs_no_file(trained, tmp_path):
    meta = trained.to_meta()
    with pytest.raises(UsageError, match="not the one the data/checkpoint was made with"):
        load_tokenizer({**meta, "sha256": "0" * 64})  # as if train_vocab had rewritten the file
    embedded = {**trained.to_meta(embed=True), "path": str(tmp_path / "gone.model")}
    again = load_tokenizer(embedded)
    assert again.encode(TEXT) == trained.encode(TEXT) and again.special_ids == trained.special_ids


def test_stream_decoder_equals_decode_token_by_token(trained):
    """Streaming is one token at a time (constant work per token) and gives exactly decode()'s text, for
    sequences that mix BOS, chat specials, leading and repeated spaces, byte-fallback pieces and UTF-8
    characters split over several tokens, streamed from the start or after a prompt."""
    import random
    tok = make_tokenizer(trained.path, SPECIAL_TOKENS)
    words = ["def", " x", "  return", "\n\t", "日本語", " café", "🎉", "✓ ok", "<|user|>", "<|end_of_turn|>",
             " 42", "\n"]
    rng = random.Random(0)
    for _ in range(200):
        ids = tok.encode("".join(rng.choice(words) for _ in range(rng.randrange(1, 12))), bos=rng.random() < 0.5)
        for prefix in (0, len(ids) // 2, len(ids) - 1):  # from the start, or continuing after a prompt
            if "\ufffd" in tok.decode(ids[:prefix]):
                continue  # a prompt is whole text: it never ends inside a character
            decoder = tok.stream(ids[prefix - 1] if prefix else None)
            text = "".join(decoder.add(i) for i in ids[prefix:]) + decoder.flush()
            assert tok.decode(ids[:prefix]) + text == tok.decode(ids), ids


def test_exported_tokenizer_bin_encodes_like_us_as_run_c_reads_it(trained, tmp_path):
    """run.c reads tokenizer.bin assuming the byte pieces at 3..258 (byte b is id b + 3) and encodes by merging
    the best-scoring pair; Llama2cTokenizer does exactly that. Every byte and a prompt of newlines and tabs
    must get our ids."""
    import export
    from tokenizer import Llama2cTokenizer
    export.write_llama2c_tokenizer(trained, tmp_path / "tok.bin")
    runc = Llama2cTokenizer(str(tmp_path / "tok.bin"))
    assert runc.byte_ids == list(range(3, 259))  # run.c's fixed offset is right for our vocab
    # every byte UTF-8 text can hold: 0..255 as code points (ASCII, and C2/C3 + every continuation byte), then a
    # character for each other lead byte of 2-, 3- and 4-byte sequences (C0, C1, F5..FF never occur in UTF-8)
    leads = [(b - 0xC0) << 6 for b in range(0xC4, 0xE0)] + [max(0x800, (b - 0xE0) << 12) for b in range(0xE0, 0xF0)] \
        + [max(0x10000, (b - 0xF0) << 18) for b in range(0xF0, 0xF5)]
    every_byte = "".join(chr(c) for c in range(256)) + "".join(chr(c) for c in leads)
    assert set(every_byte.encode()) == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    for text in (every_byte, "def f(x):\n\treturn  x\n\n\t\tdone\n", " leading", "a\r\nb"):
        assert runc.encode(text, bos=True) == trained.encode(text, bos=True), text


def test_a_tokenizer_bin_with_its_byte_pieces_elsewhere_is_read_by_their_text(tmp_path):
    """A vocab whose user symbols come before the bytes (ids 3-5, bytes at 6..261, as our vocabularies were
    once made): the .bin reader finds the byte pieces by their text, so bytes still encode and decode right."""
    import sentencepiece as spm
    import export
    from tokenizer import Llama2cTokenizer
    (tmp_path / "c.txt").write_text(Path(json.__file__).read_text())
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "old"), model_type="bpe",
                                   vocab_size=400, byte_fallback=True, user_defined_symbols=SPECIAL_TOKENS,
                                   character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)  # run.c normalizes nothing
    ours = make_tokenizer(str(tmp_path / "old.model"))
    export.write_llama2c_tokenizer(ours, tmp_path / "old.bin")
    read = Llama2cTokenizer(str(tmp_path / "old.bin"))
    assert read.byte_ids == list(range(6, 262))
    for text in ("tab\there\nnew line", "caf\u00e9 \u00fc \u4e2d", "\U0001D11E!"):
        assert read.encode(text, bos=True) == ours.encode(text, bos=True), text
        assert read.decode(ours.encode(text)) == text


def test_a_damaged_tokenizer_bin_is_refused_in_one_line(tmp_path):
    """A .bin cut short (inside a header or a piece), with a length below zero or above its own maximum, or with
    bytes after the last piece: one line naming the token, never a wrong vocab or a loop that walks back."""
    import struct
    from tokenizer import Llama2cTokenizer

    def entry(score, piece):
        return struct.pack("<fi", score, len(piece)) + piece
    pieces = [b"<unk>", b"<s>", b"</s>", b"a", b" b", b"ab"]
    good = struct.pack("<I", 5) + b"".join(entry(-i, p) for i, p in enumerate(pieces))
    (tmp_path / "t.bin").write_bytes(good)
    tok = Llama2cTokenizer(str(tmp_path / "t.bin"))
    assert tok.pieces == pieces and tok.scores == [0.0, -1.0, -2.0, -3.0, -4.0, -5.0] and tok.vocab_size == 6
    assert tok.lookup[b"ab"] == 5 and tok.decode([3, 4]) == "a b"
    negative = good[:good.index(b" b") - 4] + struct.pack("<i", -2) + good[good.index(b" b"):]
    too_long = good[:good.index(b" b") - 4] + struct.pack("<i", 6) + good[good.index(b" b"):]
    for data, said in [(good[:-1], "ends inside token 5: truncated or corrupt"),
                       (good[:-len(entry(0, b"ab")) + 3], "ends inside token 5: truncated or corrupt"),
                       (good + b"\0", "ends inside token 6: truncated or corrupt"),
                       (negative, "token 4 claims -2 bytes (at most 5)"), (too_long, "token 4 claims 6 bytes")]:
        (tmp_path / "bad.bin").write_bytes(data)
        with pytest.raises(UsageError) as e:
            Llama2cTokenizer(str(tmp_path / "bad.bin"))
        assert said in str(e.value) and "\n" not in str(e.value), (said, str(e.value))
