"""generate.py's quick start (quick.py): a run of --compile=True on a CPU leaves a record, and a later run of the same
model and settings decodes from it without importing torch, writing what the usual path writes."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import quick
import quick_shim
import sampling
from checkpoint import build_model, load_checkpoint
from compile_cache import cache_dir
from conftest import run_script, shared
from decode import CompiledDecoder
from formats import write_llama2c
from model import sample_next

FRESH = {"LLAMAFORGE_FRESH_PROCESSES": "1"}  # real interpreters: the one that quick-starts must not import torch


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """stories260K's compiled steps, fp32 and int8 (its v2 export), compiled once into the suite's cache (where the
    other tests' are): each test copies them into a cache folder of its own, whose records it then counts."""
    ref = build_model(load_checkpoint(shared("stories260K", "stories260K.bin")))
    v2 = tmp_path_factory.mktemp("v2") / "q8.bin"
    write_llama2c(ref.state_dict(), ref.args, v2, version=2)
    shim = quick_shim.build(cache_dir())  # and the shim (a second each, were it built in each test's cache)
    shims = [shim, *(f"{shim[:-3]}-{name}" for name in quick_shim.STUBS)] if shim else []
    return [CompiledDecoder(m).ensure()[0] for m in (ref, build_model(load_checkpoint(v2, int8=True)))] + shims


@pytest.fixture
def cache(tmp_path, packages):
    os.makedirs(tmp_path / "cache")
    for path in packages:
        shutil.copy(path, tmp_path / "cache")
    return sum(not os.path.basename(p).startswith("quick-") for p in packages)  # how many packages


def stories_args(tmp_path, checkpoint=None, *more):
    stories = shared("stories260K")
    return [f"--checkpoint={checkpoint or stories / 'stories260K.bin'}", f"--tokenizer={stories / 'tok512.bin'}",
            "--compile=True", f"--compile_cache={tmp_path / 'cache'}", *more]


def imported_torch(proc):
    """Whether the process imported torch (its stderr holds PYTHONPROFILEIMPORTTIME's lines)."""
    return any(line.rstrip().endswith("| torch") for line in proc.stderr.splitlines())


def records(tmp_path):
    return sorted(n for n in os.listdir(tmp_path / "cache") if n.startswith("quick-") and n.endswith(".json"))


def test_a_second_run_decodes_without_importing_torch_and_writes_the_same_text(tmp_path, cache):
    """The first run compiles, leaves a record and decodes through it; the second imports no torch and writes the
    same seeded samples. Greedy past the context's end (600 > 512 tokens), the record's text is the eager step's."""
    profile = {**FRESH, "PYTHONPROFILEIMPORTTIME": "1"}
    assert len([n for n in os.listdir(tmp_path / "cache") if n.endswith(".pt2")]) == cache == 2  # the packages
    sampled = stories_args(tmp_path, None, "--temperature=0.8", "--top_k=40", "--top_p=0.9", "--seed=7",
                           "--num_samples=2", "--max_new_tokens=80", "--prompt=Once upon a time")
    first = run_script("generate.py", *sampled, env=profile)
    assert imported_torch(first) and len(records(tmp_path)) == 1 and "compiling" not in first.stderr
    second = run_script("generate.py", *sampled, env=profile)
    assert not imported_torch(second), [ln for ln in second.stderr.splitlines() if "torch" in ln][:5]
    assert first.stdout == second.stdout and second.stdout.count("Once upon a time") == 2
    other_seed = run_script("generate.py", *sampled[:-3], "--seed=8", *sampled[-2:], env=FRESH)
    assert other_seed.stdout != second.stdout
    greedy = ["--temperature=0", "--max_new_tokens=600", "--stream=False"]
    quick_greedy = run_script("generate.py", *stories_args(tmp_path), *greedy, env=profile)
    eager = run_script("generate.py", *stories_args(tmp_path)[:2], *greedy, env=FRESH)
    assert not imported_torch(quick_greedy) and quick_greedy.stdout == eager.stdout
    assert len(records(tmp_path)) == 1  # sampling settings are not part of the record's name


def test_a_changed_model_file_or_setting_misses_the_record(tmp_path, cache):
    """The record's name holds the files (size, times, inode) and the model-defining settings: a checkpoint rewritten
    in place (here a v2 int8 file where the fp32 one was) gets a new record, which replaces the old one (the same
    file and settings: an older version), another --weights a record beside it; each writes what the usual path
    writes for it."""
    ref = build_model(load_checkpoint(shared("stories260K", "stories260K.bin")))
    path = tmp_path / "model.bin"
    write_llama2c(ref.state_dict(), ref.args, path)
    greedy = ["--temperature=0", "--max_new_tokens=120", "--stream=False"]
    fp32 = run_script("generate.py", *stories_args(tmp_path, path), *greedy)
    write_llama2c(ref.state_dict(), ref.args, path, version=2)
    int8_first = run_script("generate.py", *stories_args(tmp_path, path), *greedy)
    int8_quick = run_script("generate.py", *stories_args(tmp_path, path), *greedy)
    usual = run_script("generate.py", *stories_args(tmp_path, path), *greedy, "--quick_start=False")
    assert len(records(tmp_path)) == 1
    assert int8_first.stdout == int8_quick.stdout == usual.stdout and fp32.stdout.startswith("Once upon a time")
    assert "int8 weights: 0.5 MiB" in int8_quick.stderr  # the note the usual path prints, from the record
    run_script("generate.py", *stories_args(tmp_path, path), *greedy, "--weights=fp32")
    assert len(records(tmp_path)) == 2


def test_a_damaged_record_is_passed_over_and_written_again(tmp_path, cache):
    """A record whose weights file is cut short or overwritten in place (zeros, the same size), or whose JSON is
    torn, is not run: the usual path decodes and writes it afresh."""
    args = [*stories_args(tmp_path), "--temperature=0", "--max_new_tokens=60", "--stream=False"]
    good = run_script("generate.py", *args).stdout
    (name,) = records(tmp_path)
    weights = tmp_path / "cache" / name.replace(".json", ".bin")
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    assert run_script("generate.py", *args).stdout == good and weights.stat().st_size == size
    with open(weights, "r+b") as f:
        f.write(bytes(size))
    assert run_script("generate.py", *args).stdout == good and any(weights.read_bytes())
    (tmp_path / "cache" / name).write_text('{"package": ')
    assert run_script("generate.py", *args).stdout == good
    assert json.loads((tmp_path / "cache" / name).read_text())["bytes"] == size


def test_the_runner_computes_the_compiled_steps_logits(tmp_path):
    """quick.Runner (ctypes, AOTInductor's C interface) on a record gives, position by position, the logits the
    same package gives loaded by torch: bit for bit, position 0 included."""
    model = build_model(load_checkpoint(shared("stories260K", "stories260K.bin"))).eval()
    step = CompiledDecoder(model)
    package, inputs, caches = step.ensure()
    quick.save(str(tmp_path), "k", package, inputs, caches, {"vocab": model.args.vocab_size, "context": 512})
    runner = quick.Runner(str(tmp_path), "k", quick.load(str(tmp_path), "k"))
    model.setup_cache(1)
    token = 1
    for pos in range(40):
        logits, best = step.decode_ids(token, pos)
        assert runner.step(token, pos) == best
        assert np.array_equal(runner.logits(), logits.view(-1).numpy()), pos
        token = best if pos % 3 else (best + pos) % model.args.vocab_size  # not greedy all the way
    runner.release()


@pytest.mark.parametrize("top_k, top_p", [(None, None), (5, None), (None, 0.6), (20, 0.9)])
def test_quick_sampling_draws_from_what_sample_next_keeps(top_k, top_p):
    """sampling.sample (numpy) and model.sample_next (torch) draw the same tokens as often: 20000 draws each from one
    row of logits (seeded: the same every run), within 0.03 in total variation, top-k within the k most likely."""
    torch.manual_seed(0)
    logits, n = torch.randn(50) * 2, 20000
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    ours = np.bincount([sampling.sample(logits.numpy(), 0.7, top_k, top_p, rng) for _ in range(n)], minlength=50) / n
    theirs = np.bincount([int(sample_next(logits[None], 0.7, top_k, top_p, gen)[0]) for _ in range(n)],
                         minlength=50) / n
    assert np.abs(ours - theirs).sum() / 2 < 0.03
    if top_k:
        assert set(np.flatnonzero(ours)) <= set(torch.topk(logits, top_k).indices.tolist())
    if top_p:  # the nucleus drops the tail: fewer tokens drawn than without it
        assert np.count_nonzero(ours) < np.count_nonzero(torch.softmax(logits / 0.7, -1).numpy() > 1e-4)


def _sample_by_full_sort(logits, temperature, top_k, top_p, rng):
    """The plain way (sort the whole vocab for the nucleus), which sampling.sample must draw exactly as."""
    x, ids = logits / np.float32(temperature), np.arange(len(logits))
    if top_k and top_k < len(x):
        ids = np.flatnonzero(x >= np.partition(x, len(x) - top_k)[len(x) - top_k])
        x = x[ids]
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        kept = order[np.cumsum(p[order]) - p[order] <= top_p]
        ids, p = ids[kept], p[kept]
    cum = np.cumsum(p, dtype=np.float64)
    return int(ids[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(ids) - 1)])


@pytest.mark.parametrize("kind", ["random", "ties", "flat", "masked"])
def test_sampling_draws_exactly_as_a_full_sort_would(kind):
    """sampling.sample finds the nucleus among the few hundred most likely tokens and widens the search when the
    nucleus is larger (a flat row needs all 32000): the same token as sorting everything, draw for draw, for every
    top_k / top_p, reusing one set of buffers."""
    g = np.random.default_rng(3)
    logits = {"random": g.standard_normal(32000) * 3, "ties": np.round(g.standard_normal(32000) * 2),
              "flat": np.zeros(32000), "masked": np.where(g.random(32000) < 0.5, -np.inf, g.standard_normal(32000))}
    logits = logits[kind].astype(np.float32)
    buffers = sampling.scratch(len(logits))
    for top_k in (0, 1, 5, 200, 32000, 32005):
        for top_p in (None, 0.999, 0.9, 0.5, 1e-6, 0.0):
            ours, plain = np.random.default_rng(7), np.random.default_rng(7)
            assert [sampling.sample(logits, 0.8, top_k, top_p, ours, buffers) for _ in range(8)] == \
                [_sample_by_full_sort(logits, 0.8, top_k, top_p, plain) for _ in range(8)], (top_k, top_p)
    if kind == "masked":  # 152 denormal probabilities after 104 equal ones: the search's estimate divides by one
        x = np.full(32000, -np.inf, np.float32)
        x[:104], x[104:256] = 0, np.log(104) - 102.5
        top_p = 0.9999990463256836
        assert sampling.sample(x, 1.0, 0, top_p, np.random.default_rng(0), buffers) == \
            _sample_by_full_sort(x, 1.0, 0, top_p, np.random.default_rng(0))


def test_the_fingerprint_follows_settings_files_and_threads(tmp_path, monkeypatch):
    """The record's name: the same for the same run, another for another setting, a touched file, or another
    OMP_NUM_THREADS (the thread count a package is compiled for)."""
    f = tmp_path / "model.bin"
    f.write_bytes(b"x" * 10)
    key = quick.fingerprint({"weights": "auto"}, [str(f)])
    assert quick.fingerprint({"weights": "auto"}, [str(f)]) == key
    assert quick.fingerprint({"weights": "int8"}, [str(f)]) != key
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert quick.fingerprint({"weights": "auto"}, [str(f)]) != key
    monkeypatch.undo()
    os.utime(f, ns=(5, 5))
    assert quick.fingerprint({"weights": "auto"}, [str(f)]) != key


def test_a_checkpoints_own_tokenizer_travels_in_the_record(tmp_path, cache):
    """Our ckpt.pt carries its SentencePiece model (to_meta(embed=True)): the record keeps it (bytes in JSON), so
    the quick start decodes with it after the .model file is gone, as the usual path does."""
    from checkpoint import save_checkpoint
    from tokenizer import make_tokenizer
    shutil.copy(shared("stories260K", "tok512.model"), tmp_path / "tok.model")
    ckpt = load_checkpoint(shared("stories260K", "stories260K.bin"))
    ckpt["tokenizer"] = make_tokenizer(tmp_path / "tok.model").to_meta(embed=True)
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    args = [f"--checkpoint={tmp_path / 'ckpt.pt'}", "--compile=True", f"--compile_cache={tmp_path / 'cache'}",
            "--temperature=0", "--max_new_tokens=100", "--prompt=Once upon a time"]
    first = run_script("generate.py", *args)
    os.remove(tmp_path / "tok.model")
    second = run_script("generate.py", *args, env={**FRESH, "PYTHONPROFILEIMPORTTIME": "1"})
    usual = run_script("generate.py", *args[:1], *args[3:])
    assert not imported_torch(second) and first.stdout == second.stdout == usual.stdout
    assert usual.stdout.startswith("Once upon a time") and len(usual.stdout) > 200


def test_a_record_is_run_only_whole_and_with_its_watched_files_unchanged(tmp_path):
    """quick.load: a record whose JSON lacks a field or has one of another type is no record; one whose watched
    file (an adapter's recorded base) was rewritten since is no record either."""
    folder, base = str(tmp_path), tmp_path / "base.pt"
    base.write_bytes(b"one")
    quick.save(folder, "k", "p.pt2", [torch.zeros(4)], [], {"vocab": 4, "context": 8}, "src", watch=[str(base)])
    assert quick.load(folder, "k")["inputs"] == [["float32", [4], 0]]
    json_path = tmp_path / "quick-k.json"
    good = json.loads(json_path.read_text())
    for broken in ({**good, "bytes": "16"}, {k: v for k, v in good.items() if k != "caches"}, [good]):
        json_path.write_text(json.dumps(broken))
        assert quick.load(folder, "k") is None
    json_path.write_text(json.dumps(good))
    assert quick.load(folder, "k") is not None
    base.write_bytes(b"two")  # the same size; another inode is not even needed: the times differ
    assert quick.load(folder, "k") is None


def test_a_damaged_package_is_unavailable_not_a_crash(tmp_path):
    """A record's package that is no zip, cut short, fails its checksum or holds no library: the runner says
    Unavailable (the caller then takes the usual path, which compiles it again) and leaves no half library."""
    import zipfile
    folder, package = str(tmp_path), tmp_path / "decode-x.pt2"
    with zipfile.ZipFile(package, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("data/aotinductor/model/x.wrapper.so", bytes(range(256)) * 64)
    whole = package.read_bytes()
    quick.save(folder, "k", str(package), [torch.zeros(4)], [], {"vocab": 4, "context": 8})
    flipped = bytearray(whole)
    flipped[whole.index(b"x.wrapper.so") + 30] ^= 0xFF  # in the compressed data: a broken deflate stream (zlib.error)
    for data in (b"not a zip", whole[:len(whole) // 2], bytes(flipped)):
        package.write_bytes(data)  # a new time and size: but the library is named by the inode, so remove it too
        for old in tmp_path.glob("decode-x-*.so"):
            old.unlink()
        with pytest.raises(quick.Unavailable):
            quick.Runner(folder, "k", quick.load(folder, "k"), shim="")
        assert not list(tmp_path.glob("decode-x-*.so")) and not list(tmp_path.glob(".tmp*")), data[:20]
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("data/other.txt", "no library")
    with pytest.raises(quick.Unavailable):
        quick.Runner(folder, "k", quick.load(folder, "k"), shim="")
