"""What the real other programs do with our exports, for the tokens that differ between them: transformers'
AutoTokenizer and chat template, llama.cpp's reading of our GGUF vocab (its CONTROL tokens, end of turn, its
prompt tokenization), all checked against our own encoder. Opt-in: the llama.cpp binaries themselves."""
import json
import os
import random
import subprocess

import pytest
import torch

import export
from chat import render_chat
from conftest import shared, tiny_model, trained_vocab
from tokenizer import SPECIAL_TOKENS, make_tokenizer, normalizer_spec

WORDS = ["def", " x", "  return", "\n\t", "日本語", " café", "🎉", "✓ ok", "<|user|>", " 42", "\n", "   ",
         "the", " cat", "sat.", " a", "", "\n  ", "<|end_of_turn|>", "0123"]
BATTERY = [" a", "a ", "  double  spaces", "\n    return x", "\tindented\n\t\tmore", "trailing  ", "digits 12345",
           "café ñ 日本 🦙", "<|user|>hi<|end_of_turn|>", "x<|assistant|> y", "", " ", "\n\n"]
BATTERY += ["".join(random.Random(k).choice(WORDS) for _ in range(k % 11 + 1)) for k in range(300)]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there\n\tx"},
                {"role": "assistant", "content": " Hello!"}, {"role": "user", "content": "next"}]


@pytest.fixture(scope="module", params=["trained", "llama2", "stories260K"])
def tok(request, tmp_path_factory):
    """Our trained vocab (identity, spaces kept), Llama 2's, and llama2.c's tok512 (spaces collapsed)."""
    if request.param == "trained":
        return make_tokenizer(trained_vocab(tmp_path_factory.mktemp("vocab")), SPECIAL_TOKENS)
    path = shared("llama2_tokenizer", "tokenizer.model") if request.param == "llama2" else \
        shared("stories260K", "tok512.model")
    return make_tokenizer(path, SPECIAL_TOKENS)


def answering_model(tok, answer):
    """A model that, whatever came before, follows <|assistant|> with `answer` and then <|end_of_turn|>: the
    blocks write nothing (wo, w2 zero), so the next token depends on the current one only, through one-hot
    embeddings and an untied head that maps them."""
    m = tiny_model(vocab_size=tok.vocab_size, dim=64, max_seq_len=128, tie_embeddings=False)
    assistant, eot = tok.special_ids["<|assistant|>"], tok.special_ids["<|end_of_turn|>"]
    with torch.no_grad():
        for layer in m.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        m.tok_embeddings.weight[assistant], m.tok_embeddings.weight[answer] = torch.eye(64)[0], torch.eye(64)[1]
        m.output.weight.zero_()
        m.output.weight[answer, 0], m.output.weight[eot, 1] = 10.0, 10.0
    return m


def exported(tok, tmp_path, fmt, m=None):
    m = m if m is not None else tiny_model(vocab_size=tok.vocab_size, dim=64, max_seq_len=128)
    state = {k: v.float() for k, v in m.state_dict().items()}
    if fmt == "hf":
        export.export_hf(state, m.args, tok, tmp_path / "hf")
        return tmp_path / "hf", m
    export.export_gguf(state, m.args, tok, tmp_path / "m.gguf", "f16")
    return tmp_path / "m.gguf", m


def test_autotokenizer_encodes_exactly_as_we_do(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, _ = exported(tok, tmp_path, "hf")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf.encode("hi") == tok.encode("hi", bos=True)  # BOS first, as ours with bos=True
    wrong = [t for t in BATTERY if hf.encode(t, add_special_tokens=False) != tok.encode(t)]
    assert not wrong, wrong[:5]
    for t in BATTERY:  # decoding: exact but after a chat special, where ours drops the piece's dummy-prefix space
        if not any(s in t for s in SPECIAL_TOKENS):
            assert hf.decode(tok.encode(t)) == tok.decode(tok.encode(t)), t


def test_chat_template_renders_our_ids_and_generation_stops_at_end_of_turn(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    answer, eot = tok.encode(" x")[-1], tok.special_ids["<|end_of_turn|>"]
    folder, m = exported(tok, tmp_path, "hf", answering_model(tok, answer))
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = render_chat(tok, CONVERSATION, add_generation_prompt=True)[0]
    theirs = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert theirs == ours  # the template renders what chat.py renders, BOS included
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_id, eot]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # the answer, then the end of turn, where both stop by themselves
        mine = m.generate(torch.tensor([ours]), 6, temperature=0, eos_id=[tok.eos_id, eot])[0].tolist()
        hfs = hf.generate(torch.tensor([theirs]), max_new_tokens=6, do_sample=False,
                          attention_mask=torch.ones(1, len(theirs), dtype=torch.long))[0].tolist()
    assert mine == hfs == ours + [answer, eot]


def llama_cpp_tokenize(fields, text):
    """llama.cpp's SentencePiece tokenization of a prompt with special parsing on, written from its rules: cut
    the text at CONTROL and USER_DEFINED token texts (longest first); give each text fragment that follows a
    special (or starts the prompt) a leading space; spaces become "▁"; then merge the best-scoring adjacent
    pair until none is in the vocab, with unknown characters as their <0xXX> byte pieces."""
    tokens, scores, types = (fields[k].contents() for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                              "tokenizer.ggml.token_type"))
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, ty in zip(tokens, types) if ty in (3, 4)), key=len, reverse=True)
    out, prev_special, rest = [fields["tokenizer.ggml.bos_token_id"].contents()], True, text
    while rest:
        at = min(((rest.find(s), -len(s), s) for s in specials if s in rest), default=None)
        fragment, special = (rest, None) if at is None else (rest[:at[0]], at[2])
        if fragment:
            pieces = []
            for ch in ((" " if prev_special else "") + fragment).replace(" ", "\u2581"):
                pieces += [ids[ch]] if ch in ids else [ids[f"<0x{b:02X}>"] for b in ch.encode()]
            while True:
                pairs = [(scores[ids[tokens[a] + tokens[b]]], -k) for k, (a, b) in enumerate(zip(pieces, pieces[1:]))
                         if tokens[a] + tokens[b] in ids]
                if not pairs:
                    break
                k = -max(pairs)[1]
                pieces[k:k + 2] = [ids[tokens[pieces[k]] + tokens[pieces[k + 1]]]]
            out += pieces
            prev_special = False
        if special is None:
            break
        out.append(ids[special])
        prev_special, rest = True, rest[at[0] + len(special):]
    return out


def test_gguf_marks_the_chat_tokens_as_llama_cpp_expects(tok, tmp_path):
    gguf = pytest.importorskip("gguf")
    path, m = exported(tok, tmp_path, "gguf")
    f = gguf.GGUFReader(str(path)).fields
    val = lambda k: f[k].contents()  # noqa: E731
    types, scores = val("tokenizer.ggml.token_type"), val("tokenizer.ggml.scores")
    for s, i in tok.special_ids.items():  # CONTROL, score -1000: llama.cpp's converter's marks for added specials
        assert (val("tokenizer.ggml.tokens")[i], types[i], scores[i]) == (s, int(gguf.TokenType.CONTROL), -1000.0)
    assert val("tokenizer.ggml.eot_token_id") == tok.special_ids["<|end_of_turn|>"]
    assert (val("tokenizer.ggml.pre"), val("tokenizer.ggml.add_bos_token"), val("tokenizer.ggml.add_eos_token")) == \
        ("default", True, False)
    assert val("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert val("llama.attention.key_length") == val("llama.attention.value_length") == 64 // m.args.n_heads
    assert "<|assistant|>" in val("tokenizer.chat_template")
    rendered = tok.decode(render_chat(tok, CONVERSATION, add_generation_prompt=True)[0])
    if not normalizer_spec(tok.backend.serialized_model_proto())["remove_extra_whitespaces"]:
        # (llama.cpp does not collapse spaces as llama2.c's tok512 asks SentencePiece to: there they differ)
        for text in [rendered] + BATTERY[:60]:
            assert llama_cpp_tokenize(f, text) == tok.encode(text, bos=True), text


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_BIN"), reason="set LLAMA_CPP_BIN to a folder of llama.cpp "
                    "binaries (llama-tokenize) built from github.com/ggml-org/llama.cpp")
def test_llama_cpp_itself_tokenizes_our_gguf_as_we_do_and_ends_at_end_of_turn(tok, tmp_path):
    if normalizer_spec(tok.backend.serialized_model_proto())["remove_extra_whitespaces"]:
        pytest.skip("llama.cpp does not collapse runs of spaces as this vocab's SentencePiece normalizer does")
    path, _ = exported(tok, tmp_path, "gguf")
    rendered = tok.decode(render_chat(tok, CONVERSATION, add_generation_prompt=True)[0])
    binary = os.path.join(os.environ["LLAMA_CPP_BIN"], "llama-tokenize")
    for text in [rendered] + BATTERY[:40]:
        if text:
            r = subprocess.run([binary, "-m", str(path), "-p", text, "--ids", "--no-escape"], capture_output=True,
                               text=True)
            assert json.loads(r.stdout.strip().splitlines()[-1]) == tok.encode(text, bos=True), (text, r.stderr[-500:])
    assert f"EOG token        = {tok.special_ids['<|end_of_turn|>']} '<|end_of_turn|>'" in r.stderr


def test_gpt2_chat_template_renders_our_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = make_tokenizer(shared("gpt2_bpe"), SPECIAL_TOKENS)
    m = tiny_model(vocab_size=50304, dim=64)
    export.export_hf({k: v.float() for k, v in m.state_dict().items()}, m.args, tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert theirs == render_chat(tok, CONVERSATION, add_generation_prompt=True)[0]
