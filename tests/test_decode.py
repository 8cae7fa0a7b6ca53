"""decode.py, the fast batch-1 CPU step: the same logits as the model's eager decode_step (to float tolerance:
the GEMVs sum in another order), the same greedy tokens through generate.py, and packing leaves the model whole."""
import pytest
import torch

from conftest import run_script, shared
from decode import FastDecoder, pack
from model import ModelArgs, Transformer
from runtime import UsageError


def model(tie, n_kv_heads, seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=300, hidden_dim=96,
                              max_seq_len=48, tie_embeddings=tie)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("tie,n_kv_heads", [(True, 2), (False, 4)])
def test_fast_step_gives_the_eager_steps_logits_over_a_whole_context(tie, n_kv_heads):
    eager, fast = model(tie, n_kv_heads), model(tie, n_kv_heads)
    prompt = torch.randint(0, 300, (1, 5))
    state = {k: v.clone() for k, v in eager.state_dict().items()}
    step = FastDecoder(fast)
    # packing: the parameters are views of the packed matrices, same values, same names; eager code still runs
    assert all(torch.equal(v, state[k]) for k, v in fast.state_dict().items())
    assert not fast.layers[0].attention.wq.weight.is_contiguous()
    x = torch.randint(0, 300, (2, 9))
    assert torch.allclose(fast(x, x)[0], eager(x, x)[0], atol=1e-5)
    with torch.no_grad():
        for m in (eager, fast):
            m.setup_cache(1)
            m(prompt)
        token = torch.tensor([[7]])
        worst = 0.0
        for p in range(5, 48):  # to the end of the context: every cache length
            a, b = eager.decode_step(token, torch.tensor([p])), step(token, torch.tensor([p]))
            assert a.shape == b.shape == (1, 1, 300)
            worst = max(worst, (a - b).abs().max().item() / a.abs().max().item())
            token = a[:, -1].argmax(-1, keepdim=True)
    assert worst < 1e-5, worst  # measured ~3e-7


def test_pack_is_done_once_and_refuses_what_it_cannot_run():
    m = model(True, 2)
    assert pack(m) is pack(m)
    with pytest.raises(UsageError, match="one sequence at a time"):
        m.setup_cache(2)
        FastDecoder(m)(torch.tensor([[1], [2]]), torch.tensor([3]))
    with pytest.raises(UsageError, match="fp32 weights on a CPU"):
        FastDecoder(model(True, 2).to(torch.bfloat16))


def test_generate_py_fast_and_eager_tell_the_same_story():
    """stories260K, greedy from BOS, 300 tokens: the fast step (default) and the eager one agree token for token
    (and both on llama2.c's golden story, checked in test_export)."""
    args = [f"--checkpoint={shared('stories260K', 'stories260K.bin')}",
            f"--tokenizer={shared('stories260K', 'tok512.bin')}", "--temperature=0", "--max_new_tokens=300",
            "--threads=1", "--stream=False"]
    fast = run_script("generate.py", *args).stdout
    eager = run_script("generate.py", *args, "--fast=False").stdout
    assert fast == eager and fast.startswith("Once upon a time, there was a little girl named Lily.")


def test_bench_decode_builds_run_c_and_times_everything_side_by_side(tmp_path):
    """bench_decode.py end to end on stories260K: run.c and runq.c compiled from the llama2.c checkout beside
    LLAMA2C_RUN, every contender timed (eager, fast, compiled fp32 and int8), the generate.py command (from its
    quick-start record, on quick_shim.cpp, and without it), its start-up and peak memory, and the C commands' too."""
    import json
    import os
    import shutil
    run = os.environ.get("LLAMA2C_RUN")
    checkout = run and os.path.dirname(os.path.abspath(run))
    if not checkout or not os.path.isfile(os.path.join(checkout, "runq.c")) or not shutil.which("gcc"):
        pytest.skip("set LLAMA2C_RUN to run inside a llama2.c checkout (run.c, runq.c) and install gcc")
    run_script("bench_decode.py", f"--llama2c={checkout}", f"--tokenizer={shared('stories260K', 'tok512.bin')}",
               f"--checkpoint={shared('stories260K', 'stories260K.bin')}", "--threads=1", "--max_tokens=32",
               "--rounds=1", f"--out_json={tmp_path / 'b.json'}")
    result = json.loads((tmp_path / "b.json").read_text())
    (row,) = result["decode"]
    assert row["threads"] == 1 and all(row[k] > 0 for k in ("run.c", "runq.c", "eager", "fast", "compiled", "int8"))
    assert [c["weights"] for c in result["command"]] == ["fp32", "int8"]
    for cmd in result["command"]:
        assert 0 < cmd["startup_seconds"] and 0 < cmd["seconds"] and 0 < cmd["usual_seconds"] and 0 < cmd["c_seconds"]
        assert cmd["peak_rss_mib"] < 80 < cmd["usual_peak_rss_mib"]  # on the shim: no libtorch, no torch
    assert result["shim"] == {"compiled-1": True, "int8-1": True}
    assert 0 < result["c_peak_rss_mib"]["run.c"] < 100
    assert 0 < result["torch_import_seconds"]  # the floor under start-up, printed beside it
