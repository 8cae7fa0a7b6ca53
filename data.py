"""The on-disk dataset format, its writers and readers, and the batchers that feed training.

A dataset is a folder (data/README.md describes it):
    meta.json                      {"tokenizer": {...}, "vocab_size", "dtype", "bos_id", "eos_id", "splits": {...}}
    train.bin, train-00001.bin ... token ids (uint16 or uint32), documents as BOS doc EOS BOS doc EOS ..., in
    val.bin, ...                   shards of bounded size that readers see as one sequence (TokenStream)
and for fine-tuning data ("format": "sft") per split also
    {split}.mask.bin               uint8, 1 where the loss trains on the token
    {split}.offsets.bin            int64, example i is tokens[offsets[i]:offsets[i+1]]
A dataset is replaced whole or not at all (DatasetUpdate): a failed or interrupted tokenize_data.py run
leaves the previous dataset exactly as it was.
"""
import json
import os
from pathlib import Path

import numpy as np

from model import IGNORE_INDEX
from runtime import UsageError, atomic_file, fsync_path

JOURNAL, STAGED = ".update.json", ".new-"  # the commit record of an update, and the prefix of its new files


def token_dtype(n_vocab, name="auto"):
    """uint16 halves disk and memory and holds ids < 65536 (our vocabs, Llama 2's 32000, GPT-2's 50260)."""
    if name == "auto":
        return np.dtype(np.uint16 if n_vocab <= 65536 else np.uint32)
    if name not in ("uint16", "uint32"):
        raise UsageError(f"dtype '{name}' is not one of auto, uint16, uint32; pass --dtype=auto")
    if name == "uint16" and n_vocab > 65536:
        raise UsageError(f"a vocab of {n_vocab:,} ids does not fit in uint16; pass --dtype=uint32 or --dtype=auto")
    return np.dtype(name)


SPLIT_BLOCK = 1_000_000  # documents per block of the train/val split: its memory does not grow with the corpus


class DocumentSplit:
    """Which of n documents (in corpus order) are val: a seeded split of each block of SPLIT_BLOCK documents,
    round(frac * block) of them val. For a corpus of up to SPLIT_BLOCK documents that is split_documents(n, frac,
    seed) itself; a larger one never holds more than one block's indices in memory."""

    def __init__(self, n, frac, seed):
        if n < 2:
            split_documents(n, frac, seed)  # its error: too few documents to split
        self.n, self.frac, self.seed, self.block, self.mask = n, frac, seed, -1, None

    def val_mask(self, start, count):
        """Whether each of documents start .. start + count - 1 is val, as a bool array."""
        out = []
        while count > 0:
            block, offset = divmod(start, SPLIT_BLOCK)
            if block != self.block:
                size = min(SPLIT_BLOCK, self.n - block * SPLIT_BLOCK)
                self.block, self.mask = block, np.zeros(size, bool)
                if size > 1:  # a single document left over goes to train
                    self.mask[split_documents(size, self.frac, self.seed + block)[1]] = True
            take = min(count, len(self.mask) - offset)
            out.append(self.mask[offset:offset + take])
            start, count = start + take, count - take
        return np.concatenate(out) if out else np.zeros(0, bool)

    def is_val(self, i):
        return bool(self.val_mask(i, 1)[0])


def split_documents(n, frac, seed):
    """Indices of train and val documents. The split is by whole document (a seeded permutation), so
    no text the model trains on is evaluated as val; each split keeps the corpus order."""
    if n < 2:
        raise UsageError(f"{n} document(s) cannot be split into train and val; add more text "
                         f"(for one big .txt, use --txt_split=paragraph)")
    n_val = min(n - 1, max(1, round(n * frac)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---- writers ---------------------------------------------------------------------------------------

def meta_files(meta):
    """Every file name a meta.json refers to (its own name included)."""
    names = {"meta.json"}
    for info in meta.get("splits", {}).values():
        names |= {info[k] for k in ("file", "mask", "offsets", "reference") if k in info} | set(info.get("files", []))
    return names | set(meta.get("classify_files", {}).values())


def split_files(info):
    """The token files of a split's meta.json entry, in order (older datasets name one "file")."""
    return info.get("files") or [info["file"]]


class TokenStream:
    """A split's tokens as one read-only sequence however many shard files hold them: len(), [i], [a:b] (across
    shard boundaries), chunks() for a full scan. Sampling windows from it is uniform over tokens, as from one
    file. Every access maps the files afresh: a long-lived memmap leaks memory."""

    def __init__(self, paths, dtype):
        self.paths, self.dtype = [str(p) for p in paths], np.dtype(dtype)
        self.starts = np.cumsum([0] + [os.path.getsize(p) // self.dtype.itemsize for p in self.paths])
        self.filename = self.paths[0] + (f" (and {len(self.paths) - 1} more shards)" if len(self.paths) > 1 else "")

    def __len__(self):
        return int(self.starts[-1])

    def read(self, a, b):
        """Tokens [a, b) as a numpy array."""
        out, k = [], int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            take = min(b, int(self.starts[k + 1])) - a
            part = np.memmap(self.paths[k], dtype=self.dtype, mode="r")[a - self.starts[k]:a - self.starts[k] + take]
            out.append(np.array(part))
            a, k = a + take, k + 1
        return np.concatenate(out) if len(out) != 1 else out[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, _ = key.indices(len(self))
            return self.read(a, b) if b > a else np.empty(0, self.dtype)
        if not -len(self) <= key < len(self):
            raise IndexError(f"token {key} of a split of {len(self)}")
        return self.read(key % len(self), key % len(self) + 1)[0]

    def __iter__(self):
        for chunk in self.chunks(1 << 20):
            yield from chunk

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def tolist(self):
        return self[:].tolist()

    def chunks(self, n):
        for a in range(0, len(self), n):
            yield self[a:a + n]


def finish_update(data_dir):
    """Complete an update whose journal was written (its commit point) but whose renames were cut short by a
    crash; every file it names is already complete on disk. Idempotent, so any reader may do it."""
    d = Path(data_dir)
    if not (d / JOURNAL).is_file():
        return
    journal = json.loads((d / JOURNAL).read_text())
    for staged, name in journal["renames"]:
        if (d / staged).exists():
            os.replace(d / staged, d / name)
    for name in journal["remove"]:
        (d / name).unlink(missing_ok=True)
    fsync_path(d)
    (d / JOURNAL).unlink(missing_ok=True)


class DatasetUpdate:
    """Replace a dataset's files all together or not at all. Write each new file at path(name); commit(meta)
    fsyncs them, records their renames in a journal (the commit point), makes the renames (meta.json last) and
    removes the files only the old meta.json used. Before the journal, a failure (or Ctrl-C) leaves the old
    dataset exactly as it was and deletes what was staged; after it, a crash is finished by the next reader."""

    def __init__(self, data_dir):
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        finish_update(self.dir)
        for p in self.dir.glob(STAGED + "*"):  # staged by a run that died before committing
            p.unlink()
        self.staged = {}

    def path(self, name):
        self.staged[name] = self.dir / f"{STAGED}{name}"
        return self.staged[name]

    def commit(self, meta):
        with open(self.path("meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        for p in self.staged.values():
            fsync_path(p)
        try:
            old = meta_files(json.loads((self.dir / "meta.json").read_text()))
        except (OSError, ValueError):
            old = set()
        renames = [[p.name, name] for name, p in self.staged.items() if name != "meta.json"]
        journal = {"renames": renames + [[self.staged["meta.json"].name, "meta.json"]],
                   "remove": sorted(old - meta_files(meta) - set(self.staged))}
        with atomic_file(self.dir / JOURNAL) as tmp, open(tmp, "w") as f:
            json.dump(journal, f)
        self.staged = {}
        finish_update(self.dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.staged.values():  # not committed: nothing of this update may remain
            p.unlink(missing_ok=True)


def write_tokens(path, chunks, dtype):
    """Write an iterable of id sequences to path, in order; returns the number of tokens."""
    count = 0
    with open(path, "wb") as f:
        for ids in chunks:
            arr = np.asarray(ids, dtype=dtype)
            f.write(arr.tobytes())
            count += len(arr)
    return count


def dataset_meta(tok_meta, vocab_size, dtype, bos_id, eos_id, splits, **extra):
    """The meta.json dict. tok_meta is Tokenizer.to_meta(); splits maps a split name to its files and counts."""
    return {"tokenizer": tok_meta, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "bos_id": bos_id,
            "eos_id": eos_id, "splits": splits, **extra}


class ShardWriter:
    """A split's token files in a DatasetUpdate, one document at a time: a new shard once a shard holds
    max_tokens (at a document boundary, so a document never spans two files). The first is {split}.bin, then
    {split}-00001.bin, ... close() returns the split's meta.json entry."""

    def __init__(self, update, split, dtype, max_tokens):
        self.update, self.split, self.dtype, self.max_tokens = update, split, np.dtype(dtype), max_tokens
        self.files, self.f, self.in_shard, self.tokens, self.documents = [], None, 0, 0, 0

    def add(self, ids):
        arr = np.asarray(ids, dtype=self.dtype)
        self.add_many(arr, [len(arr)])

    def add_many(self, flat, lengths):
        """Documents given as one flat array and their lengths: the files add() of each would write, written in
        a few large slices (a Python call per document costs more than the encoding, at scale)."""
        flat, ends, a, doc = np.asarray(flat, dtype=self.dtype), np.cumsum(lengths), 0, 0
        while doc < len(ends):
            if self.f is None or self.in_shard >= self.max_tokens:
                if self.f is not None:
                    self.f.close()
                name = f"{self.split}.bin" if not self.files else f"{self.split}-{len(self.files):05d}.bin"
                self.files.append(name)
                self.f, self.in_shard = open(self.update.path(name), "wb"), 0
            # a document goes into this shard while the shard holds fewer than max_tokens before it
            stop = int(np.searchsorted(ends, a + self.max_tokens - self.in_shard, side="left")) + 1
            stop = min(max(stop, doc + 1), len(ends))
            b = int(ends[stop - 1])
            self.f.write(flat[a:b].tobytes())
            self.in_shard, self.tokens = self.in_shard + b - a, self.tokens + b - a
            self.documents += stop - doc
            a, doc = b, stop

    def close(self):
        if self.f is not None:
            self.f.close()
        return {"files": self.files, "documents": self.documents, "tokens": self.tokens}


def write_token_dataset(data_dir, splits, tok_meta, vocab_size, bos_id=1, eos_id=2, dtype="auto", shard_tokens=0,
                        **extra):
    """A whole pretraining dataset from in-memory token arrays {split: ids} (shards of shard_tokens if given):
    what benchmarks and tests use."""
    dt = token_dtype(vocab_size, dtype)
    info = {}
    with DatasetUpdate(data_dir) as up:
        for name, ids in splits.items():
            w = ShardWriter(up, name, dt, shard_tokens or len(ids))
            for a in range(0, len(ids), shard_tokens or max(1, len(ids))):
                w.add(ids[a:a + (shard_tokens or len(ids))])
            info[name] = {**w.close(), "documents": 1}
        up.commit(dataset_meta(tok_meta, vocab_size, dt, bos_id, eos_id, info, **extra))
    return Path(data_dir)


def write_sft_split(update, name, examples, dtype):
    """examples: [(ids, labels)] from chat.render_chat. Stages the split's tokens, loss mask and offsets in a
    DatasetUpdate; returns its meta.json entry."""
    ids = np.array([t for e, _ in examples for t in e], dtype=dtype)
    mask = np.array([lab != IGNORE_INDEX for _, labs in examples for lab in labs], dtype=np.uint8)
    offsets = np.cumsum([0] + [len(e) for e, _ in examples]).astype(np.int64)
    for suffix, arr in (("bin", ids), ("mask.bin", mask), ("offsets.bin", offsets)):
        write_tokens(update.path(f"{name}.{suffix}"), [arr], arr.dtype)
    lengths = np.diff(offsets)
    return {"file": f"{name}.bin", "mask": f"{name}.mask.bin", "offsets": f"{name}.offsets.bin",
            "examples": len(examples), "tokens": int(len(ids)), "trained_tokens": int(mask.sum()),
            "max_example_tokens": int(lengths.max()) if len(lengths) else 0,
            "median_example_tokens": int(np.median(lengths)) if len(lengths) else 0}


# ---- readers ---------------------------------------------------------------------------------------

def load_meta(data_dir):
    d = Path(data_dir)
    finish_update(d)
    if not d.is_dir():
        raise UsageError(f"dataset folder {d} not found; make it with python tokenize_data.py download "
                         f"then pretokenize (offline demo: --source=stdlib, --dataset=demo)")
    path = d / "meta.json"
    if not path.is_file():
        raise UsageError(f"{path} not found; run python tokenize_data.py pretokenize --dataset={d.name}")
    try:
        meta = json.loads(path.read_text())
        meta["splits"], meta["vocab_size"], meta["dtype"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is damaged ({type(e).__name__}: {e}); re-run python tokenize_data.py pretokenize")
    return meta


def open_split(data_dir, split):
    """The split's tokens as a read-only memmap, after checking the file matches meta.json."""
    d = Path(data_dir)
    meta = load_meta(d)
    if split not in meta["splits"]:
        raise UsageError(f"{d}/meta.json has no split '{split}' (it has {list(meta['splits'])}); "
                         f"re-run python tokenize_data.py pretokenize --dataset={d.name}")
    dt, paths = np.dtype(meta["dtype"]), [d / f for f in split_files(meta["splits"][split])]
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path} not found; re-run python tokenize_data.py pretokenize --dataset={d.name}")
        size = path.stat().st_size
        if size % dt.itemsize:
            raise UsageError(f"{path} holds {size:,} bytes, not a whole number of {dt.name} tokens; "
                             f"re-run python tokenize_data.py pretokenize --dataset={d.name}")
        if size == 0:
            raise UsageError(f"{path} is empty; add more documents or change --val_fraction, then "
                             f"re-run python tokenize_data.py pretokenize --dataset={d.name}")
    return TokenStream(paths, dt)


def check_token_ids(data_dir, split, vocab_size=None):
    """Stop if any token id is >= vocab_size (default: meta's), e.g. a .bin left from another tokenizer.
    Reads the file once in 16M-token chunks: about a second per GB. Returns the largest id."""
    data = open_split(data_dir, split)
    limit = vocab_size or load_meta(data_dir)["vocab_size"]
    top = max(int(chunk.max()) for chunk in data.chunks(1 << 24))
    if top >= limit:
        raise UsageError(f"{data.filename} holds token id {top:,} but the vocab has only {limit:,} ids; "
                         f"re-run python tokenize_data.py pretokenize --dataset={Path(data_dir).name} "
                         f"with the tokenizer you train with")
    return top


def open_sft(data_dir, split):
    """(tokens, mask, offsets) memmaps of an SFT split (meta "format": "sft"), checked against each other."""
    d = Path(data_dir)
    info = load_meta(d)["splits"][split]
    tokens = open_split(d, split)
    for key in ("mask", "offsets"):
        if not (d / info[key]).is_file():
            raise UsageError(f"{d / info[key]} not found; re-run python tokenize_data.py sft/classify "
                             f"--dataset={d.name}")
    mask = np.memmap(d / info["mask"], dtype=np.uint8, mode="r")
    offsets = np.fromfile(d / info["offsets"], dtype=np.int64)
    if len(mask) != len(tokens) or len(offsets) < 2 or offsets[-1] != len(tokens):
        raise UsageError(f"{d}/{split}.* files disagree (tokens {len(tokens)}, mask {len(mask)}, "
                         f"offsets end {offsets[-1] if len(offsets) else None}); re-run python tokenize_data.py "
                         f"sft/classify")
    return tokens, mask, offsets


# ---- batchers --------------------------------------------------------------------------------------

def window_batch(tokens, positions, block_size):
    """Inputs and next-token targets (int64, B x block_size) of the windows starting at positions."""
    rows = np.stack([tokens[i:i + block_size + 1] for i in positions]).astype(np.int64)
    return rows[:, :-1], rows[:, 1:]


def sft_batch(tokens, mask, offsets, indices, block_size, pad_id=0):
    """Inputs x and targets y (int64 arrays, B x T) for the examples at indices, right-padded to the
    longest of them (T <= block_size): no example attends to another, and padding comes after the
    real tokens so causal attention never lets a real token see it. y is the next token where the mask
    says the loss trains on it, else IGNORE_INDEX (prompt, padding). An example longer than
    block_size+1 tokens is cut to its first block_size+1."""
    spans = [(offsets[i], min(offsets[i + 1], offsets[i] + block_size + 1)) for i in indices]
    seqs = [(np.asarray(tokens[a:b], dtype=np.int64), np.asarray(mask[a:b], dtype=bool)) for a, b in spans]
    T = max(len(ids) for ids, _ in seqs) - 1
    x = np.full((len(seqs), T), pad_id, dtype=np.int64)
    y = np.full((len(seqs), T), IGNORE_INDEX, dtype=np.int64)
    for r, (ids, m) in enumerate(seqs):
        x[r, :len(ids) - 1] = ids[:-1]
        y[r, :len(ids) - 1] = np.where(m[1:], ids[1:], IGNORE_INDEX)
    return x, y


def to_device(device, *arrays):
    """numpy arrays as tensors on device; on CUDA pinned and asynchronous, so the copy overlaps the previous step."""
    import torch
    tensors = [torch.from_numpy(a) for a in arrays]
    if torch.device(device).type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


class Batches:
    """Training and evaluation batches of a dataset folder. Pretraining data is a token stream sampled as
    random windows (positions are window starts); SFT data is whole examples, one per row (positions are
    example indices), padded per batch."""

    def __init__(self, data_dir, block_size):
        self.dir, self.block_size = Path(data_dir), block_size
        self.meta = load_meta(data_dir)
        self.sft = self.meta.get("format") == "sft"
        self.pad_id = self.meta.get("eos_id") or 0
        self.tokens = {s: open_split(data_dir, s) for s in ("train", "val")}
        self.examples = {s: open_sft(data_dir, s) for s in ("train", "val")} if self.sft else {}
        for split, arr in self.tokens.items():
            if len(arr) < block_size + 1 and not self.sft:
                raise UsageError(f"{data_dir}/{split}.bin holds {len(arr)} tokens, fewer than block_size+1="
                                 f"{block_size + 1}; lower block_size or add data")

    def size(self, split):
        """How many positions a batch may draw from: window starts, or examples."""
        return len(self.examples[split][2]) - 1 if self.sft else len(self.tokens[split]) - self.block_size

    def get(self, split, positions, device=None):
        """(x, y): numpy arrays, or tensors on device."""
        if self.sft:
            x, y = sft_batch(*self.examples[split], positions, self.block_size, self.pad_id)
        else:
            x, y = window_batch(self.tokens[split], positions, self.block_size)
        return (x, y) if device is None else to_device(device, x, y)

    def truncation_report(self, split):
        """SFT: (examples longer than block_size+1 tokens, how many of them lose every answer token)."""
        _, mask, offs = self.examples[split]
        cut = np.minimum(offs[1:], offs[:-1] + self.block_size + 1)
        trained = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # answer tokens left after truncation
        return int((cut < offs[1:]).sum()), int((trained[cut] == trained[offs[:-1]]).sum())

    def sft_notes(self):
        """SFT: one line per split on truncation; refuses a split whose examples all lose their answers (it would
        train nothing and score nothing)."""
        notes = []
        for s in ("train", "val") if self.sft else ():
            cut, lost = self.truncation_report(s)
            if lost == self.size(s):
                raise UsageError(f"every {s} example loses all its answer tokens at block_size={self.block_size}: "
                                 f"nothing to train on or score; raise block_size or shorten the examples")
            notes.append(f"SFT {s}: {self.size(s):,} examples, padded per batch; {cut:,} longer than block_size+1="
                         f"{self.block_size + 1} tokens are truncated, {lost:,} of them lose every answer token")
        return notes

    def classify_examples(self, split, n):
        """The first n (text, label) pairs of a classification dataset's split, [] for other data."""
        path = self.dir / f"{split}.classify.jsonl"
        if self.meta.get("task") != "classify" or not path.is_file():
            return []
        from sources import jsonl
        return [(r["text"], r["label"]) for _, r in zip(range(n), (r for _, r in jsonl(path)))]
