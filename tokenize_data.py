"""Turn text into the token arrays train.py reads.

    python tokenize_data.py download    [config.py] [--key=value ...]   # text -> data/<name>/docs.jsonl
    python tokenize_data.py train_vocab [config.py] [--key=value ...]   # docs -> data/<name>/tok<N>.model
    python tokenize_data.py pretokenize [config.py] [--key=value ...]   # docs -> train.bin, val.bin, meta.json
    python tokenize_data.py sft         [config.py] [--key=value ...]   # chat/Alpaca/TinyStories-Instruct -> SFT arrays
    python tokenize_data.py classify    [config.py] [--key=value ...]   # labelled text (csv/jsonl) -> SFT arrays
    python tokenize_data.py dpo         [config.py] [--key=value ...]   # preference pairs -> DPO arrays (dpo.py)

Offline demo (the Python standard library as a corpus, one document per .py file):
    python tokenize_data.py download --source=stdlib
    python tokenize_data.py train_vocab --dataset=demo --vocab_size=512
    python tokenize_data.py pretokenize --dataset=demo

The format it writes (and train.py/evaluate.py read) lives in data.py; importing this module does no work.
"""
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from chat import alpaca_messages, classification_messages, render_chat, show_example, tinystories_messages
from checkpoint import load_checkpoint
from data import (DatasetUpdate, DocumentSplit, ShardWriter, dataset_meta, split_documents, token_dtype,
                  write_sft_split)
from dpo import prepare as prepare_preferences
from runtime import TMP_PREFIX, FolderLock, UsageError, atomic_file, check, fsync_path, handle_errors
from sources import jsonl_texts, load_texts, read_jsonl_texts, read_records, read_text, stdlib_docs, tinystories_entries
from tokenizer import SPECIAL_TOKENS, append_user_pieces, load_tokenizer, make_tokenizer

# -----------------------------------------------------------------------------
# where things go
data_root = "data"        # parent folder of every dataset folder
dataset = ""              # dataset folder name under data_root; "" = derived from source (stdlib -> demo)
# download
source = "roneneldan/TinyStories"  # a Hugging Face Hub dataset, "stdlib", or local files/glob (.txt .jsonl .json
                          # .parquet)
hf_config = ""            # Hub dataset config name, if it has several ("" = default)
hf_split = "train"        # which split to take from the Hub / local files
text_field = "text"       # the column holding the document text
txt_split = "paragraph"   # .txt files: "paragraph" (blank lines separate documents), "document" (a file is one), "line"
max_docs = -1             # keep only the first N documents (-1 = all); for quick experiments
stdlib_max_bytes = 4_000_000  # size cap of the stdlib demo corpus, so the demo trains on a CPU in minutes
# train_vocab
vocab_size = 512          # SentencePiece vocab size, chat specials and 256 byte pieces included
vocab_max_bytes = 20_000_000  # train the vocab on a random sample of at most this much text (speed)
# pretokenize
tokenizer = ""            # "" = data_root/dataset/tok<vocab_size>.model; or any .model, "gpt2", or a GPT-2 BPE folder
chat_specials = True      # give the chat specials ids (appended to gpt2/Llama vocabs), so the model can be chat-tuned
val_fraction = 0.05       # fraction of documents held out for val (at least 1)
seed = 1337               # seeds the train/val document split and the vocab sample
dtype = "auto"            # token file dtype: "auto" (uint16 if the vocab fits, else uint32), "uint16", "uint32"
num_workers = 0           # pretokenize: worker processes that parse and encode (0 = all CPU cores)
shard_tokens = 268_435_456  # pretokenize: tokens per shard file at most (268M: 512 MiB of uint16)
# sft / classify (source = a local .json/.jsonl/.csv/.txt file; tokenizer may also be a checkpoint .pt)
sft_format = "auto"       # "auto", "alpaca" ({instruction,input,output}), "chat" ({messages}), "tinystories"
                          # (TinyStories-Instruct .txt)
label_field = "label"     # classify: the column holding the label (text_field holds the text)
label_names = ()          # classify: the label set, in order; numeric labels index into it (0 -> label_names[0])
encoding = "auto"         # text encoding of the source: "auto" (utf-8, else latin-1), or any Python codec name
show = 0                  # print the first N examples token by token beside their labels (a debug view)
skip_bad_lines = False    # classify: count and leave out lines without a text or a known label (else stop at one)
# dpo (preference pairs: source = a local .json/.jsonl file; tokenizer as for sft)
block_size = 256          # dpo: a row (prompt + one answer) keeps at most block_size + 1 tokens; train with it
reference = ""            # dpo: a checkpoint whose log-probs of every pair are stored with the data ("" = none)
# -----------------------------------------------------------------------------

DOCS = "docs.jsonl"


def dataset_dir():
    name = dataset or ("demo" if source == "stdlib" else
                       Path(source.rstrip("/")).name.split("*")[0].split(".")[0].lower() or "local")
    return Path(data_root) / name


def docs_path(d):
    path = Path(d) / DOCS
    if not path.is_file():
        raise UsageError(f"{path} not found; run python tokenize_data.py download first (offline demo: "
                         f"--source=stdlib)")
    return path


def count_docs(path):
    """(documents, bytes) of docs.jsonl, counted fast: its non-blank lines (the records, parsed later, where a bad
    one stops the run by its line number before anything is replaced) and its size."""
    n = 0
    with open(path, "rb") as f:
        for line in f:
            n += not line.isspace()
    if not n:
        raise UsageError(f"{path} holds no documents; re-run python tokenize_data.py download on a non-empty source")
    return n, os.path.getsize(path)


def byte_ranges(path, size=1 << 22):
    """(start, end) byte ranges of path of about size bytes, each ending at a line end: what one worker reads,
    parses and encodes itself (the parent touches no text, so every core encodes)."""
    total, start = os.path.getsize(path), 0
    with open(path, "rb") as f:
        while start < total:
            f.seek(min(start + size, total))
            f.readline()
            yield start, f.tell()
            start = f.tell()


_worker_tok = None  # each worker process's own tokenizer


def _start_worker(spec, specials):
    global _worker_tok
    _worker_tok = make_tokenizer(spec, specials)


def _encode_range(path, start, end, dt):
    """In a worker: read, parse, encode and pack one byte range; the parent only writes. (token array, lengths)"""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        lines = raw.decode("utf-8").split("\n")  # "\n" only: JSON strings may hold U+2028, which splitlines cuts at
        texts = jsonl_texts(lines, path)
    except (UsageError, UnicodeDecodeError):  # the same error again, numbered by the file's lines (rare: count them)
        with open(path, "rb") as f:
            first = 1 + f.read(start).count(b"\n")
        try:
            lines = raw.decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            line = first + raw[:e.start].count(b"\n")
            raise UsageError(f"{path} line {line} is not UTF-8 text ({e.reason}); save the file as UTF-8")
        texts = jsonl_texts(lines, path, first)
    ids = _worker_tok.encode_batch(texts, bos=True, eos=True)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dt, count=int(lengths.sum())), lengths


def write_docs(path, records, atomic=True):
    """JSONL, one record (a str becomes {"text": ...}) per line; atomically unless path is already staged."""
    with atomic_file(path) if atomic else contextlib.nullcontext(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r} if isinstance(r, str) else r, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# download

def download():
    """The source's documents into docs.jsonl, streamed: a corpus larger than memory passes through."""
    out, count = dataset_dir(), [0, 0]
    texts = stdlib_docs(stdlib_max_bytes) if source == "stdlib" else load_texts(source, text_field, hf_config,
                                                                                  hf_split, txt_split)

    def documents():  # empty docs would be bare BOS/EOS pairs
        for t in texts:
            if max_docs >= 0 and count[0] >= max_docs:
                return
            if isinstance(t, str) and t.strip():
                count[0], count[1] = count[0] + 1, count[1] + len(t.encode())
                yield t
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / DOCS) as tmp:
        write_docs(tmp, documents(), atomic=False)
        if not count[0]:
            raise UsageError(f"{source} gave no non-empty documents in column '{text_field}'; "
                             f"check --source and --text_field")
    print(f"wrote {count[0]:,} documents ({count[1] / 1e6:.1f} MB) from {source} to {out / DOCS}")


# -----------------------------------------------------------------------------
# train_vocab

def train_vocab():
    import sentencepiece as spm
    d = dataset_dir()
    path = docs_path(d)
    # a seeded random sample of about vocab_max_bytes keeps vocab training fast on big corpora (SentencePiece
    # holds its input in memory), chosen in one streaming pass
    n_special = len(SPECIAL_TOKENS)
    check(vocab_size > 259 + n_special, f"vocab_size={vocab_size} leaves no room for merges: the 256 byte pieces, "
          f"<unk> <s> </s> and {n_special} chat tokens take {259 + n_special}; pass a larger --vocab_size")
    keep = min(1.0, vocab_max_bytes / count_docs(path)[1])  # the file's size: at least its text's
    rng = np.random.default_rng(seed)
    prefix, staged = d / f"tok{vocab_size}", d / f"{TMP_PREFIX}tok{vocab_size}"  # staged: cleaned if we die
    sample_path, total = d / f"{TMP_PREFIX}tok_sample.txt", 0
    try:
        with open(sample_path, "w", encoding="utf-8") as f:
            for text in read_jsonl_texts(path):
                if rng.random() < keep:
                    f.write(text.strip() + "\n")
                    total += len(text.encode())
        print(f"training a {vocab_size}-token SentencePiece BPE on {total / 1e6:.1f} MB of {d / DOCS}")
        # llama2.c's train_vocab settings (themselves Meta's Llama 2 ones), plus our chat specials
        spm.SentencePieceTrainer.train(
            input=str(sample_path), model_prefix=str(staged), model_type="bpe", vocab_size=vocab_size - n_special,
            input_format="text", character_coverage=1.0, num_threads=os.cpu_count(),
            split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
            unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
            add_dummy_prefix=True,  # as llama2.c / Llama 2: " the" and "the" at text start are one piece
            # Llama 2 keeps runs of spaces (llama2.c's default collapses them): code indentation survives
            remove_extra_whitespaces=False,
            minloglevel=2)  # SentencePiece's INFO log is hundreds of lines
    except RuntimeError as e:
        raise UsageError(f"SentencePiece could not train a {vocab_size}-token vocab on {d / DOCS} "
                         f"({str(e).splitlines()[0]}); try a larger --vocab_size or more text")
    finally:
        sample_path.unlink(missing_ok=True)
    # the chat specials become real single pieces at the end, after the merges: ids 0-2 control, 3-258 bytes
    staged_model = Path(str(staged) + ".model")
    staged_model.write_bytes(append_user_pieces(staged_model.read_bytes(), SPECIAL_TOKENS))
    with open(str(staged) + ".vocab", "a", encoding="utf-8") as f:
        f.writelines(f"{s}\t0\n" for s in SPECIAL_TOKENS)
    for ext in (".vocab", ".model"):  # the .model last: it is what pretokenize reads
        fsync_path(str(staged) + ext)  # on disk before the rename, as runtime.atomic_file does
        os.replace(str(staged) + ext, str(prefix) + ext)
    fsync_path(str(d))
    print(f"wrote {prefix}.model; next: python tokenize_data.py pretokenize --dataset={d.name} "
          f"--vocab_size={vocab_size}")


# -----------------------------------------------------------------------------
# pretokenize

def write_chunk(out, split, i, flat, lengths):
    """Documents i, i+1, ... (one chunk, packed) into their splits' shards; returns the next document's index."""
    val = split.val_mask(i, len(lengths))
    in_val = np.repeat(val, lengths)
    out["train"].add_many(flat[~in_val], lengths[~val])
    out["val"].add_many(flat[in_val], lengths[val])
    return i + len(lengths)


def pretokenize():
    """docs.jsonl into token shards, streamed: memory stays flat however large the corpus. Worker processes each
    read, parse, encode and pack a range of lines (the Python around the tokenizer costs too much to leave in one
    process); ranges are written in order, every document whole into train or val by a seeded split of its index
    (data.DocumentSplit)."""
    d = dataset_dir()
    path = docs_path(d)
    n, nbytes = count_docs(path)
    spec = tokenizer or str(d / f"tok{vocab_size}.model")
    specials = SPECIAL_TOKENS if chat_specials else ()
    tok = make_tokenizer(spec, specials)
    dt, workers = token_dtype(tok.vocab_size, dtype), num_workers or os.cpu_count()
    split = DocumentSplit(n, val_fraction, seed)
    print(f"tokenizing {n:,} documents ({nbytes / 1e6:,.1f} MB) with {tok} into {dt.name}, {workers} processes, "
          f"shards of up to {shard_tokens:,} tokens")
    t0, i = time.time(), 0
    # fork where there is one: workers start at once, without importing this script again
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with DatasetUpdate(d) as up, ProcessPoolExecutor(workers, ctx, _start_worker, (spec, specials)) as pool:
        out = {s: ShardWriter(up, s, dt, shard_tokens) for s in ("train", "val")}
        pending = collections.deque()  # a few chunks in flight: enough to keep every worker busy, memory bounded
        for start, end in byte_ranges(path):
            pending.append(pool.submit(_encode_range, path, start, end, dt))
            if len(pending) > 2 * workers:
                i = write_chunk(out, split, i, *pending.popleft().result())
        while pending:
            i = write_chunk(out, split, i, *pending.popleft().result())
        splits = {s: w.close() for s, w in out.items()}
        for s, info in splits.items():
            print(f"  {s}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(info['files'])} "
                  f"shard(s) -> {d / info['files'][0]}")
        up.commit(dataset_meta(tok.to_meta(), tok.vocab_size, dt, tok.bos_id, tok.eos_id, splits,
                               val_fraction=val_fraction, seed=seed))
    seconds = time.time() - t0
    print(f"wrote {d / 'meta.json'} ({nbytes / 1e6 / seconds:,.1f} MB/s)")


# -----------------------------------------------------------------------------
# sft / classify: rendered chat examples + a loss mask (the format is described in data/README.md)

def sft_conversations(path):
    """[(line number, messages)] from Alpaca records, chat records ({"messages": [...]}) or TinyStories-Instruct."""
    fmt = sft_format
    if fmt == "tinystories" or (fmt == "auto" and path.endswith(".txt")):
        return list(enumerate((tinystories_messages(e) for e in tinystories_entries(read_text(path, encoding))), 1))
    out = []
    for n, r in read_records(path, encoding, text_field, label_field):
        if not isinstance(r, dict):
            raise UsageError(f"{path} line {n} is a JSON {type(r).__name__}, not an object; one record per line")
        if fmt in ("chat", "auto") and "messages" in r:
            out.append((n, r["messages"]))
        elif fmt in ("alpaca", "auto") and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
            out.append((n, alpaca_messages(r)))
        else:
            raise UsageError(f"{path} line {n} has neither 'messages' nor string 'instruction'/'output' fields "
                             f"(it has {sorted(r)}); fix that record or pass --sft_format")
    return out


def classify_examples(path):
    """([(line number, text, label)], label set). Numeric labels index label_names; text labels must be in it.
    A bad line stops the run with the fix for its format, or with skip_bad_lines is counted and left out."""
    rows, bad = [], []

    def refuse(n, why):
        if not skip_bad_lines:
            raise UsageError(f"{path} line {n} {why}, or pass --skip_bad_lines=True to leave such lines out")
        bad.append(n)
    for n, r in read_records(path, encoding, text_field, label_field):
        if not isinstance(r, dict) or text_field not in r or label_field not in r:
            refuse(n, "has no '@label' at its end (sentence@label lines, as in Financial PhraseBank): fix it"
                   if path.endswith(".txt") else f"has no '{text_field}' and '{label_field}' fields; pass "
                   f"--text_field/--label_field naming its columns")
        else:
            rows.append((n, str(r[text_field]), str(r[label_field]).strip()))
    check(len(set(label_names)) == len(label_names), f"label_names={label_names} repeats a label; list each once")
    names = list(label_names) or sorted({lab for _, _, lab in rows})
    out = []
    for n, text, lab in rows:
        if lab not in names and lab.isdigit() and int(lab) < len(label_names):
            lab = names[int(lab)]  # 0/1/2 -> bearish/bullish/neutral
        if lab not in names:
            refuse(n, f"has label '{lab}', not in the label set {names}; fix the line or pass --label_names")
        else:
            out.append((n, text, lab))
    if bad:
        print(f"skipped {len(bad):,} bad line(s) of {path} (lines {', '.join(map(str, bad[:10]))}"
              f"{', ...' if len(bad) > 10 else ''})")
    present = sorted({lab for _, _, lab in out})  # one label would score a perfect, meaningless accuracy
    check(len(present) >= 2 or not out, f"{path} has examples of {len(present)} label(s) {present}; a classifier "
                                        f"needs at least two: add examples of the others")
    return out, names


def write_sft(up, tok, examples, train_idx, val_idx, extra):
    """examples: [(ids, labels)] from chat.render_chat, split by index and staged in the DatasetUpdate up;
    meta.json says "format": "sft"."""
    dt = token_dtype(tok.vocab_size, dtype)
    splits = {}
    for name, idx in (("train", train_idx), ("val", val_idx)):
        info = splits[name] = write_sft_split(up, name, [examples[i] for i in idx], dt)
        print(f"  {name}: {info['examples']:,} examples, {info['tokens']:,} tokens ({info['trained_tokens']:,} "
              f"trained), example length median {info['median_example_tokens']}, max {info['max_example_tokens']}")
    up.commit(dataset_meta(tok.to_meta(), tok.vocab_size, dt, tok.bos_id, tok.eos_id, splits, format="sft",
                           val_fraction=val_fraction, seed=seed, source=os.path.abspath(source), **extra))
    print(f"wrote {up.dir / 'meta.json'}")


def sft_tokenizer():
    if tokenizer.endswith(".pt") or os.path.isdir(tokenizer) and os.path.isfile(os.path.join(tokenizer, "ckpt.pt")):
        ckpt_tok = load_checkpoint(tokenizer).get("tokenizer")
        if not ckpt_tok:
            raise UsageError(f"checkpoint {tokenizer} records no tokenizer; pass --tokenizer=path/to/tokenizer.model")
        return load_tokenizer(ckpt_tok)
    return make_tokenizer(tokenizer or str(dataset_dir() / f"tok{vocab_size}.model"), SPECIAL_TOKENS)


def render_all(tok, convs):
    examples = []
    for n, messages in convs:
        try:
            examples.append(render_chat(tok, messages))
        except (UsageError, ValueError, AttributeError, TypeError) as e:
            raise UsageError(f"{source} line {n}: {e}; fix that record")
    for ids, labels in examples[:show]:
        print(show_example(tok, ids, labels))
    return examples


def sft():
    convs = sft_conversations(source)
    if max_docs >= 0:
        convs = convs[:max_docs]
    if not convs:
        raise UsageError(f"{source} holds no examples; pass a non-empty file")
    tok = sft_tokenizer()
    examples = render_all(tok, convs)
    train_idx, val_idx = split_documents(len(examples), val_fraction, seed)  # by whole example, seeded
    print(f"{len(examples):,} conversations from {source}, split {len(train_idx):,} train / {len(val_idx):,} val")
    with DatasetUpdate(dataset_dir()) as up:
        write_sft(up, tok, examples, train_idx, val_idx, {"task": "sft"})


def classify():
    rows, names = classify_examples(source)
    if max_docs >= 0:
        rows = rows[:max_docs]
    if len(rows) < 2:
        raise UsageError(f"{source} holds {len(rows)} labelled example(s); need at least 2 (train and val)")
    tok = sft_tokenizer()
    examples = render_all(tok, [(n, classification_messages(t, names, lab)) for n, t, lab in rows])
    # stratified: each label is split on its own with the same seed, so val keeps the class balance
    by_label = [np.array([i for i, r in enumerate(rows) if r[2] == lab]) for lab in names]
    parts = [split_documents(len(ix), val_fraction, seed) if len(ix) > 1 else (np.arange(len(ix)), np.arange(0))
             for ix in by_label]
    train_idx = np.sort(np.concatenate([ix[tr] for ix, (tr, _) in zip(by_label, parts)]))
    val_idx = np.sort(np.concatenate([ix[va] for ix, (_, va) in zip(by_label, parts)]).astype(np.int64))
    counts = {lab: len(ix) for lab, ix in zip(names, by_label)}
    print(f"{len(rows):,} labelled texts from {source}, labels {counts}, stratified split "
          f"{len(train_idx):,} train / {len(val_idx):,} val")
    with DatasetUpdate(dataset_dir()) as up:
        for name, idx in (("train", train_idx), ("val", val_idx)):  # the raw texts, for evaluate.py classify
            write_docs(up.path(f"{name}.classify.jsonl"), [{"text": rows[i][1], "label": rows[i][2]} for i in idx],
                       atomic=False)
        write_sft(up, tok, examples, train_idx, val_idx, {"task": "classify", "labels": names,
                  "classify_files": {"train": "train.classify.jsonl", "val": "val.classify.jsonl"}})


def dpo():
    """Preference pairs -> the preference format (dpo.prepare: split by record as sft splits, pairs dropped after)."""
    records = read_records(source, encoding, text_field, label_field)[:max_docs if max_docs >= 0 else None]
    ref = load_checkpoint(reference) if reference else None
    tok = load_tokenizer(ref["tokenizer"]) if ref and ref.get("tokenizer") and not tokenizer else sft_tokenizer()
    prepare_preferences(dataset_dir(), tok, records, source, block_size, val_fraction, seed, ref, reference, print)


# the settings each subcommand reads: --help and the printed config show these only
USES = {"download": "data_root dataset source hf_config hf_split text_field txt_split max_docs stdlib_max_bytes",
        "train_vocab": "data_root dataset source vocab_size vocab_max_bytes seed",
        "pretokenize": "data_root dataset source vocab_size tokenizer chat_specials val_fraction seed dtype "
                       "num_workers shard_tokens",
        "sft": "data_root dataset source tokenizer vocab_size sft_format max_docs val_fraction seed dtype encoding "
               "show",
        "classify": "data_root dataset source tokenizer vocab_size text_field label_field label_names max_docs "
                    "val_fraction seed dtype encoding show skip_bad_lines",
        "dpo": "data_root dataset source tokenizer vocab_size max_docs val_fraction seed encoding block_size reference"}

if __name__ == "__main__":
    handle_errors()
    from configurator import configure, print_config, require
    commands = {"download": download, "train_vocab": train_vocab, "pretokenize": pretokenize, "sft": sft,
                "classify": classify, "dpo": dpo}
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        configure(globals(), ["--help"])
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise UsageError(f"give a subcommand, one of {', '.join(commands)}; "
                         f"e.g. python tokenize_data.py download --source=stdlib")
    uses = USES[sys.argv[1]].split()
    print_config(configure(globals(), sys.argv[2:], only=uses), only=uses)
    require(globals(), positive=("vocab_size", "vocab_max_bytes", "stdlib_max_bytes", "shard_tokens", "block_size"),
            non_negative=("num_workers", "show"), fraction=("val_fraction",))
    check(max_docs >= -1, f"max_docs={max_docs} must be -1 (all) or a count >= 0")
    lock = FolderLock(dataset_dir(), "tokenize_data.py run")  # one writer per dataset folder
    commands[sys.argv[1]]()
