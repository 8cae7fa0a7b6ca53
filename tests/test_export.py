"""export.py / formats.py: every format checked against an independent reader (run.c's byte layout via
Karpathy's own files, transformers, peft, gguf's reader), plus the golden stories260K story."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from conftest import REPO as ROOT, SHARED_DATA as DATA, tiny_model  # noqa: E402

import export  # noqa: E402
from checkpoint import build_model, load_checkpoint, load_model  # noqa: E402
from runtime import current_umask  # noqa: E402
from runtime import UsageError  # noqa: E402
from tokenizer import Llama2cTokenizer  # noqa: E402

STORIES = DATA / "stories260K"
need_stories = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="shared/data/stories260K absent")

# llama2.c's test_all.py expected_stdout: run.c and sample.py, greedy, 200 steps from BOS
GOLDEN = ('Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, '
          'she saw a big, red ball. She wanted to play with it, but it was too high.\nLily\'s mom said, "Lily, '
          'let\'s go to the park." Lily was sad and didn\'t know what to do. She said, "I want to play with your '
          'ball, but I can\'t find it."\nLily was sad and didn\'t know what to do. She said, "I\'m sorry, Lily. I '
          'didn\'t know what to do."\nLily didn\'t want to help her mom, so she')

# Q8_0 (llama2c_q8) read back vs fp32 logits, measured: tiny random model (group 32) relative L2 error
# 2.7%, max |diff| 0.13 for logits up to 4.9 (2.6%); stories260K (group 4) 0.31%, max |diff| 0.15 of 17.
# Bound: relative L2 error and max |diff| / max |logit| both under Q8_REL (5%; 1% for stories260K).
Q8_REL = 0.05


def tiny(tie=True, n_kv_heads=2, vocab=96, hidden=None, seed=0, **kw):
    m = tiny_model(seed, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab, hidden_dim=hidden,
                   max_seq_len=64, tie_embeddings=tie, **kw)
    with torch.no_grad():  # larger than the init so logits differ visibly between tokens
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return m.eval()


def state(m):
    return {k: v.detach().float() for k, v in m.state_dict().items()}


def logits(m, x):
    with torch.no_grad():
        return m(x, targets=x)[0]


def reload(path):
    return build_model(load_checkpoint(str(path))).eval()


# ---- llama2.c ----

@need_stories
def test_stories260K_golden_story_and_byte_identical_reexport(tmp_path):
    model, ckpt = load_model(str(STORIES / "stories260K.bin"))
    a = ckpt["model_args"]
    assert (a["dim"], a["hidden_dim"], a["n_layers"], a["n_heads"], a["n_kv_heads"], a["vocab_size"],
            a["max_seq_len"]) == (64, 172, 5, 8, 4, 512, 512)
    ids = model.generate(torch.tensor([[1]]), max_new_tokens=200, temperature=0)[0].tolist()
    from tokenizer import make_tokenizer
    assert make_tokenizer(str(STORIES / "tok512.model")).decode(ids) == GOLDEN
    assert Llama2cTokenizer(str(STORIES / "tok512.bin")).decode(ids) == GOLDEN  # the .bin tokenizer decodes too
    # our legacy writer reproduces Karpathy's file bit for bit (header, order, rope tables)
    export.write_llama2c(state(model), model.args, tmp_path / "s.bin", version=0)
    assert (tmp_path / "s.bin").read_bytes() == (STORIES / "stories260K.bin").read_bytes()


@need_stories
@pytest.mark.parametrize("name", ["stories260K/tok512", "llama2_tokenizer/tokenizer"])
def test_llama2c_tokenizer_file_byte_identical(tmp_path, name):
    src = DATA / (name + ".model")
    if not src.is_file():
        pytest.skip(f"{src} absent")
    out = tmp_path / "tok.bin"
    if "tok512" in name:  # once through the CLI
        r = subprocess.run([sys.executable, str(ROOT / "export.py"), f"--tokenizer={src}",
                            "--format=llama2c_tokenizer", f"--out={out}"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
    else:
        from tokenizer import make_tokenizer
        export.write_llama2c_tokenizer(make_tokenizer(str(src)), out)
    assert out.read_bytes() == (DATA / (name + ".bin")).read_bytes()
    tok = Llama2cTokenizer(str(out))
    text = "Once upon a time, Lily saw a big dog."
    import sentencepiece as spm
    assert tok.encode(text, bos=True) == [1] + spm.SentencePieceProcessor(model_file=str(src)).encode(text)


need_runc = pytest.mark.skipif(not os.environ.get("LLAMA2C_RUN"),
                               reason="set LLAMA2C_RUN to a compiled llama2.c run.c binary")


@need_runc
def test_runc_encodes_a_prompt_of_newlines_and_tabs_as_we_do(tmp_path):
    """run.c on our export of a model with a vocab trained our way: its greedy text from a prompt of newlines,
    tabs and a byte-fallback character is ours, so it read the prompt as the same ids."""
    from conftest import trained_vocab
    from tokenizer import make_tokenizer
    tok = make_tokenizer(trained_vocab(tmp_path))
    m = tiny(vocab=tok.vocab_size, seed=3)
    export.write_llama2c(state(m), m.args, tmp_path / "m.bin", version=0)
    export.write_llama2c_tokenizer(tok, tmp_path / "t.bin")
    prompt = "def f(x):\n\treturn  x\n\n\t# é"
    r = subprocess.run([os.environ["LLAMA2C_RUN"], str(tmp_path / "m.bin"), "-z", str(tmp_path / "t.bin"), "-t", "0",
                        "-n", "40", "-i", prompt], capture_output=True)
    ids = tok.encode(prompt, bos=True)
    y = m.generate(torch.tensor([ids]), max_new_tokens=41 - len(ids), temperature=0)[0].tolist()  # run.c: -n counts
    # positions after BOS
    # what run.c prints: each token's bytes, except lone bytes that are neither printable nor space (its safe_printf)
    runc = Llama2cTokenizer(str(tmp_path / "t.bin"))
    pieces = [runc.token_bytes(prev, i) for prev, i in zip(y, y[1:])]
    printed = b"".join(p for p in pieces if len(p) != 1 or 0x20 <= p[0] <= 0x7E or 0x09 <= p[0] <= 0x0D)
    assert r.stdout == printed + b"\n"


@need_stories
@need_runc
def test_runc_reads_our_export(tmp_path):
    """An independent C reader: llama2.c's run.c on our legacy file (untied head: the negative-vocab path)."""
    model, _ = load_model(str(STORIES / "stories260K.bin"))
    torch.manual_seed(0)
    with torch.no_grad():
        model.args.tie_embeddings = False
        model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight
                                                 + 0.01 * torch.randn_like(model.output.weight))
        for p in model.layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export.write_llama2c(state(model), model.args, tmp_path / "m.bin", version=0)
    from tokenizer import make_tokenizer
    export.write_llama2c_tokenizer(make_tokenizer(str(STORIES / "tok512.model")), tmp_path / "t.bin")
    r = subprocess.run([os.environ["LLAMA2C_RUN"], str(tmp_path / "m.bin"), "-z", str(tmp_path / "t.bin"),
                        "-t", "0", "-n", "120"], capture_output=True, text=True)
    ids = reload(tmp_path / "m.bin").generate(torch.tensor([[1]]), max_new_tokens=120, temperature=0)[0].tolist()
    ours = Llama2cTokenizer(str(tmp_path / "t.bin")).decode(ids)
    theirs = r.stdout.rstrip("\n")
    assert len(theirs) > 100 and ours.startswith(theirs), (theirs, ours)


@pytest.mark.parametrize("version,tie", [(0, True), (0, False), (1, True), (1, False)])
def test_llama2c_fp32_roundtrip_identical_logits(tmp_path, version, tie):
    m = tiny(tie=tie)
    path = tmp_path / "m.bin"
    export.write_llama2c(state(m), m.args, path, version=version)
    back = reload(path)
    assert back.args == m.args
    x = torch.randint(0, 96, (2, 16))
    assert torch.equal(logits(back, x), logits(m, x))


def test_llama2c_q8_error_bound(tmp_path):
    m = tiny(tie=False, hidden=96)
    path = tmp_path / "q.bin"
    gs = export.write_llama2c(state(m), m.args, path, version=2)
    assert gs == 32  # largest of 64/32/... dividing dim 64 and hidden 96
    export.write_llama2c(state(m), m.args, tmp_path / "f.bin", version=1)
    assert os.path.getsize(path) < os.path.getsize(tmp_path / "f.bin") / 3  # int8 + one fp32 scale per 32
    x = torch.randint(0, 96, (2, 16))
    ref, q = logits(m, x), logits(reload(path), x)
    assert 0 < ((q - ref).norm() / ref.norm()).item() < Q8_REL
    assert (q - ref).abs().max().item() < Q8_REL * ref.abs().max().item()
    if (STORIES / "stories260K.bin").is_file():  # a real trained model quantizes far better
        m, _ = load_model(str(STORIES / "stories260K.bin"))
        export.write_llama2c(state(m), m.args, tmp_path / "s.bin", version=2)
        x = torch.randint(0, 512, (2, 64))
        ref, q = logits(m, x), logits(reload(tmp_path / "s.bin"), x)
        assert ((q - ref).norm() / ref.norm()).item() < Q8_REL / 5


def test_llama2c_truncated_or_corrupt_is_one_line_error(tmp_path):
    m = tiny()
    good = tmp_path / "m.bin"
    export.write_llama2c(state(m), m.args, good, version=0)
    data = good.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(UsageError, match=rf"should hold {len(data):,} bytes .* but holds {len(data) - 4:,}"):
        load_checkpoint(str(tmp_path / "short.bin"))
    bad = bytearray(data)
    bad[12:16] = struct.pack("<i", 0)  # n_heads = 0
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    with pytest.raises(UsageError, match="impossible llama2.c header"):
        load_checkpoint(str(tmp_path / "bad.bin"))
    (tmp_path / "tiny.bin").write_bytes(b"\x01\x02")
    with pytest.raises(UsageError, match="too few"):
        load_checkpoint(str(tmp_path / "tiny.bin"))


def test_exports_refuse_what_they_cannot_hold_and_leave_nothing(tmp_path):
    m = tiny(rope_theta=500000.0)
    with pytest.raises(UsageError, match="rope_theta"):
        export.write_llama2c(state(m), m.args, tmp_path / "m.bin")
    from tokenizer import make_tokenizer
    gpt2 = DATA / "gpt2_bpe"
    if gpt2.is_dir():
        with pytest.raises(UsageError, match="SentencePiece vocabularies only"):
            export.write_llama2c_tokenizer(make_tokenizer(str(gpt2)), tmp_path / "t.bin")
        with pytest.raises(UsageError, match="50257 ids but the model only 96"):
            export.export_gguf(state(m), m.args, make_tokenizer(str(gpt2)), tmp_path / "m.gguf")
    with pytest.raises(UsageError, match="must carry its tokenizer"):
        export.export_gguf(state(m), m.args, None, tmp_path / "m.gguf")
    assert os.listdir(tmp_path) == []  # no partial or temporary file left behind


# ---- Hugging Face ----

@pytest.mark.parametrize("tie,n_kv", [(True, 2), (False, 4)])
def test_hf_export_loads_in_transformers_and_matches(tmp_path, tie, n_kv):
    transformers = pytest.importorskip("transformers")
    m = tiny(tie=tie, n_kv_heads=n_kv)
    export.export_hf(state(m), m.args, None, tmp_path / "hf")
    umask = current_umask()  # exported like any new folder and file, not mkdtemp's private 0700
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "hf" / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        diff = (hf(x).logits - logits(m, x)).abs().max().item()
    assert diff < 1e-4, diff
    hf.generation_config.eos_token_id = None  # run all steps, like ours with eos_id=None
    prompt = x[:1, :5]
    ours = m.generate(prompt, max_new_tokens=30, temperature=0)
    theirs = hf.generate(prompt, do_sample=False, max_new_tokens=30, attention_mask=torch.ones_like(prompt))
    assert ours.tolist() == theirs.tolist()
    # and back: HF folder -> our checkpoint gives exactly our logits again
    assert torch.equal(logits(reload(tmp_path / "hf"), x), logits(m, x))


def test_hf_sharded_import_and_cli_roundtrip(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = tiny(tie=False)
    export.export_hf(state(m), m.args, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # transformers' own sharded layout
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ckpt_path = tmp_path / "imported" / "ckpt.pt"
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), f"--checkpoint={tmp_path / 'sharded'}",
                        "--format=ours", f"--out={ckpt_path}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    x = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
    assert (logits(reload(ckpt_path), x) - ref).abs().max().item() < 1e-4
    os.remove(tmp_path / "sharded" / sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))[0])
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(str(tmp_path / "sharded"))


@need_stories
def test_hf_export_with_sentencepiece_tokenizer_and_import_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizer import make_tokenizer
    tok = make_tokenizer(str(STORIES / "tok512.model"))
    m = tiny(vocab=512)
    export.export_hf(state(m), m.args, tok, tmp_path / "hf")
    names = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["bos_token_id"] == 1 and cfg["head_dim"] == 16
    ckpt = load_checkpoint(str(tmp_path / "hf"))
    assert ckpt["tokenizer"]["kind"] == "sentencepiece" and ckpt["tokenizer"]["vocab_size"] == 512
    pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model through protobuf
    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, Lily saw 3 big dogs."
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text


def test_peft_adapter_matches_merged_lora(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    m = tiny(tie=True, n_kv_heads=2)
    export.export_hf(state(m), m.args, None, tmp_path / "hf")
    r, alpha = 4, 8.0
    torch.manual_seed(1)
    adapters, merged = {}, tiny(tie=True, n_kv_heads=2)
    for i in range(2):
        for kind, sub in (("wq", "attention"), ("wk", "attention"), ("wv", "attention"), ("w2", "feed_forward")):
            lin = getattr(getattr(merged.layers[i], sub), kind)
            A, B = 0.2 * torch.randn(r, lin.in_features), 0.2 * torch.randn(lin.out_features, r)
            adapters[f"layers.{i}.{sub}.{kind}"] = (A, B)
            with torch.no_grad():
                lin.weight += (alpha / r) * B @ A
    export.export_peft_adapter(tmp_path / "lora", adapters, r, alpha, ["wq", "wk", "wv", "w2"], tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
    assert (theirs - logits(m, x)).abs().max().item() > 1e-2  # the adapter really changes the model
    assert (theirs - logits(merged, x)).abs().max().item() < 1e-4


# ---- GGUF ----

@need_stories
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_tensors_and_metadata(tmp_path, qtype):
    gguf = pytest.importorskip("gguf")
    from tokenizer import make_tokenizer
    tok = make_tokenizer(str(STORIES / "tok512.model"))
    m = tiny(tie=False, vocab=512)
    path = tmp_path / "m.gguf"
    export.export_gguf(state(m), m.args, tok, path, qtype)
    reader = gguf.GGUFReader(str(path))
    f = reader.fields
    val = lambda k: f[k].contents()
    assert val("general.architecture") == "llama"
    assert (val("llama.embedding_length"), val("llama.block_count"), val("llama.feed_forward_length"),
            val("llama.attention.head_count"), val("llama.attention.head_count_kv"), val("llama.context_length"),
            val("llama.rope.dimension_count")) == (64, 2, m.args.hidden_dim, 4, 2, 64, 16)
    assert abs(val("llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-12 and val("llama.rope.freq_base") == 10000.0
    assert val("tokenizer.ggml.model") == "llama" and val("tokenizer.ggml.bos_token_id") == 1
    tokens = val("tokenizer.ggml.tokens")
    assert len(tokens) == 512 and tokens[:4] == [tok.backend.id_to_piece(i) for i in range(4)]
    ours = {export.gguf_name(k): v for k, v in state(m).items()}
    assert {t.name for t in reader.tensors} == set(ours)
    worst = 0.0
    for t in reader.tensors:
        ref = ours[t.name]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")).reshape(ref.shape)
        worst = max(worst, (got - ref).abs().max().item() / ref.abs().max().item())
    # fp16 keeps ~11 bits (relative 2^-11); Q8_0 rounds to 1/127 of each 32-block's max: <= 0.5/127 of the max
    assert worst < (1e-3 if qtype == "f16" else 0.5 / 127 + 1e-3), worst


@need_stories
def test_cli_imports_llama2c_file_with_tokenizer(tmp_path):
    """--format=ours turns a llama2.c .bin plus its tokenizer into a ckpt.pt that train.py init_from takes."""
    out = tmp_path / "ckpt.pt"
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), f"--checkpoint={STORIES / 'stories260K.bin'}",
                        f"--tokenizer={STORIES / 'tok512.model'}", "--format=ours", f"--out={out}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(str(out))
    assert ckpt["tokenizer"]["kind"] == "sentencepiece" and ckpt["tokenizer"]["vocab_size"] == 512
    model = build_model(ckpt).eval()
    from tokenizer import load_tokenizer
    ids = model.generate(torch.tensor([[1]]), max_new_tokens=40, temperature=0)[0].tolist()
    assert GOLDEN.startswith(load_tokenizer(ckpt["tokenizer"]).decode(ids))


def test_gpt2_tokenizer_in_hf_and_gguf(tmp_path):
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    if not (DATA / "gpt2_bpe" / "vocab.bpe").is_file():
        pytest.skip("shared/data/gpt2_bpe absent")
    from tokenizer import make_tokenizer
    tok = make_tokenizer(str(DATA / "gpt2_bpe"))
    m = tiny(vocab=50304)  # padded past GPT-2's 50257, as nanoGPT does
    export.export_hf(state(m), m.args, tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world, it's a test of 2 tokenizers."
    assert hf_tok.encode(text) == tok.encode(text)
    assert load_checkpoint(str(tmp_path / "hf"))["tokenizer"]["kind"] == "tiktoken"
    export.export_gguf(state(m), m.args, tok, tmp_path / "m.gguf", "f16")
    f = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and len(tokens) == 50304
    assert tokens[50256] == "<|endoftext|>" and tokens[50257] == "[PAD50257]"
    assert f["tokenizer.ggml.merges"].contents()[0] == "Ġ t"


@need_stories
def test_transformers_tells_the_golden_story_from_our_hf_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = load_model(str(STORIES / "stories260K.bin"))
    export.export_hf(state(model), model.args, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf.generation_config.eos_token_id = None
    ids = hf.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=200)[0].tolist()
    from tokenizer import make_tokenizer
    assert make_tokenizer(str(STORIES / "tok512.model")).decode(ids) == GOLDEN
