import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, apply_rope, check_sampling, precompute_rope, sample_next
from conftest import tiny_model
from runtime import mfu, peak_flops


def tiny(**kw):
    return tiny_model(**{"vocab_size": 50, "max_seq_len": 24, **kw})


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 7) % 50  # change only positions 10..15
    lx, _ = m(x, x)
    ly, _ = m(y, y)
    torch.testing.assert_close(lx[:, :10], ly[:, :10])
    assert not torch.allclose(lx[:, 10:], ly[:, 10:])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_decoding_equals_full_recomputation(n_kv_heads):
    m = tiny(n_kv_heads=n_kv_heads)
    x = torch.randint(0, 50, (2, 20))
    full, _ = m(x, x)
    m.setup_cache(2)
    chunks = [(0, 8), (8, 13), (13, 14), (14, 20)]  # a prompt, a multi-token chunk, single tokens
    for a, b in chunks:
        part, _ = m(x[:, a:b], x[:, a:b], start_pos=a)
        torch.testing.assert_close(part, full[:, a:b], atol=1e-5, rtol=1e-5)
    m.clear_cache()


def test_generate_greedy_matches_argmax_loop_and_stops_at_eos():
    m = tiny()
    x = torch.randint(0, 50, (1, 5))
    out = m.generate(x, 12, temperature=0)
    idx = x
    for _ in range(12):
        logits, _ = m(idx)  # full recomputation, no cache
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, idx)
    eos = int(out[0, 7])  # pretend the third generated token is EOS: generation must stop at its first use
    first = out[0, 5:].tolist().index(eos)
    stopped = m.generate(x, 12, temperature=0, eos_id=eos)
    assert stopped.shape[1] == 5 + first + 1 and int(stopped[0, -1]) == eos


def test_generate_respects_context_and_rejects_long_prompt():
    m = tiny(max_seq_len=10)
    out = m.generate(torch.zeros(1, 6, dtype=torch.long), 100, temperature=1.0)
    assert out.shape[1] == 10  # capped at the context
    with pytest.raises(ValueError, match="longer than the model's context"):
        m.generate(torch.zeros(1, 11, dtype=torch.long), 5)


def test_sampling_top_k_top_p_and_validation():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    k = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(k.tolist()) <= {0, 1} and len(set(k.tolist())) == 2
    p = sample_next(logits, 1.0, top_p=0.5, generator=g)  # token 0 alone has ~0.73 of the mass
    assert set(p.tolist()) == {0}
    assert torch.equal(sample_next(logits, 0.0), torch.zeros(400, dtype=torch.long))
    for bad in [dict(temperature=-1, top_k=None, top_p=None), dict(temperature=1, top_k=0, top_p=None),
                dict(temperature=1, top_k=None, top_p=1.5)]:
        with pytest.raises(ValueError):
            check_sampling(**bad)


def test_rope_is_a_rotation_of_interleaved_pairs():
    cos, sin = precompute_rope(8, 4, 10000.0)
    x = torch.randn(1, 4, 1, 8)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm
    # position 1, pair 0 turns by exactly 1 radian (theta^0 = 1)
    a, b = x[0, 1, 0, 0], x[0, 1, 0, 1]
    torch.testing.assert_close(y[0, 1, 0, :2], torch.stack([a * math.cos(1) - b * math.sin(1),
                                                            a * math.sin(1) + b * math.cos(1)]))


def test_loss_ignore_index_and_sum_reduction():
    m = tiny()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, :5] = -100
    logits, loss = m(x, y)
    ref = F.cross_entropy(logits[:, 5:].reshape(-1, 50), y[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    _, s = m(x, y, reduction="sum")
    torch.testing.assert_close(s, ref * 14)


def test_param_count_tied_and_untied():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    a = tied.args
    per_layer = (2 * a.dim * a.dim + 2 * a.dim * (a.dim // a.n_heads) * a.n_kv_heads + 3 * a.dim * a.hidden_dim
                 + 2 * a.dim)
    assert tied.num_params() == a.vocab_size * a.dim + a.n_layers * per_layer + a.dim
    assert untied.num_params() == tied.num_params() + a.vocab_size * a.dim
    assert tied.num_params(non_embedding=True) == tied.num_params()  # tied head still costs its matmul


def test_hidden_dim_rule_and_bad_args():
    assert ModelArgs(dim=288, multiple_of=32).hidden_dim == 768  # llama2.c stories15M
    assert ModelArgs(dim=4096, n_heads=32, multiple_of=256).hidden_dim == 11008  # Llama 2 7B
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=8, n_kv_heads=3)


def test_flops_and_mfu():
    m = tiny()
    a = m.args
    assert m.flops_per_token(24) == 6 * m.num_params(non_embedding=True) + 12 * a.n_layers * a.dim * 24
    assert mfu(m.flops_per_token(24), 1000.0, "cpu") is None  # no peak known for a CPU
    assert peak_flops("cpu") is None


def test_activation_checkpointing_gives_same_gradients():
    m = tiny().train()
    x = torch.randint(0, 50, (2, 16))
    _, loss = m(x, x)
    loss.backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    for blocks in (1, m.args.n_layers):  # some blocks recomputed, or all of them
        m.zero_grad()
        m.checkpoint_blocks = blocks
        _, loss2 = m(x, x)
        loss2.backward()
        torch.testing.assert_close(loss, loss2)
        for a, b in zip(g1, (p.grad for p in m.parameters())):
            torch.testing.assert_close(a, b)


def test_flops_per_token_matches_counted_matmul_flops():
    """MFU's numerator: 6N + 12*L*dim*T per token must be what a training step's matmuls actually cost. Counted
    op by op on fake tensors (no memory, no arithmetic) with the math attention kernel, whose matmuls the counter
    sees; like the formula, it counts the causal mask's upper triangle as work done."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    for kw in (dict(dim=768, n_layers=12, n_heads=12), dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2)):  # 110M; GQA
        T = 512
        with FakeTensorMode(), sdpa_kernel(SDPBackend.MATH):
            m = Transformer(ModelArgs(vocab_size=32000, max_seq_len=T, **kw)).train()
            x = torch.randint(32000, (2, T))
            with FlopCounterMode(display=False) as counter:
                _, loss = m(x, x)
                loss.backward()
        assert counter.get_total_flops() == pytest.approx(m.flops_per_token(T) * 2 * T, rel=1e-3), kw


def test_decode_step_with_a_position_per_row_equals_decoding_each_row_alone():
    """What continuous batching needs: rows at different positions (prompts of different lengths, prefilled
    one by one into views of a shared cache) decode together into the tokens each would get alone."""
    from model import KVCache
    m = tiny()
    prompts = [torch.randint(0, 50, (1, n)) for n in (3, 9, 5)]
    alone = [m.generate(p, 6, temperature=0)[0, p.shape[1]:].tolist() for p in prompts]
    a = m.args
    pool = [KVCache(3, a.max_seq_len, a.n_kv_heads, a.dim // a.n_heads, torch.float32, "cpu") for _ in m.layers]
    last = []
    with torch.no_grad():
        for row, p in enumerate(prompts):  # prefill each prompt into its own row of the pool
            for layer, c in zip(m.layers, pool):
                layer.attention.cache = KVCache(1, 0, 0, 0, None, None, k=c.k[row:row + 1], v=c.v[row:row + 1])
            last.append(m(p)[0][:, -1].argmax(-1))
        for layer, c in zip(m.layers, pool):
            layer.attention.cache = c
        tokens, pos = torch.stack(last), torch.tensor([p.shape[1] for p in prompts])
        together = [tokens[:, 0].tolist()]
        for _ in range(5):
            tokens = m.decode_step(tokens, pos).argmax(-1)
            pos += 1
            together.append(tokens[:, 0].tolist())
    m.clear_cache()
    assert [list(col) for col in zip(*together)] == alone


def test_the_eager_decode_forward_makes_no_idle_calls():
    """Eager batch-1 decoding on a GPU is launch-bound (93 tok/s against the CUDA graph's 1,528 on an H200), so each
    torch call a token costs: an fp32 model at dropout 0 converts nothing, calls no dropout, and a block adds a fixed
    count of calls (72 as Python sees them, through __torch_function__; 957 -> 742 profiled calls at 12 layers)."""
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    counts = {}
    for layers in (1, 3):
        model = tiny_model(n_layers=layers)
        model.setup_cache(1)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
            with Calls() as calls:
                model(torch.tensor([[4]]), start_pos=3)
        counts[layers] = len(calls.names)
        idle = {"float", "type_as", "to", "dropout"} & set(calls.names)
        assert not idle, f"calls that do nothing for an fp32 model at dropout 0: {idle}"
    assert (counts[3] - counts[1]) / 2 <= 72, counts
