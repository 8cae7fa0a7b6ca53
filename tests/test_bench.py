"""bench.py on CPU, and the speed/memory features it measures: each memory saver must leave the training
trajectory unchanged, and the static-shape (compilable) decode step must pick the same tokens."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, make_dataset, read_metrics, run_script, tiny_model


def test_bench_runs_on_cpu_and_writes_sane_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--sizes=tiny", "--optimizers=adamw,sgd", "--train_iters=2", "--decode_batch=2",
                      "--decode_tokens=8", f"--out_json={out}", cwd=tmp_path)
    res = json.loads(out.read_text())
    assert res["peak_flops"] is None and "ru_maxrss" in res["memory_kind"]  # CPU: no MFU, RSS labelled
    assert [(r["optimizer"], r["status"]) for r in res["train"]] == [("adamw", "ok"), ("sgd", "ok")]
    for r in res["train"]:
        assert r["tok_per_s"] > 0 and r["mfu"] is None and r["peak_mem_gb"] >= 0 and r["params"] > 0
        assert r["batch_size"] == 4 and r["seq_len"] == 64
    assert [(r["batch"], r["tok_per_s"] > 0) for r in res["decode"]] == [(1, True), (2, True)]
    assert "tok/s" in proc.stdout and "n/a" in proc.stdout


def test_bench_errors(tmp_path):
    proc = run_script("bench.py", "--sizes=huge", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "error: sizes: 'huge' is not one of" in proc.stderr
    proc = run_script("bench.py", "--find_max=True", "--device=cpu", "--memory_cap_gb=24", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "a CUDA device, or --train_runs=False --trace_memory=True" in proc.stderr
    proc = run_script("bench.py", "--train_runs=False", "--decode=False", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "measures nothing unless trace_memory=True or decode=True" in proc.stderr
    proc = run_script("bench.py", "--activation_checkpointing=True,", "--checkpoint_blocks=-1,", cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "checkpoint_blocks=(-1,) must all be >= 0" in proc.stderr


def losses(tmp_path, name, *extra):
    run_script("train.py", f"--data_root={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={tmp_path / name}", *TINY,
               "--max_iters=5", "--log_interval=1", "--eval_interval=100", "--eval_iters=1", "--warmup_iters=0",
               "--learning_rate=1e-2", "--grad_clip=0", "--write_checkpoints=False", *extra)
    assert not (tmp_path / name / "ckpt.pt").exists()
    return [r["loss"] for r in read_metrics(tmp_path / name, "train")]


@pytest.mark.parametrize("opt,variants", [
    ("adamw", ["--activation_checkpointing=True", "--optimizer_in_backward=True", "--loss_chunk_size=48"]),
    ("sgd", ["--optimizer_in_backward=True"]),
])
def test_memory_savers_keep_the_loss_trajectory(tmp_path, opt, variants):
    make_dataset(tmp_path / "data")
    base = losses(tmp_path, "base", f"--optimizer={opt}")
    assert len(base) == 5 and len(set(base)) == 5
    for i, v in enumerate(variants):
        assert losses(tmp_path, f"v{i}", f"--optimizer={opt}", v) == pytest.approx(base, rel=1e-5, abs=1e-6), v


def test_checkpoint_blocks_without_checkpointing_is_a_config_error(tmp_path):
    proc = run_script("train.py", "--checkpoint_blocks=4", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "add --activation_checkpointing=True" in proc.stderr


def test_optimizer_in_backward_bad_combinations_are_config_errors(tmp_path):
    for extra, msg in (([], "set --grad_clip=0"),
                       (["--grad_clip=0", "--gradient_accumulation_steps=2"], "set --gradient_accumulation_steps=1")):
        proc = run_script("train.py", "--optimizer_in_backward=True", *extra, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "error: optimizer_in_backward=True" in proc.stderr and msg in proc.stderr


def test_chunked_loss_matches_full_logits_loss_and_grads():
    model = tiny_model().train()
    x, y = torch.randint(64, (3, 48)), torch.randint(64, (3, 48))
    y[0, :10] = -100  # masked targets, as in fine-tuning
    for reduction in ("mean", "sum"):
        model.zero_grad()
        logits, full = model(x, y, reduction=reduction)
        full.backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        none, chunked = model(x, y, reduction=reduction, loss_chunk=50)  # chunks straddle rows; last one short
        chunked.backward()
        assert none is None and logits.shape == (3, 48, 64)
        torch.testing.assert_close(chunked, full)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_static_decode_step_and_its_compiled_graph_pick_the_same_tokens():
    model = tiny_model()
    prompt = torch.randint(64, (2, 5))
    eager = model.generate(prompt, 30, temperature=0)
    # the static-shape path, not compiled
    assert torch.equal(model.generate(prompt, 30, temperature=0, decode_step=model.decode_step), eager)
    # fullgraph=True fails on any graph break, so this shows the step is capturable as one graph;
    # aot_eager traces forward like inductor does but skips its C++ code generation (~30 s on 2 cores)
    torch._dynamo.reset()
    step = torch.compile(model.decode_step, backend="aot_eager", fullgraph=True)
    assert torch.equal(model.generate(prompt, 30, temperature=0, decode_step=step), eager)
    # later calls decode into the same cache buffers (a CUDA graph keeps their addresses; new ones would
    # make it re-record), and the result is still right; without a decode step no buffers are kept
    ptrs = [c.k.data_ptr() for c in model._kv_pool]
    again = model.generate(prompt[:, :3], 20, temperature=0, decode_step=step)
    assert [c.k.data_ptr() for c in model._kv_pool] == ptrs
    assert torch.equal(again, model.generate(prompt[:, :3], 20, temperature=0))
    model.generate(prompt, 5, temperature=0)
    assert model._kv_pool is None


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"),
                    reason="inductor compile takes ~30 s on 2 cores; set LLAMAFORGE_SLOW=1")
def test_inductor_compiled_decode_picks_the_same_tokens():
    """fp32 and int8 weights (batch 1: quant.Int8Linear's reduction form, which only a compile takes)."""
    from quant import to_int8
    for model, batch in ((tiny_model(), 2), (to_int8(tiny_model()), 1)):
        prompt = torch.randint(64, (batch, 5))
        torch._dynamo.reset()
        step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
        assert torch.equal(model.generate(prompt, 30, temperature=0, decode_step=step),
                           model.generate(prompt, 30, temperature=0))


def test_int8_decoding_times_under_autocast_as_generate_py_runs_it(bench, monkeypatch):
    """bench.py --decode_int8 in bf16 (the GPU plan's dtype): int8 layers, the rest fp32 under autocast."""
    monkeypatch.setattr(bench, "decode_int8", True)
    monkeypatch.setattr(bench, "decode_tokens", 8)
    row = bench.time_decode("tiny", torch.device("cpu"), torch.bfloat16, 1, False)
    assert row["int8"] and row["batch"] == 1 and row["tok_per_s"] > 0


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench.py"])  # bench.py reads its --key=value flags at import
    import bench
    return bench


def test_live_bytes_counts_storages_once_and_frees_them(bench):
    from torch._subclasses.fake_tensor import FakeTensorMode
    for fake in (False, True):  # real CPU tensors, and fake ones (no memory behind them)
        with (FakeTensorMode() if fake else torch.no_grad()), bench.LiveBytes() as live:
            a = torch.empty(1000)                       # 4000 bytes
            view = a[10:].view(10, 99)                  # shares a's storage: nothing new
            b = torch.ones(250, dtype=torch.bfloat16)   # 500 bytes
            assert live.now == 4500
            del a
            assert live.now == 4500                     # the view keeps the storage alive
            del view
            assert live.now == 500
            c = b * 2                                   # a new 500-byte result
            del b, c
            assert (live.now, live.peak) == (0, 4500)


def trace(tmp_path, *flags):
    out = tmp_path / "trace.json"
    run_script("bench.py", "--sizes=110M", "--optimizers=adamw,sgd", "--train_runs=False", "--trace_memory=True",
               *flags, f"--out_json={out}", cwd=tmp_path)
    rows = json.loads(out.read_text())["train"]
    assert all(r["status"] == "traced" and "tok_per_s" not in r for r in rows)  # traced only: nothing was run
    return rows, {(r["optimizer"], r["activation_checkpointing"], r["checkpoint_blocks"], r["optimizer_in_backward"]):
                  r["traced_gb"] for r in rows}


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"), reason="~30 s of tracing on 2 cores; set LLAMAFORGE_SLOW=1")
def test_traced_memory_of_a_training_step(tmp_path):
    """The memory savers, traced on fake tensors (no memory behind them), save what they should."""
    # activations dominate (4 x 256 tokens): recomputing blocks in backward is what saves
    rows, traced = trace(tmp_path, "--seq_len=256", "--batch_size=4", "--activation_checkpointing=False,True",
                         "--checkpoint_blocks=0,6")
    assert len(traced) == 6
    for opt in ("adamw", "sgd"):
        none, half, full = traced[opt, False, 0, False], traced[opt, True, 6, False], traced[opt, True, 0, False]
        assert full < half < none  # recomputing 6 of the 12 blocks saves roughly half of what all 12 save
        assert 0.3 < (none - half) / (none - full) < 0.7
    # states dominate (1 x 64 tokens): the peak is at the end of backward, when every gradient exists,
    # unless each is stepped and freed the moment it is complete
    rows, traced = trace(tmp_path, "--seq_len=64", "--batch_size=1", "--activation_checkpointing=True,",
                         "--optimizer_in_backward=False,True")
    n_bytes = rows[0]["params"] * 4 / 2**30  # one fp32 copy of the weights
    for opt, state in (("adamw", 2), ("sgd", 1)):  # AdamW keeps two fp32 moments, SGD one momentum
        together, in_backward = traced[opt, True, 0, False], traced[opt, True, 0, True]
        # at least weights + grads + state; above that by little more than autocast's bf16 weight copies
        assert (2 + state) * n_bytes < together < (2.5 + state) * n_bytes + 0.1
        assert (1 + state) * n_bytes < in_backward < together - 0.5 * n_bytes
    assert traced["adamw", True, 0, False] - traced["sgd", True, 0, False] == pytest.approx(n_bytes, rel=0.02)


def test_tracing_1_3b_takes_no_real_memory(tmp_path):
    """The whole point of tracing on fake tensors: a 1.3B step (15 GiB traced) on a laptop. An op with no fake
    kernel would silently run on real zeros (fused SGD did: 15 GB of RSS)."""
    import resource
    out = tmp_path / "big.json"
    run_script("bench.py", "--sizes=1.3B", "--optimizers=sgd,adamw", "--train_runs=False", "--trace_memory=True",
               "--activation_checkpointing=True,", f"--out_json={out}", cwd=tmp_path,
               env={"LLAMAFORGE_FRESH_PROCESSES": "1"})  # a child of this process, for RUSAGE_CHILDREN below
    rows = json.loads(out.read_text())["train"]
    n_bytes = rows[0]["params"] * 4 / 2**30  # one fp32 copy of 1.3B weights: 4.84 GiB
    for r, copies in zip(rows, (3, 4)):  # weights + grads + momentum (SGD), + two moments (AdamW)
        assert copies * n_bytes < r["traced_gb"] < copies * n_bytes + 1.5  # + checkpointed activations, logits
    # KiB: no child of this worker went past 3 GiB
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 3 * 2**20


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"), reason="~20 s of tracing on 2 cores; set LLAMAFORGE_SLOW=1")
def test_find_max_on_traces_returns_the_boundary(tmp_path):
    out = tmp_path / "max.json"
    proc = run_script("bench.py", "--find_max=True", "--train_runs=False", "--trace_memory=True", "--memory_cap_gb=8",
                      "--optimizers=sgd", "--activation_checkpointing=True,", f"--out_json={out}", cwd=tmp_path)
    res = json.loads(out.read_text())
    found, rows = res["find_max"][0], {r["size"]: r for r in res["train"]}
    ladder = ["110M", "350M", "760M", "1.3B", "1.5B", "1.7B", "1.9B", "2.1B", "2.3B", "2.7B"]
    i = ladder.index(found["largest"])
    assert rows[ladder[i]]["traced_gb"] <= 6 < rows[ladder[i + 1]]["traced_gb"]  # fits, and the next size does not
    assert all(r["seq_len"] == 1024 and r["batch_size"] == 4 for r in rows.values())
    assert f"with sgd (by traces): {found['largest']}" in proc.stdout


@pytest.mark.skipif(not os.environ.get("LLAMA2C_DIR"),
                    reason="set LLAMA2C_DIR to a llama2.c checkout (github.com/karpathy/llama2.c) to time its train.py")
def test_llama2c_baseline_runs_its_train_py_on_our_tiny_shape(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # its train.py runs in a child process; 2 shared cores thrash with more
    checkout = os.environ["LLAMA2C_DIR"]
    before = sorted(os.listdir(checkout))
    r = bench.run_llama2c(checkout, bench.SIZES["tiny"], batch=4, seq=64, iters=5, compile=False, device="cpu",
                          dtype="float32", tmp=str(tmp_path))
    assert r["status"] == "ok", r
    assert r["tok_per_s"] > 0 and r["ms_per_iter"] > 0
    assert "--dim=64" in r["command"] and "--max_seq_len=64" in r["command"] and "--vocab_size=512" in r["command"]
    assert sorted(os.listdir(checkout)) == before  # data and out/ went to the copy, never the user's checkout


def test_llama2c_baseline_without_a_checkout_is_a_one_line_error(bench, tmp_path):
    (tmp_path / "model.py").write_text("")  # some of the files, not train.py
    from runtime import UsageError
    with pytest.raises(UsageError) as e:
        bench.run_llama2c(str(tmp_path), bench.SIZES["tiny"], 4, 64, 5, False, "cpu", "float32", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "no train.py" in msg and "pass --llama2c_dir=<a llama2.c checkout>" in msg


PEAK_RSS_WITH_HOOKS = """
import resource, sys, torch
from model import ModelArgs, Transformer
torch.manual_seed(0)
m = Transformer(ModelArgs(dim=768, n_layers=4, n_heads=12, vocab_size=512, max_seq_len=64)).train()  # blocks dominate
def step_and_free(o):
    def hook(p):
        o.step()
        o.zero_grad(set_to_none=True)
    return hook
for p in m.parameters():
    p.register_post_accumulate_grad_hook(step_and_free(torch.optim.SGD([p], lr=1e-4, momentum=0.9, foreach=False)))
if sys.argv[1] == "blocks":  # what train.py does for compile=True with optimizer_in_backward=True
    for block in m.layers:
        block.compile(backend="aot_eager")  # AOTAutograd as inductor uses it, without C++ codegen
    fwd = m
else:
    fwd = torch.compile(m, backend="aot_eager")
x = torch.randint(512, (1, 64))
for _ in range(2):
    _, loss = fwd(x, x)
    loss.backward()
    del loss
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, m.num_params())
"""


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"), reason="~20 s: inductor compiles; set LLAMAFORGE_SLOW=1")
def test_compiling_block_by_block_keeps_optimizer_in_backward_saving_memory(tmp_path):
    """A whole-model compiled graph returns every gradient together at the end of its backward, so the hooks
    of optimizer_in_backward step only once all gradients exist; one graph per block hands them over block
    by block. Peak RSS of a 29M model (0.11 GiB of fp32 gradients, nearly all in the blocks), 2 steps each way."""
    import subprocess
    import sys
    peak = {}
    for how in ("blocks", "whole"):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_WITH_HOOKS, how], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                             cwd=tmp_path).stdout.split()
        peak[how], n_params = int(out[0]), int(out[1])
    grads = 4 * n_params  # bytes of one full set of fp32 gradients
    assert peak["whole"] - peak["blocks"] > 0.5 * grads  # measured: 95 MB more of 115 MB


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"),
                    reason="two inductor compiles take ~1 min on 2 cores; set LLAMAFORGE_SLOW=1")
def test_train_py_compiled_with_optimizer_in_backward_keeps_the_trajectory(tmp_path):
    make_dataset(tmp_path / "data")
    flags = ["--optimizer_in_backward=True", "--activation_checkpointing=True", "--checkpoint_blocks=1"]
    base = losses(tmp_path, "eager", *flags)
    assert losses(tmp_path, "compiled", *flags, "--compile=True") == pytest.approx(base, rel=1e-4)


@pytest.mark.parametrize("real_largest,expected_runs", [
    ("1.5B", ["1.7B", "1.5B"]),          # the trace was optimistic: step down
    ("1.9B", ["1.7B", "1.9B", "2.1B"]),  # the trace was pessimistic: step up until a run fails
    (None, ["1.7B", "1.5B", "1.3B", "760M", "350M", "110M"]),  # nothing fits
])
def test_find_max_on_a_gpu_walks_from_the_traced_guess(bench, monkeypatch, tmp_path, real_largest, expected_runs):
    """The GPU search (no GPU here: train.py runs are faked by a memory threshold) must end on the real boundary
    whatever the trace guessed, with as few real runs as the walk needs."""
    ladder = bench.LADDER
    traced = dict(zip(ladder, [1, 5, 10, 15, 20, 23, 26, 29, 32, 35]))  # by trace, 1.7B is the largest under 24
    runs = []

    def fake_train_run(s, tmp):
        runs.append(s["size"])
        fits = real_largest is not None and ladder.index(s["size"]) <= ladder.index(real_largest)
        return {"status": "ok" if fits else "oom"}
    for key, value in (("trace_memory", True), ("train_runs", True), ("memory_cap_gb", 24.0),
                       ("traced_peak_gb", lambda s: traced[s["size"]]), ("run_train", fake_train_run)):
        monkeypatch.setattr(bench, key, value)
    found, rows = bench.find_largest("adamw", str(tmp_path))
    assert found["largest"] == real_largest and runs == expected_runs
    assert [r["size"] for r in rows] == sorted(expected_runs, key=ladder.index)
    monkeypatch.setattr(bench, "trace_memory", False)  # runs only: a plain binary search finds the same boundary
    runs.clear()
    assert bench.find_largest("adamw", str(tmp_path))[0]["largest"] == real_largest and len(runs) <= 4


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"),
                    reason="five bench.py runs with inductor compiles, ~75 s on 2 cores; set LLAMAFORGE_SLOW=1")
def test_the_gpu_plan_runs_every_step_at_the_tiny_size_on_a_cpu(tmp_path):
    """gpu_plan.sh (the one-call GPU plan) with GPU_PLAN_SMOKE=1: each step's command line is accepted by bench.py
    and writes its JSON, so a scarce GPU lease is not lost to a typo."""
    env = dict(os.environ, GPU_PLAN_SMOKE="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "gpu_plan.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith("== ") and "(at most" in line]
    assert len(steps) == 5 and proc.stdout.count("   exit 0 after") == 5, proc.stdout
    res = {name: json.loads((tmp_path / "out" / f"{name}.json").read_text())
           for name in ("110m-bf16", "110m-fp16", "110m-int8-decode", "1.3b-adamw", "1.3b-sgd")}
    assert all(r["status"] == "ok" for name in ("110m-bf16", "110m-fp16", "1.3b-adamw", "1.3b-sgd")
               for r in res[name]["train"])
    assert {(r["batch"], r["compiled"]) for r in res["110m-bf16"]["decode"]} == {(1, True), (8, True)}
    assert [(r["batch"], r["int8"]) for r in res["110m-int8-decode"]["decode"]] == [(1, True)]
    assert [(r["optimizer"], r["checkpoint_blocks"]) for r in res["1.3b-adamw"]["train"] + res["1.3b-sgd"]["train"]] \
        == [("adamw", 16), ("sgd", 8)]
