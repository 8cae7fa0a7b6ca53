"""Shared test helpers: the repo on sys.path, the shared data folder, a tiny pretokenized dataset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)  # the suite runs on 2 shared cores; more threads only thrash


def shared(*parts):
    """Path into ../shared/data, or skip the test with a reason when a fresh clone lacks it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not present (it lives beside the repo, not in it)")
    return path


def run_script(script, *args, cwd=None, check=True, timeout=240, env=None):
    """Run one of our CLIs in a subprocess, as a user would; returns the CompletedProcess."""
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
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
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    n_val = n_tokens // 10
    toks[n_val:].astype(dtype).tofile(d / "train.bin")
    toks[:n_val].astype(dtype).tofile(d / "val.bin")
    meta = {"tokenizer": tokenizer or {"kind": "sentencepiece", "path": None, "special_tokens": [],
                                       "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2},
            "vocab_size": vocab_size, "dtype": dtype, "bos_id": 1, "eos_id": 2,
            "splits": {"train": {"file": "train.bin", "documents": 1, "tokens": n_tokens - n_val},
                       "val": {"file": "val.bin", "documents": 1, "tokens": n_val}}}
    (d / "meta.json").write_text(json.dumps(meta))
    return d, toks


def read_metrics(out_dir, kind=None):
    lines = [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if kind is None or r.get("type") == kind]


# the smallest model settings that still exercise every part (GQA, 2 layers)
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--batch_size=4", "--block_size=32",
        "--progress=False", "--eval_iters=2"]
