"""int8 inference: a llama2.c version-2 file read as it is stored (quant.Int8Linear: int8 weights, fp32 scales per
group), whose logits are the dequantized model's in under a third of the memory; and the compiled batch-1 CPU step
(decode.CompiledDecoder, generate.py --compile=True) on fp32 and int8 weights, step by step against the eager
step of the same (dequantized) weights on a trained model, to the end of its context."""
import os
import shutil
import sys
import time

import pytest
import torch

from checkpoint import build_model, load_any, load_checkpoint
from conftest import one_line_error, run_script, shared, tiny_model
from decode import CompiledDecoder, FastDecoder
from formats import write_llama2c
from quant import Int8Linear, is_int8, quantize, to_int8, weight_bytes
from runtime import UsageError


@pytest.mark.parametrize("tie", [True, False])
def test_a_v2_file_read_as_int8_is_the_dequantized_model_in_a_third_of_the_memory(tmp_path, tie, monkeypatch):
    m = tiny_model(dim=64, hidden_dim=96, vocab_size=300, tie_embeddings=tie)
    write_llama2c(m.state_dict(), m.args, tmp_path / "q8.bin", version=2)
    int8 = build_model(load_checkpoint(tmp_path / "q8.bin", int8=True))
    fp32 = build_model(load_checkpoint(tmp_path / "q8.bin"))  # dequantized up front, as before
    assert is_int8(int8) and not is_int8(fp32) and int8.layers[0].attention.wq.q.dtype == torch.int8
    x = torch.randint(0, 300, (2, 9))
    assert torch.equal(int8(x)[0], fp32(x)[0])  # the same values in, the same products: bit for bit
    assert (int8.output.q is int8.tok_embeddings.q) == tie  # a tied head is one int8 tensor
    actual, as_fp32 = weight_bytes(int8)
    assert as_fp32 == weight_bytes(fp32)[0] and actual < 0.33 * as_fp32
    assert int8.num_params() == fp32.num_params() and int8.num_params(True) == fp32.num_params(True)
    # quantizing the fp32 model in memory gives the file's bytes: the one quantizer, llama2.c's groups (here 32)
    mem = to_int8(build_model({"model": m.state_dict(), "model_args": m.args.to_dict()}))
    q, scale = quantize(m.layers[1].feed_forward.w2.weight, "llama2c_q8", 32)
    assert torch.equal(mem.layers[1].feed_forward.w2.q, q.view(64, 96))
    assert torch.equal(int8.layers[1].feed_forward.w2.q, q.view(64, 96))
    assert torch.equal(int8.layers[1].feed_forward.w2.scale, scale.view(64, 3))
    assert isinstance(load_any(str(tmp_path / "q8.bin"))[0].layers[0].attention.wo, Int8Linear)  # 'auto' keeps int8
    assert not is_int8(load_any(str(tmp_path / "q8.bin"), weights="fp32")[0])
    # one row under torch.compile (CUDA's batch-1 step): a reduction inductor fuses with the dequantization, F.linear's
    # values; more rows keep F.linear
    layer, row, rows = int8.layers[0].attention.wq, torch.randn(1, 1, 64), torch.randn(2, 3, 64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.allclose(layer(row), torch.nn.functional.linear(row, layer.weight), atol=1e-6)
    assert torch.equal(layer(rows), torch.nn.functional.linear(rows, layer.weight))


def decodes_as_eager(ref, model, step):
    """Greedy from BOS through every position of the context, the first included (the eager model's prefill; the
    compiled step fills the cache's position 0 itself, as quick.py's loop has it do): at each step the compiled
    step's logits agree with the eager step's to 1e-5 of their largest, and its argmax (the kernel's own too) is
    the same token."""
    with torch.no_grad():
        for m in (ref, model):
            m.setup_cache(1)
        token, worst = torch.tensor([[1]]), 0.0
        for p in range(model.args.max_seq_len):
            a = ref(token)[0] if p == 0 else ref.decode_step(token, torch.tensor([p]))
            b, best = step(token, torch.tensor([p]))
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
            assert a.argmax() == b.argmax() == best, p
            token = a[:, -1].argmax(-1, keepdim=True)
    assert worst < 1e-5, worst


def test_the_compiled_int8_step_decodes_a_trained_model_as_the_eager_step_to_the_end_of_its_context(tmp_path):
    """stories260K (GQA, tied head): the v2 export read as int8, against the eager step of the same file
    dequantized: N = 511 greedy tokens agree (measured worst 1.03e-6; fp32: in the generate.py test below). Then
    generate.py's loop: the engine calls the step by ids (decode_ids: ints in and out, the kernel the one torch call
    of a token), and greedy, seeded sampled and log-prob requests get what the eager step gives them."""
    from engine import Engine, Request
    from tokenizer import Llama2cTokenizer
    ref = build_model(load_checkpoint(shared("stories260K", "stories260K.bin")))
    write_llama2c(ref.state_dict(), ref.args, tmp_path / "q8.bin", version=2)
    ref = build_model(load_checkpoint(tmp_path / "q8.bin")).eval()  # fp32: the int8 file dequantized
    model = build_model(load_checkpoint(tmp_path / "q8.bin", int8=True)).eval()
    assert is_int8(model)
    step = CompiledDecoder(model)
    decodes_as_eager(ref, model, step)
    positions, by_ids = [], step.decode_ids
    step.decode_ids = lambda token, pos: positions.append(pos) or by_ids(token, pos)
    tok = Llama2cTokenizer(shared("stories260K", "tok512.bin"))
    ids = tok.encode("Once upon a time", bos=True)

    def requests():
        return [Request(ids, 80, temperature=0), Request(ids, 80, temperature=1.0, seed=3),
                Request(ids, 30, temperature=0.8, top_k=20, seed=4, logprobs=2)]
    eager = Engine(ref, tok, max_batch=1).run(requests())
    compiled = Engine(model, tok, max_batch=1, decode_step=step).run(requests())
    for a, b in zip(eager, compiled):
        assert a.tokens == b.tokens and a.text == b.text and len(set(a.tokens)) > 5
    assert [lp for lp, _ in compiled[2].token_logprobs] == pytest.approx([lp for lp, _ in eager[2].token_logprobs],
                                                                         abs=1e-4)
    # every token after the prefill's came from decode_ids, at the positions in order
    assert positions == [p for r in compiled for p in range(len(ids), len(ids) + len(r.tokens) - 1)]


@pytest.mark.parametrize("regroup", [True, False], ids=["words", "in-order"])
def test_the_compiled_int8_step_reads_the_files_values_regrouped_into_words_in_place(tmp_path, monkeypatch, regroup):
    """Groups of 32 (dim 64, hidden 96): on AVX2 the compiled step regroups q into 4-byte words in place
    (quant.to_words, its loop's layout: int8 vectors load 8x slower there), elsewhere it reads them in order (both
    layouts run here, whatever this CPU is). gemv over the words is the dequantized matrix times x; the model's
    weights, embedding rows and state dict still give the file's values in order, and the step decodes as the eager
    step of the same file to the end of the context."""
    import decode
    from decode import gemv
    monkeypatch.setattr(decode, "words_layout", lambda: regroup)
    from quant import from_words, to_words
    torch.manual_seed(0)
    q, scale = quantize(torch.randn(40, 64), "llama2c_q8", 32)
    q, scale, x = q.view(40, 64), scale.view(40, 2), torch.randn(64)
    words = to_words(q, 32)
    assert torch.equal(from_words(words, 32), q) and not torch.equal(words, q)
    assert torch.equal(words[0, :8], q[0, [0, 8, 16, 24, 1, 9, 17, 25]])  # word k of a group: values k, k+8, ...
    dequantized = (q.view(40, 2, 32).float() * scale[..., None]).view(40, 64)
    assert torch.allclose(gemv((words.contiguous().view(torch.float32), scale), x), dequantized @ x, atol=1e-5)
    m = tiny_model(dim=64, hidden_dim=96, vocab_size=300)
    write_llama2c(m.state_dict(), m.args, tmp_path / "q8.bin", version=2)
    ref, model = (build_model(load_checkpoint(tmp_path / "q8.bin", int8=True)) for _ in range(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = CompiledDecoder(model)  # the suite's cache (conftest): a rerun loads it
    wq = model.layers[0].attention.wq
    assert model.output.words == wq.words == regroup
    assert torch.equal(wq.q, before["layers.0.attention.wq.q"]) != regroup  # regrouped in place, or in order
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the file's order, whatever memory holds
    assert torch.equal(wq.weight, ref.layers[0].attention.wq.weight)
    decodes_as_eager(ref, model, step)


def test_a_damaged_package_is_compiled_again_and_decodes_as_the_eager_step(tmp_path):
    """A package that does not load (here: a truncated file where it should be) is removed and compiled again,
    and the step then gives the eager step's logits. A compile prunes the folder: packages unused for 30 days and
    a killed compile's day-old temporary file go, the rest stays; loading a package marks it used."""
    ref, model = tiny_model(), tiny_model()
    step = CompiledDecoder(model, folder=str(tmp_path))
    (tmp_path / os.path.basename(step.path)).write_bytes(b"PK\x03\x04 truncated")
    day, now = 86400, time.time()
    for name, age in [("decode-old.pt2", 31 * day), ("decode-recent.pt2", 29 * day), ("notes.txt", 99 * day),
                      ("decode-old.pt2.123.tmp.pt2", 2 * day), ("decode-x.pt2.456.tmp.pt2", 3600)]:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    with torch.no_grad():
        for m in (ref, model):
            m.setup_cache(1)
            m(torch.tensor([[1, 5, 9]]))
        a, b = ref.decode_step(torch.tensor([[7]]), torch.tensor([3])), step(torch.tensor([[7]]), torch.tensor([3]))[0]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert os.path.getsize(step.path) > 1000  # the real package now
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(step.path), "decode-recent.pt2", "notes.txt",
                                                   "decode-x.pt2.456.tmp.pt2"])  # (a compile under way elsewhere)
    os.utime(step.path, (now - 40 * day, now - 40 * day))
    again = CompiledDecoder(model, folder=str(tmp_path))
    assert again.cached
    with torch.no_grad():
        again(torch.tensor([[7]]), torch.tensor([4]))
    assert os.path.getmtime(step.path) > now - day  # loaded: used today


def test_the_package_key_holds_the_cpp_compiler(tmp_path, monkeypatch):
    """Another C++ compiler, or the same one upgraded in place, gets a package of its own; a link to the same
    compiler shares its package. The compiler is inductor's: $CXX before its config is imported, the config's after.
    (Construction only: nothing is compiled.)"""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ on this machine")
    os.symlink(gxx, tmp_path / "linked-g++")
    shutil.copy2(os.path.realpath(gxx), tmp_path / "other-g++")
    if not os.access(tmp_path / "other-g++", os.X_OK):
        pytest.skip(f"{tmp_path} does not run programs (noexec)")

    def path():
        return CompiledDecoder(tiny_model(), folder=str(tmp_path)).path

    import torch._inductor.config as inductor  # patched through its own patch(): setattr's undo would delete cxx
    with inductor.patch({"cpp.cxx": (None, "g++")}):
        default = path()
    for how in ("config", "environment"):
        if how == "environment":  # as in a process that has not imported inductor's config (generate.py's)
            monkeypatch.delitem(sys.modules, "torch._inductor.config")
        for name, same in (("linked-g++", True), ("other-g++", False)):
            chosen = str(tmp_path / name)  # by the one consulted; the other says g++
            monkeypatch.setenv("CXX", chosen if how == "environment" else "g++")
            with inductor.patch({"cpp.cxx": (None, chosen if how == "config" else "g++")}):
                assert (path() == default) == same, (how, name)
        monkeypatch.setenv("CXX", str(tmp_path / "other-g++"))
        with inductor.patch({"cpp.cxx": (None, str(tmp_path / "other-g++"))}):
            other = path()
            os.utime(tmp_path / "other-g++", (time.time() - 60, time.time() - 60))  # upgraded in place
            assert path() not in (default, other), how


def test_int8_and_compiled_step_refuse_what_they_cannot_run(tmp_path):
    with pytest.raises(UsageError, match="weights='int4' is not one of 'auto', 'fp32', 'int8'"):
        load_any(shared("stories260K", "stories260K.bin"), weights="int4")
    with pytest.raises(UsageError, match="fp32 or int8 weights on a CPU, not torch.bfloat16"):
        CompiledDecoder(tiny_model().to(torch.bfloat16))
    with pytest.raises(UsageError, match="the fast decoder runs fp32 weights, not int8; pass --compile=True"):
        FastDecoder(to_int8(tiny_model()))
    (tmp_path / "afile").write_text("")
    for folder, why in (("afile", "a file is in the way"), ("afile/sub", "not a directory")):
        with pytest.raises(UsageError, match=f"the compile cache .*{folder} cannot hold the compiled step \\({why}\\)"):
            CompiledDecoder(tiny_model(), folder=str(tmp_path / folder))  # at construction, before any token
    m = tiny_model()
    step = CompiledDecoder(m)
    with pytest.raises(UsageError, match="int8 weights need a plain model"):
        to_int8(m)  # packed by the compiled decoder: its weights are views now
    with pytest.raises(UsageError, match=r"one int64 token of one sequence, shape \(1, 1\), not \(2, 1\) torch.int64"):
        m.setup_cache(2)
        step(torch.tensor([[1], [2]]), torch.tensor([3]))
    m.setup_cache(1)
    with pytest.raises(UsageError, match=r"not \(1, 2\) torch.int64"):
        step(torch.tensor([[1, 2]]), torch.tensor([3]))
    with pytest.raises(UsageError, match=r"not \(1, 1\) torch.int32"):
        step(torch.tensor([[1]], dtype=torch.int32), torch.tensor([3]))  # it would read int32 as int64
    with pytest.raises(UsageError, match="position 48 or token 1 is outside the compiled step's range"):
        step(torch.tensor([[1]]), torch.tensor([m.args.max_seq_len]))  # the kernel checks no bounds itself
    m.setup_cache(1, dtype=torch.bfloat16)  # no guards in the package: a cache it was not compiled for is refused
    with pytest.raises(UsageError, match="runs the fp32 KV cache of model.setup_cache"):
        step(torch.tensor([[1]]), torch.tensor([3]))
    one_line_error(run_script("generate.py", f"--checkpoint={shared('stories260K', 'stories260K.bin')}",
                              f"--tokenizer={shared('stories260K', 'tok512.bin')}", "--weights=int4", check=False),
                   "weights='int4' is not one of")


def test_generate_py_int8_from_a_v2_file_tells_the_dequantized_story(tmp_path):
    """The whole command: generate.py reads the v2 file as int8 (the default), says how much memory its weights
    take, and decodes greedily the story the same file dequantized gives."""
    base = [f"--tokenizer={shared('stories260K', 'tok512.bin')}", "--temperature=0", "--max_new_tokens=200",
            "--stream=False"]
    ref = build_model(load_checkpoint(shared("stories260K", "stories260K.bin")))
    write_llama2c(ref.state_dict(), ref.args, tmp_path / "q8.bin", version=2)
    int8 = run_script("generate.py", f"--checkpoint={tmp_path / 'q8.bin'}", *base)
    fp32 = run_script("generate.py", f"--checkpoint={tmp_path / 'q8.bin'}", "--weights=fp32", *base)
    # groups of 4 here (hidden_dim 172): a 4-byte scale per 4 weights, so half of fp32, not a quarter
    assert "int8 weights: 0.5 MiB (1.0 MiB in fp32)" in int8.stderr and "int8" not in fp32.stderr
    assert int8.stdout == fp32.stdout and int8.stdout.startswith("Once upon a time")


def test_generate_py_compiles_a_shape_once_then_loads_it(tmp_path):
    """--compile=True on a CPU: the first run of a shape (and thread count) compiles the step into the cache
    folder, a later one loads the package without compiling; both tell the eager step's greedy story. Then the
    fp32 step of stories260K (GQA, tied head) against the eager step to the end of its context."""
    # fresh interpreters: the real command end to end, its exit with a compiled kernel loaded included
    fresh = {"LLAMAFORGE_FRESH_PROCESSES": "1"}
    stories = shared("stories260K")
    args = [f"--checkpoint={stories / 'stories260K.bin'}", f"--tokenizer={stories / 'tok512.bin'}", "--temperature=0",
            "--max_new_tokens=100", "--stream=False"]
    eager = run_script("generate.py", *args, env=fresh)
    args += ["--compile=True", f"--compile_cache={tmp_path / 'cache'}"]
    first = run_script("generate.py", *args, env=fresh)
    assert "compiling the decode step" in first.stderr
    assert len([n for n in os.listdir(tmp_path / "cache") if n.endswith(".pt2")]) == 1
    second = run_script("generate.py", *args, env=fresh)  # the quick start (tests/test_quick.py)
    third = run_script("generate.py", *args, "--quick_start=False", env=fresh)  # the package, loaded by torch
    assert "compiling" not in second.stderr + third.stderr
    assert first.stdout == second.stdout == third.stdout == eager.stdout
    assert eager.stdout.startswith("Once upon a time")
    # the same package, found by this process under the same key, decodes all 511 positions as the eager step
    # (measured worst 1.06e-6); one compile serves both checks, the suite's slowest part on a cold cache
    ref, model = (build_model(load_checkpoint(stories / "stories260K.bin")).eval() for _ in range(2))
    step = CompiledDecoder(model, folder=str(tmp_path / "cache"))
    assert step.cached
    decodes_as_eager(ref, model, step)


HUGE = '''
import re, sys
from runtime import huge_pages
huge_pages()
import torch
from checkpoint import build_model, load_checkpoint
from decode import pack_rows


def huge_kb(ptr):  # the 2 MB pages of the mapping that holds ptr (an allocation this big is a mapping of its own);
    inside, kb = False, 0  # -1: asked for (madvise), but the kernel had none to give (a fallback it counted)
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= ptr < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            kb = int(line.split()[1])
        elif inside and line.startswith("VmFlags:"):
            return -1 if kb == 0 and " hg" in line and fallbacks() > before else kb


def fallbacks():
    return sum(int(line.split()[1]) for line in open("/proc/vmstat") if line.startswith("thp_fault_fallback "))


before = fallbacks()
model = build_model(load_checkpoint(sys.argv[1], int8=True))
layers = pack_rows(model)
assert all(ly[0][0].untyped_storage().data_ptr() == layers[0][0][0].untyped_storage().data_ptr() for ly in layers)
print(huge_kb(model.output.q.data_ptr()), huge_kb(layers[0][0][0].data_ptr()))
'''


def test_the_weights_decoding_streams_sit_on_2_mb_pages_where_the_kernel_offers_them(tmp_path):
    """runtime.huge_pages (generate.py, bench_decode.py): a v2 file's int8 head (read into memory torch allocates,
    not numpy) and the compiled step's layer matrices (one tensor for all of them: each alone is under 2 MB) are
    backed by 2 MB pages, which decode 5-8% faster (README); the user's own THP_MEM_ALLOC_ENABLE=0 wins."""
    import subprocess
    import sys
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(thp) or "[never]" in open(thp).read():
        pytest.skip("this kernel offers no transparent huge pages")
    # head 4 MB, layers 5 MB: torch madvises an allocation of 2 MB or more at 4 KB alignment, so only a 2 MB block
    # wholly inside it can be a huge page, and a 4 MB one always holds one
    m = tiny_model(dim=256, n_layers=6, n_heads=4, hidden_dim=768, vocab_size=16384)
    write_llama2c(m.state_dict(), m.args, tmp_path / "q8.bin", version=2)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def pages(**env):  # a fresh interpreter: torch reads the setting at its first large allocation
        e = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        out = subprocess.run([sys.executable, "-c", HUGE, str(tmp_path / "q8.bin")], capture_output=True, text=True,
                             env={**e, "PYTHONPATH": repo, **env}, check=True).stdout
        return [int(x) for x in out.split()]
    head, layers = pages()  # (on a loaded machine the kernel may have no free 2 MB page: it says so, -1)
    assert (head == -1 or head >= 2048) and (layers == -1 or layers >= 2048), (head, layers)
    if "[always]" not in open(thp).read():  # else every large mapping gets them anyway
        assert pages(THP_MEM_ALLOC_ENABLE="0") == [0, 0]
