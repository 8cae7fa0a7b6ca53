"""tokenize_data.py: download -> train_vocab -> pretokenize, the .bin/meta.json contract, and its errors."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO as ROOT, SHARED_DATA  # noqa: E402
import forkrun  # noqa: E402
import data as ds  # noqa: E402
import sources  # noqa: E402
import tokenize_data as td  # noqa: E402
from runtime import UsageError  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

SHARED = SHARED_DATA
GPT2_DIR = SHARED / "gpt2_bpe"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"


def configure(monkeypatch, **cfg):
    """Our config is module globals: set them as configure() would."""
    for k, v in cfg.items():
        assert hasattr(td, k), k
        monkeypatch.setattr(td, k, v)


def corpus(n=60):
    """n unique real documents: stanzas of Python's own source (never generated filler)."""
    docs = sorted({d for d in sources.stdlib_docs(400_000)})
    chunks = [c for d in docs for c in d.split("\n\n\n") if len(c.strip()) > 40]
    return list(dict.fromkeys(chunks))[:n]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def documents(ids, bos, eos):
    """Split a token stream back into documents at BOS ... EOS."""
    out, start = [], None
    for k, t in enumerate(ids.tolist()):
        if t == bos:
            start = k + 1
        elif t == eos:
            out.append(tuple(ids[start:k].tolist()))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small dataset built in-process: 60 real documents, a 400-token vocab."""
    root = tmp_path_factory.mktemp("data")
    src = write_jsonl(root / "src.jsonl", corpus())
    with pytest.MonkeyPatch.context() as mp:
        configure(mp, data_root=str(root), dataset="small", source=str(src), vocab_size=400,
                  val_fraction=0.2, num_workers=1)
        td.download()
        td.train_vocab()
        td.pretokenize()
    return root / "small"


def test_dtype_rule():
    assert ds.token_dtype(512) == np.uint16
    assert ds.token_dtype(50260) == np.uint16  # GPT-2 + 3 chat specials
    assert ds.token_dtype(65536) == np.uint16  # ids 0..65535 all fit
    assert ds.token_dtype(65537) == np.uint32
    assert ds.token_dtype(512, "uint32") == np.uint32
    with pytest.raises(UsageError, match="does not fit in uint16"):
        ds.token_dtype(100_000, "uint16")
    with pytest.raises(UsageError, match="not one of auto"):
        ds.token_dtype(512, "int8")


def test_split_is_by_document_seeded_and_disjoint():
    train, val = ds.split_documents(1000, 0.05, 1337)
    assert len(val) == 50 and not set(train) & set(val) and sorted([*train, *val]) == list(range(1000))
    assert np.array_equal(val, ds.split_documents(1000, 0.05, 1337)[1])
    assert not np.array_equal(val, ds.split_documents(1000, 0.05, 7)[1])
    assert len(ds.split_documents(3, 0.0, 0)[1]) == 1 and len(ds.split_documents(2, 0.9, 0)[0]) == 1
    with pytest.raises(UsageError, match="cannot be split"):
        ds.split_documents(1, 0.05, 0)


def test_meta_and_bins(built):
    meta = ds.load_meta(built)
    tok = load_tokenizer(meta["tokenizer"])
    assert meta["vocab_size"] == tok.vocab_size == 400 and meta["dtype"] == "uint16"
    assert (meta["bos_id"], meta["eos_id"]) == (tok.bos_id, tok.eos_id) == (1, 2)
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["tokenizer"]["path"].endswith("tok400.model")
    assert meta["val_fraction"] == 0.2 and meta["seed"] == 1337
    assert meta["splits"]["train"]["documents"] == 48 and meta["splits"]["val"]["documents"] == 12
    for split in ("train", "val"):
        data = ds.open_split(built, split)
        assert data.dtype == np.uint16 and len(data) == meta["splits"][split]["tokens"]
        assert ds.check_token_ids(built, split) < 400


def test_train_and_val_documents_are_disjoint_and_complete(built):
    meta = ds.load_meta(built)
    tok = load_tokenizer(meta["tokenizer"])
    train = documents(ds.open_split(built, "train"), tok.bos_id, tok.eos_id)
    val = documents(ds.open_split(built, "val"), tok.bos_id, tok.eos_id)
    assert len(train) == 48 and len(val) == 12
    assert not set(train) & set(val)
    # every source document comes back exactly once, decoded to its own text
    texts = sorted(tok.decode(list(d)) for d in train + val)
    assert texts == sorted(corpus())


def test_gpt2_is_uint16_and_forced_uint32_reads_the_same(tmp_path, built, monkeypatch):
    if not (GPT2_DIR / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2 BPE files not at {GPT2_DIR}")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "docs.jsonl").write_bytes((built / "docs.jsonl").read_bytes())
    configure(monkeypatch, data_root=str(tmp_path), dataset="g", tokenizer=str(GPT2_DIR), num_workers=1)
    td.pretokenize()
    meta = ds.load_meta(tmp_path / "g")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50260 and meta["bos_id"] == meta["eos_id"] == 50256
    small = np.array(ds.open_split(tmp_path / "g", "train"))
    configure(monkeypatch, dtype="uint32")
    td.pretokenize()
    big = ds.open_split(tmp_path / "g", "train")
    assert ds.load_meta(tmp_path / "g")["dtype"] == "uint32" and big.dtype == np.uint32
    assert os.path.getsize(tmp_path / "g" / "train.bin") == 4 * len(small) and np.array_equal(big, small)


def test_open_split_errors(tmp_path, built):
    with pytest.raises(UsageError, match="not found; make it with python tokenize_data.py download"):
        ds.load_meta(tmp_path / "nope")
    with pytest.raises(UsageError, match="meta.json not found; run python tokenize_data.py pretokenize"):
        ds.load_meta(tmp_path)
    d = tmp_path / "copy"
    d.mkdir()
    for f in ("meta.json", "train.bin", "val.bin"):
        (d / f).write_bytes((built / f).read_bytes())
    with open(d / "train.bin", "ab") as f:
        f.write(b"\x00")  # a torn write: one byte too many
    n = os.path.getsize(d / "train.bin")
    with pytest.raises(UsageError, match=f"holds {n:,} bytes, not a whole number of uint16 tokens; re-run"):
        ds.open_split(d, "train")
    (d / "train.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="is empty"):
        ds.open_split(d, "train")
    np.array([1, 5, 400, 2], dtype=np.uint16).tofile(d / "train.bin")  # 400 is past a 400-token vocab
    with pytest.raises(UsageError, match="holds token id 400 but the vocab has only 400 ids"):
        ds.check_token_ids(d, "train")
    assert ds.check_token_ids(d, "train", vocab_size=512) == 400
    with pytest.raises(UsageError, match="no split 'test'"):
        ds.open_split(d, "test")
    (d / "val.bin").unlink()
    with pytest.raises(UsageError, match="val.bin not found"):
        ds.open_split(d, "val")


def test_download_errors(tmp_path, monkeypatch, built):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    configure(monkeypatch, data_root=str(tmp_path / "data"), source=str(bad))
    with pytest.raises(UsageError, match="bad.jsonl line 3"):
        td.download()
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   \n"])
    configure(monkeypatch, source=str(empty))
    with pytest.raises(UsageError, match="no non-empty documents"):
        td.download()
    configure(monkeypatch, source=str(write_jsonl(tmp_path / "ok.jsonl", ["a", "b"])), text_field="story")
    with pytest.raises(UsageError, match=r"has no column 'story' \(it has \['text'\]\)"):
        td.download()
    configure(monkeypatch, dataset="never_downloaded")
    with pytest.raises(UsageError, match="docs.jsonl not found; run python tokenize_data.py download"):
        td.train_vocab()
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "docs.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    configure(monkeypatch, dataset="x")
    with pytest.raises(UsageError, match="line 2 is not a JSON object with a 'text' string"):
        td.train_vocab()
    # pretokenize parses in its worker processes: the error still names the line, and nothing is written
    configure(monkeypatch, tokenizer=str(built / "tok400.model"))
    with pytest.raises(UsageError, match="x/docs.jsonl line 2 is not a JSON object with a 'text' string"):
        td.pretokenize()
    assert sorted(p.name for p in (tmp_path / "data" / "x").iterdir()) == ["docs.jsonl"]


def run_cli(*args, cwd, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",  # as run_script's: forked
               HF_DATASETS_CACHE=str(cwd / "hf_cache"), HF_HUB_OFFLINE="1", **(env or {}))
    return forkrun.run([sys.executable, str(ROOT / "tokenize_data.py"), *args], cwd, env, 240)


def test_cli_end_to_end(tmp_path):
    """The user's path: local JSONL through datasets, vocab, then two-process pretokenize."""
    docs = corpus(40)
    write_jsonl(tmp_path / "stories.jsonl", docs)
    common = ["--data_root=out_data", "--vocab_size=400"]
    for cmd in (["download", "--source=stories.jsonl"], ["train_vocab", "--dataset=stories"],
                ["pretokenize", "--dataset=stories", "--num_workers=2"]):
        r = run_cli(*cmd, *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    d = tmp_path / "out_data" / "stories"
    assert sorted(p.name for p in d.iterdir()) == ["docs.jsonl", "meta.json", "tok400.model", "tok400.vocab",
                                                    "train.bin", "val.bin"]
    meta = ds.load_meta(d)
    assert meta["splits"]["val"]["documents"] == 2 and meta["splits"]["train"]["documents"] == 38
    tok = load_tokenizer(meta["tokenizer"])
    train = documents(ds.open_split(d, "train"), tok.bos_id, tok.eos_id)
    assert sorted(tok.decode(list(x)) for x in train) == sorted(docs[i] for i in ds.split_documents(40, .05, 1337)[0])


def test_cli_txt_and_one_line_errors(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph,\nstill first.\n\nSecond one.\n\n\nThird.\n")
    r = run_cli("download", "--source=a.txt", "--data_root=d", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(sources.read_jsonl_texts(tmp_path / "d" / "a" / "docs.jsonl")) == [
        "First paragraph,\nstill first.", "Second one.", "Third."]
    for args, msg in ((["download", "--data_root=d"],
                       "could not load 'roneneldan/TinyStories' from the Hugging Face Hub"),
                      (["pretokenize", "--dataset=a", "--data_root=d"], "a/tok512.model not found; train one"),
                      (["frobnicate"], "give a subcommand"),
                      (["download", "--vocab_sise=3"], "did you mean vocab_size")):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stdlib_demo_corpus_is_capped_real_python(tmp_path, monkeypatch):
    configure(monkeypatch, data_root=str(tmp_path), source="stdlib", stdlib_max_bytes=200_000)
    td.download()
    docs = list(sources.read_jsonl_texts(tmp_path / "demo" / "docs.jsonl"))
    assert 0 < sum(len(d.encode()) for d in docs) <= 200_000
    assert all(compile(d, "<doc>", "exec") for d in docs)  # whole, valid Python files


def test_meta_json_round_trip_through_data_py(tmp_path):
    """What the writers write, the readers read back: token arrays, SFT masks and offsets, meta.json."""
    tok = {"kind": "sentencepiece", "path": None, "special_tokens": [], "vocab_size": 70000, "bos_id": 1, "eos_id": 2}
    train, val = np.arange(5, 1005) * 61, np.array([69999, 3, 4])
    d = ds.write_token_dataset(tmp_path / "big", {"train": train, "val": val}, tok, 70000, note="x")
    meta = ds.load_meta(d)
    assert meta["dtype"] == "uint32" and meta["note"] == "x" and meta["tokenizer"] == tok  # 70000 ids need uint32
    assert meta["splits"]["train"] == {"files": ["train.bin"], "documents": 1, "tokens": 1000}
    assert np.array_equal(ds.open_split(d, "train"), train) and np.array_equal(ds.open_split(d, "val"), val)
    assert ds.check_token_ids(d, "val") == 69999
    examples = [([1, 5, 6, 7], [-100, -100, 6, 7]), ([1, 9], [-100, 9]), ([1, 2, 3], [-100, -100, -100])]
    with ds.DatasetUpdate(d) as up:
        info = ds.write_sft_split(up, "train", examples, np.uint16)
        assert (info["examples"], info["tokens"], info["trained_tokens"], info["max_example_tokens"]) == (3, 9, 3, 4)
        meta["format"], meta["dtype"], meta["splits"]["train"] = "sft", "uint16", info
        up.commit(meta)
    tokens, mask, offsets = ds.open_sft(d, "train")
    assert list(offsets) == [0, 4, 6, 9] and list(tokens) == [1, 5, 6, 7, 1, 9, 1, 2, 3]
    assert list(mask) == [0, 0, 1, 1, 0, 1, 0, 0, 0]
    assert not [p for p in os.listdir(d) if p.startswith(".tmp")]  # atomic writes leave no temporaries


def test_shards_read_as_one_file_and_the_split_works_in_blocks(tmp_path, monkeypatch):
    """pretokenize with small shards writes the same tokens as one file; readers see one sequence across shard
    boundaries; the train/val split of a corpus larger than a block stays seeded, disjoint and ~val_fraction."""
    docs = [f"document {i}: " + "the cat sat " * (i % 13) for i in range(300)]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "docs.jsonl", docs)
    tok = str(GPT2_DIR) if (GPT2_DIR / "vocab.bpe").is_file() else pytest.skip("GPT-2 BPE files absent")
    configure(monkeypatch, data_root=str(tmp_path), dataset="d", tokenizer=tok, num_workers=2, val_fraction=0.1)
    td.pretokenize()
    whole = {s: np.array(ds.open_split(tmp_path / "d", s)) for s in ("train", "val")}
    configure(monkeypatch, shard_tokens=500)
    td.pretokenize()
    meta = ds.load_meta(tmp_path / "d")
    assert len(meta["splits"]["train"]["files"]) > 3 and sorted(os.listdir(tmp_path / "d")) == sorted(
        ["docs.jsonl", "meta.json"] + meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"])  # old gone
    stream = ds.open_split(tmp_path / "d", "train")
    assert np.array_equal(np.array(stream), whole["train"]) and len(stream) == len(whole["train"])
    assert np.array_equal(stream[490:1510], whole["train"][490:1510])  # a slice across shard boundaries
    x, y = ds.window_batch(stream, [0, 499, 995], 16)
    assert np.array_equal(x[1], whole["train"][499:515]) and np.array_equal(y[2], whole["train"][996:1012])
    assert list(stream)[:5] == list(whole["train"][:5]) and stream[-1] == whole["train"][-1]
    # blocks: with 64-document blocks, each block's split is its own seeded split_documents
    monkeypatch.setattr(ds, "SPLIT_BLOCK", 64)
    split = ds.DocumentSplit(300, 0.1, 7)
    val = [i for i in range(300) if split.is_val(i)]
    assert val == [i for i in range(300) if ds.DocumentSplit(300, 0.1, 7).is_val(i)]  # reproducible
    per_block = [sum(1 for i in val if i // 64 == b) for b in range(5)]
    assert per_block == [6, 6, 6, 6, 4]  # round(0.1 * 64) in each full block, round(0.1 * 44) in the last
    assert [i % 64 for i in val if i < 64] == sorted(ds.split_documents(64, 0.1, 7)[1].tolist())


def test_shard_writer_packs_documents_as_one_at_a_time_would(tmp_path):
    """add_many (what pretokenize's parent calls per chunk) writes the files of the rule: a shard takes documents
    while it holds fewer than max_tokens, so a document never spans two files."""
    rng = np.random.default_rng(0)

    class Update:
        def path(self, name):
            return str(tmp_path / name)
    for trial in range(50):
        lengths, cap = rng.integers(0, 20, size=rng.integers(1, 30)), int(rng.integers(1, 40))
        flat = rng.integers(0, 60000, size=int(lengths.sum())).astype(np.uint16)
        w = ds.ShardWriter(Update(), f"t{trial}", np.uint16, cap)
        cut = int(rng.integers(0, len(lengths) + 1))
        w.add_many(flat[:lengths[:cut].sum()], lengths[:cut])
        w.add_many(flat[lengths[:cut].sum():], lengths[cut:])
        info = w.close()
        expected, held = [], None  # the rule, one document at a time
        for n in lengths:
            if held is None or held >= cap:
                expected.append(0)
                held = 0
            expected[-1], held = expected[-1] + int(n), held + int(n)
        sizes = [os.path.getsize(tmp_path / f) // 2 for f in info["files"]]
        assert sizes == expected and info["documents"] == len(lengths)
        assert np.array_equal(np.concatenate([np.fromfile(tmp_path / f, np.uint16) for f in info["files"]]), flat)
    split = ds.DocumentSplit(2_345_678, 0.05, 3)  # val_mask across block boundaries = is_val one by one
    mask = split.val_mask(999_990, 1_000_030)
    assert [bool(m) for m in mask[:40]] == [ds.DocumentSplit(2_345_678, 0.05, 3).is_val(i) for i in range(999_990,
                                                                                                      1_000_030)]
    assert np.array_equal(np.flatnonzero(ds.DocumentSplit(2_345_678, 0.05, 3).val_mask(0, 1_000_000)),
                          ds.split_documents(1_000_000, 0.05, 3)[1])


def test_pretokenize_workers_name_the_bad_line(tmp_path, monkeypatch, built):
    """Lines are parsed in worker processes, chunk by chunk; an error still names the file's own line number."""
    (tmp_path / "d").mkdir()
    good = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3000))
    configure(monkeypatch, data_root=str(tmp_path), dataset="d", tokenizer=str(built / "tok400.model"))
    monkeypatch.setattr(td, "byte_ranges", lambda path, size=4096, f=td.byte_ranges: f(path, size))  # many chunks
    for bad, why in ((b'{"text": 5}\n', "line 2501 is not a JSON object with a 'text' string .TypeError: its 'text' "
                                         "is a JSON int"),
                     (b'{"text": "caf\xe9"}\n', "line 2501 is not UTF-8 text")):
        lines = good.encode().splitlines(keepends=True)
        (tmp_path / "d" / "docs.jsonl").write_bytes(b"".join(lines[:2500]) + bad + b"".join(lines[2500:]))
        with pytest.raises(UsageError, match=why):
            td.pretokenize()
    assert sorted(os.listdir(tmp_path / "d")) == ["docs.jsonl"]


def test_a_sharded_dataset_trains_exactly_as_one_file(tmp_path):
    """Sampling is uniform over tokens, so the same tokens in 1 or 7 shards give bit-identical losses, and an
    interrupted run on shards resumes exactly."""
    from conftest import TINY, read_metrics, run_script
    toks = np.random.default_rng(0).integers(0, 64, 12000)
    meta = {"kind": "sentencepiece", "path": None, "special_tokens": [], "vocab_size": 64, "bos_id": 1, "eos_id": 2}
    ds.write_token_dataset(tmp_path / "data" / "one", {"train": toks[:10000], "val": toks[10000:]}, meta, 64)
    ds.write_token_dataset(tmp_path / "data" / "many", {"train": toks[:10000], "val": toks[10000:]}, meta, 64,
                           shard_tokens=1500)
    assert len(ds.load_meta(tmp_path / "data" / "many")["splits"]["train"]["files"]) == 7
    common = [f"--data_root={tmp_path / 'data'}", *TINY, "--max_iters=8", "--eval_interval=4", "--log_interval=1"]
    losses = {}
    for name, extra in (("one", []), ("many", []), ("part", ["--stop_at_iter=5"]), ("part", ["--init_from=resume"])):
        run_script("train.py", *common, f"--dataset={'one' if name == 'one' else 'many'}",
                   f"--out_dir={tmp_path / name}", *extra)
        losses[name] = [(r["iter"], r["loss"]) for r in read_metrics(tmp_path / name, "train")]
    assert losses["one"] == losses["many"] == losses["part"] and len(losses["one"]) == 8
