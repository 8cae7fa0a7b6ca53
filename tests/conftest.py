"""Shared test helpers: the repo on sys.path, the shared data folder, a tiny pretokenized dataset, a tiny
model, running a script as a user would and checking its one-line error."""
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import forkrun

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)  # the suite runs on 2 shared cores; more threads only thrash
# compiled decode steps (decode.CompiledDecoder) go here, not to the user's ~/.cache; kept between runs, as
# inductor's own cache is
os.environ.setdefault("LLAMAFORGE_CACHE", os.path.join(tempfile.gettempdir(), "llamaforge-test-cache"))


def shared(*parts):
    """Path into ../shared/data, or skip the test with a reason when a fresh clone lacks it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not present (it lives beside the repo, not in it)")
    return path


def run_script(script, *args, cwd=None, check=True, timeout=240, env=None):
    """Run one of our CLIs in a process of its own, as a user would (forked from a server that has imported
    torch: tests/forkrun.py); returns the CompletedProcess."""
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    proc = forkrun.run([sys.executable, str(REPO / script), *map(str, args)], cwd, e, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_dataset(root, name="tiny", n_tokens=20000, vocab_size=64, seed=0, dtype="uint16", tokenizer=None):
    """A pretokenized dataset in the on-disk format of tokenize_data.py, with text from a simple
    order-1 Markov chain (learnable structure: a model can beat its unigram entropy)."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(vocab_size, 0.1), size=vocab_size)  # peaky next-token distributions
    toks = np.empty(n_tokens, dtype=np.int64)
    toks[0] = 0
    for i in range(1, n_tokens):
        toks[i] = rng.choice(vocab_size, p=trans[toks[i - 1]])
    from data import write_token_dataset
    n_val = n_tokens // 10
    tok = tokenizer or {"kind": "sentencepiece", "path": None, "special_tokens": [], "vocab_size": vocab_size,
                        "bos_id": 1, "eos_id": 2}
    d = write_token_dataset(Path(root) / name, {"train": toks[n_val:], "val": toks[:n_val]}, tok, vocab_size,
                            dtype=dtype)
    return d, toks


def trained_vocab(root, vocab_size=400, stdlib_bytes=300_000):
    """A SentencePiece vocab trained by tokenize_data.py train_vocab itself, on part of the stdlib (~2 s)."""
    import tokenize_data as td
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(data_root=str(root), dataset="demo", source="stdlib", stdlib_max_bytes=stdlib_bytes,
                         vocab_size=vocab_size).items():
            mp.setattr(td, k, v)
        td.download()
        td.train_vocab()
    return Path(root) / "demo" / f"tok{vocab_size}.model"


def quick_vocab(folder, text, vocab_size=400):
    """A SentencePiece BPE trained in-process on text (well under a second) with the chat specials appended as
    train_vocab appends them: a real tokenizer for a tiny model, no shared data needed. Returns the .model path."""
    import sentencepiece as spm
    from tokenizer import SPECIAL_TOKENS, append_user_pieces
    folder = Path(folder)
    (folder / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tok"), model_type="bpe",
                                   vocab_size=vocab_size - len(SPECIAL_TOKENS), character_coverage=1.0,
                                   byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", num_threads=1, minloglevel=2)
    (folder / "tok.model").write_bytes(append_user_pieces((folder / "tok.model").read_bytes(), SPECIAL_TOKENS))
    return folder / "tok.model"


def save_tiny_checkpoint(path, model, tok, **extra):
    """model as one of our checkpoints (its folder made), with its tokenizer embedded."""
    from checkpoint import save_checkpoint
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model_args": model.args.to_dict(), "model": model.state_dict(),
                     "tokenizer": tok.to_meta(embed=True), **extra}, path)
    return Path(path)


def one_line_error(proc, *fragments):
    """The property every script keeps for bad input: a non-zero exit, no traceback, and a last line
    `error: ...` that holds each fragment."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), proc.stderr[-3000:]
    for f in fragments:
        assert f in last, (f, last)
    return last


def tiny_model(seed=0, **kw):
    """A 2-layer GQA Llama with random weights, in eval mode; any ModelArgs field can be overridden."""
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=48)
    return Transformer(ModelArgs(**{**args, **kw})).eval()


def read_metrics(out_dir, kind=None):
    lines = [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if kind is None or r.get("type") == kind]


# the smallest model settings that still exercise every part (GQA, 2 layers)
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--batch_size=4", "--block_size=32",
        "--progress=False", "--eval_iters=2"]
