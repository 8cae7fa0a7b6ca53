"""Nothing lost, no traceback, when things go wrong below our own checks: full disks, folders where files
belong, non-UTF-8 files, Ctrl-C, nan losses, a second run on the same folder, leftovers of killed runs; and an
interrupted run that resumes reproduces the uninterrupted run's metrics log line for line."""
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, make_dataset, one_line_error, read_metrics, run_script
from test_finetune import make_base, make_tokenizer_model

TIMING = ("tok_per_s", "ms_per_iter", "mfu", "peak_mem_gb")


def train(tmp_path, *extra, out="out", check=True, **kw):
    return run_script("train.py", f"--data_root={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={tmp_path / out}",
                      *TINY, *extra, check=check, **kw)


def popen(script, *args, cwd, limit_bytes=None, **kw):
    """A script as a user would start it, optionally with a file-size limit: writes past it fail with EFBIG,
    the closest a test gets to a full disk without mounting one."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))) if limit_bytes else None
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit, **kw)


def finish(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint, tokenizer .model) of a tiny model with a real SentencePiece vocab."""
    root = tmp_path_factory.mktemp("base")
    tok = make_tokenizer_model(root)
    return make_base(root, tok)[0], tok


def write_docs(folder, n, words=40):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": f"the cat sat {i} " * words}) + "\n"
                                               for i in range(n)))


# ---- class 1: errors from below our own checks --------------------------------------------------------

def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, data):
    train(tmp_path, "--max_iters=2", "--eval_interval=2")
    ckpt = tmp_path / "out" / "ckpt.pt"
    before = ckpt.read_bytes()
    args = [f"--data_root={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={tmp_path / 'out'}", *TINY,
            "--max_iters=4", "--eval_interval=2", "--init_from=resume"]
    proc = finish(popen("train.py", *args, cwd=tmp_path, limit_bytes=len(before) // 2))
    one_line_error(proc, "File too large", "ulimit -f")
    assert ckpt.read_bytes() == before and torch.load(ckpt, weights_only=True)["iter_num"] == 2
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]  # the half-written temp is gone


def test_paths_that_are_the_wrong_kind_of_thing(tmp_path, data, base):
    (tmp_path / "afile").write_text("x")
    one_line_error(train(tmp_path, "--max_iters=1", out="afile/run", check=False), "afile/run")
    (tmp_path / "adir").mkdir()
    proc = run_script("export.py", f"--checkpoint={base[0]}", "--format=llama2c", f"--out={tmp_path / 'adir'}",
                      check=False)
    one_line_error(proc, "is a folder; pass a file path")


def test_files_that_are_not_utf8_or_not_json(tmp_path, base):
    (tmp_path / "p.txt").write_bytes("Caf\xe9 ".encode("latin-1"))
    proc = run_script("generate.py", f"--checkpoint={base[0]}", f"--prompt_file={tmp_path / 'p.txt'}", check=False)
    one_line_error(proc, "is not UTF-8 text")
    (tmp_path / "h.jsonl").write_bytes(b'{"ctx": "caf\xe9", "endings": ["a", "b", "c", "d"], "label": 0}\n')
    proc = run_script("evaluate.py", "hellaswag", f"--checkpoint={base[0]}", f"--hellaswag_file={tmp_path / 'h.jsonl'}",
                      check=False)
    one_line_error(proc, "h.jsonl line 1 is not UTF-8 text")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    proc = run_script("export.py", f"--checkpoint={hf}", "--format=ours", f"--out={tmp_path / 'x.pt'}", check=False)
    one_line_error(proc, "config.json is not a Hugging Face config")


def test_ctrl_c_is_quiet_status_130_and_leaves_the_dataset_as_it_was(tmp_path, base):
    d, common = tmp_path / "data" / "demo", ["--data_root=data", "--dataset=demo", f"--tokenizer={base[1]}"]
    write_docs(d, 20)  # a small dataset first: the one to keep
    run_script("tokenize_data.py", "pretokenize", *common, cwd=tmp_path)
    write_docs(d, 20_000)  # then a corpus that takes seconds to tokenize
    before = digest(d)
    proc = popen("tokenize_data.py", "pretokenize", "--num_workers=2", *common, cwd=tmp_path)
    for line in proc.stdout:  # interrupt while the workers tokenize
        if line.startswith("tokenizing"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    res = finish(proc)
    assert (res.returncode, res.stderr) == (130, ""), res.stderr[-2000:]
    assert digest(d) == before  # the old dataset, whole; nothing staged is left


def test_ctrl_c_in_an_interactive_chat(tmp_path, base):
    proc = popen("generate.py", f"--checkpoint={base[0]}", "--interactive=True", cwd=tmp_path, stdin=subprocess.PIPE)
    time.sleep(4)  # it waits at the prompt for the first line
    proc.send_signal(signal.SIGINT)
    res = finish(proc)
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr


# ---- class 3: nothing good overwritten by something bad ---------------------------------------------

def test_a_nan_loss_stops_and_never_replaces_the_good_checkpoint(tmp_path, data):
    flags = ["--optimizer=sgd", "--grad_clip=0", "--warmup_iters=0", "--max_iters=20", "--eval_interval=5",
             "--log_interval=1", "--learning_rate=1e6"]
    one_line_error(train(tmp_path, *flags, check=False), "became nan/inf by iter", "keeps the last good state")
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # skip: a step whose loss or gradient is nan/inf is dropped (lr 1e4: the loss blows up without the weights)
    train(tmp_path, *flags[:-1], "--learning_rate=1e4", "--nonfinite=skip", out="skip")
    last = read_metrics(tmp_path / "skip", "train")[-1]
    assert last["iter"] == 20 and last["skipped"] > 0
    ckpt = torch.load(tmp_path / "skip" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_failed_pretokenize_leaves_the_dataset_exactly_as_it_was(tmp_path, base):
    d, common = tmp_path / "data" / "docs", ["--data_root=data", "--dataset=docs", f"--tokenizer={base[1]}"]
    write_docs(d, 200)
    run_script("tokenize_data.py", "pretokenize", *common, cwd=tmp_path)
    before = digest(d)
    proc = finish(popen("tokenize_data.py", "pretokenize", *common, "--dtype=uint32", "--num_workers=1", cwd=tmp_path,
                        limit_bytes=20_000))
    one_line_error(proc, "File too large")
    assert digest(d) == before and sorted(os.listdir(d)) == sorted(before)


def test_evaluate_refuses_data_of_another_tokenizer(tmp_path, data):
    train(tmp_path, "--max_iters=1", "--eval_interval=1")
    make_dataset(tmp_path / "data", name="other", tokenizer={"kind": "tiktoken", "path": None, "special_tokens": [],
                                                            "vocab_size": 64, "bos_id": 1, "eos_id": 2})
    proc = run_script("evaluate.py", "loss", f"--checkpoint={tmp_path / 'out'}", f"--data_root={tmp_path / 'data'}",
                      "--dataset=other", check=False)
    one_line_error(proc, "tokenizer mismatch", "kind sentencepiece vs tiktoken")


# ---- class 4: one run per folder; class 5: crash leftovers ----------------------------------------

def test_one_run_per_out_dir_and_a_killed_runs_lock_and_temps_are_taken_over(tmp_path, data):
    args = [f"--data_root={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={tmp_path / 'out'}", *TINY,
            "--max_iters=100000", "--eval_interval=5", "--log_interval=1"]
    first = popen("train.py", *args, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = train(tmp_path, "--max_iters=5", "--init_from=resume", check=False)
    one_line_error(second, "is in use by another train.py run", f"process {first.pid}")
    first.kill()  # SIGKILL: no chance to clean up
    first.wait()
    (tmp_path / "out" / ".tmp-killed-save").write_bytes(b"half a checkpoint")
    iters = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"]
    train(tmp_path, f"--max_iters={iters + 2}", "--init_from=resume", "--eval_interval=100000")
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt", "metrics.jsonl"]  # lock released, temp removed
    one_line_error(train(tmp_path, "--max_iters=1", check=False), "ckpt.pt exists", "--init_from=resume", "--overwrite")
    (tmp_path / "base.pt").write_bytes((tmp_path / "out" / "ckpt.pt").read_bytes())  # a fine-tune into it: refused too
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    one_line_error(train(tmp_path, "--max_iters=1", f"--init_from={tmp_path / 'base.pt'}", check=False),
                   "ckpt.pt exists")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    train(tmp_path, "--max_iters=1", "--eval_interval=1", "--overwrite=True")
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 1


def test_a_crash_inside_a_dataset_commit_is_finished_by_the_next_reader(tmp_path):
    import data as ds
    tok = {"kind": "sentencepiece", "path": None, "special_tokens": [], "vocab_size": 64, "bos_id": 1, "eos_id": 2}
    d = ds.write_token_dataset(tmp_path / "d", {"train": np.arange(50), "val": np.arange(20)}, tok, 64)
    with ds.DatasetUpdate(d) as up:  # stage a new dataset and write its journal, then "crash" before the renames
        for name, n in (("train.bin", 40), ("val.bin", 10)):
            ds.write_tokens(up.path(name), [np.arange(n) + 1], np.uint16)
        meta = ds.dataset_meta(tok, 64, np.uint16, 1, 2, {"train": {"file": "train.bin", "tokens": 40},
                                                         "val": {"file": "val.bin", "tokens": 10}})
        (up.path("meta.json")).write_text(json.dumps(meta))
        journal = {"renames": [[p.name, n] for n, p in up.staged.items()], "remove": []}
        (d / ds.JOURNAL).write_text(json.dumps(journal))
        up.staged = {}
    assert len(ds.open_split(d, "train")) == 40 and ds.open_split(d, "val")[0] == 1  # the new one, whole
    assert sorted(os.listdir(d)) == ["meta.json", "train.bin", "val.bin"]
    (d / ".new-train.bin").write_bytes(b"staged by a run that died before its journal")
    with ds.DatasetUpdate(d):
        pass
    assert not (d / ".new-train.bin").exists() and len(ds.open_split(d, "train")) == 40


# ---- an interrupted run resumes into the uninterrupted run's log ------------------------------------

def test_resume_reproduces_the_metrics_log_line_for_line(tmp_path, base):
    """Stopped mid-window (5), at an evaluation (8) and at the last iteration (12), each resumed run's log equals
    the uninterrupted run's."""
    from tokenizer import make_tokenizer
    tok = make_tokenizer(base[1])  # a real vocab: the samples logged at each evaluation must decode
    make_dataset(tmp_path / "data", vocab_size=tok.vocab_size, tokenizer=tok.to_meta())
    common = ["--max_iters=12", "--eval_interval=4", "--log_interval=2", "--dropout=0.1", "--warmup_iters=2",
              "--sample_prompts=('a',)", "--sample_max_new_tokens=4"]
    train(tmp_path, *common, out="full")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING} for r in recs]  # noqa: E731
    for stop in (5, 8, 12):
        part = f"part{stop}"
        train(tmp_path, *common, f"--stop_at_iter={stop}", out=part)
        assert torch.load(tmp_path / part / "ckpt.pt", weights_only=True)["iter_num"] == stop
        train(tmp_path, *common, "--init_from=resume", out=part)
        assert strip(read_metrics(tmp_path / part)) == strip(read_metrics(tmp_path / "full")), stop
        assert torch.load(tmp_path / part / "ckpt.pt", weights_only=True)["best_val_loss"] == \
            torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["best_val_loss"]
