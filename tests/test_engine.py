"""The batching engine against independent references: model.generate run on each request alone, the model's own
logits for log-probs, and the one-request complete() that train.py used before the engine existed."""
import json
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import quick_vocab, tiny_model


def train_tokenizer(folder, vocab_size=400):
    """A real tokenizer with the chat specials for a tiny random model, trained on two stdlib modules."""
    from tokenizer import make_tokenizer
    text = Path(textwrap.__file__).read_text() + Path(json.__file__).read_text()
    return make_tokenizer(str(quick_vocab(folder, text, vocab_size)))


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    tok = train_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_model(vocab_size=tok.vocab_size, max_seq_len=64), tok


def alone(model, ids, n, **kw):
    """The reference: model.generate on this one prompt (no pool, no per-row positions, no engine)."""
    return model.generate(torch.tensor([ids]), n, **kw)[0, len(ids):].tolist()


def prompts(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[tok.bos_id] + torch.randint(6, tok.vocab_size, (n - 1,), generator=g).tolist() for n in lengths]


def test_requests_joining_and_leaving_a_batch_get_the_greedy_tokens_each_gets_alone(mt):
    from engine import Engine, Request
    model, tok = mt
    ps, news = prompts(tok, (3, 11, 6, 20, 1, 9)), (12, 5, 30, 9, 40, 2)
    reqs = [Request(p, n, temperature=0) for p, n in zip(ps, news)]
    # two rows for six requests: each finished one frees its row (compacted) for the next, mid-flight
    Engine(model, tok, max_batch=2).run(reqs)
    for r, p, n in zip(reqs, ps, news):
        assert r.tokens == alone(model, p, n, temperature=0) and r.finish_reason == "length"
    assert all(layer.attention.cache is None for layer in model.layers)  # the model is left ready for training


def test_the_context_end_allows_one_token_past_the_last_cached_position(mt):
    """The last new token is predicted from the full context and never fed back: L - T + 1 new tokens fit."""
    from engine import Engine, Request
    model, tok = mt
    p = prompts(tok, (60,))[0]
    r = Engine(model, tok).run([Request(p, 100, temperature=0)])[0]
    ref = alone(model, p, 100, temperature=0)  # model.generate stops one earlier, at a full context
    assert r.tokens[:4] == ref and len(r.tokens) == 5 and r.finish_reason == "length"
    assert r.tokens[4] == int(model(torch.tensor([p + ref]))[0][0, -1].argmax())


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch(mt):
    from engine import Engine, Request
    model, tok = mt
    ps = prompts(tok, (7, 4, 15, 10), seed=1)
    settings = dict(temperature=1.0, top_k=50, top_p=0.9)
    solo = Engine(model, tok).run([Request(ps[0], 20, seed=5, **settings)])[0]
    crowd = [Request(ps[0], 20, seed=5, **settings)] + [Request(p, 25, temperature=0.7, seed=i) for i, p in
                                                       enumerate(ps[1:])]
    Engine(model, tok, max_batch=4).run(crowd[1:2] + crowd[:1] + crowd[2:])
    assert crowd[0].tokens == solo.tokens
    ref = alone(model, ps[0], 20, generator=torch.Generator().manual_seed(5), **settings)  # the sampler of generate.py
    assert solo.tokens == ref and len(set(ref)) > 3


def test_a_step_that_gives_its_own_argmax_decides_the_greedy_rows_only(mt):
    """A decode step may return (logits, ids) (decode.CompiledDecoder computes the argmax in its kernel): greedy
    rows take those ids, sampled rows and log-probs still read the logits. Here the step's ids are the second most
    likely token, so a greedy row that took the logits' argmax instead would show it."""
    from engine import Engine, Request
    model, tok = mt

    def second(tokens, pos):
        logits = model.decode_step(tokens, pos)
        return logits, logits[:, -1].topk(2, dim=-1).indices[:, 1]

    ps = prompts(tok, (5, 9, 3), seed=2)

    def requests():
        return [Request(ps[0], 8, temperature=0, logprobs=2), Request(ps[1], 8, temperature=0.9, seed=3),
                Request(ps[2], 8, temperature=0)]

    plain, own = requests(), requests()
    Engine(model, tok, max_batch=3).run(plain)
    Engine(model, tok, max_batch=3, decode_step=second).run(own)
    assert own[1].tokens == plain[1].tokens  # sampled: its logits and its generator, as before
    for r, p in ((own[0], ps[0]), (own[2], ps[2])):
        assert r.tokens != alone(model, p, 8, temperature=0)
        logits = logits_of(model, p, r.tokens)
        assert r.tokens[0] == int(logits[0].argmax())  # the prefill's token: the model's own argmax
        assert r.tokens[1:] == logits[1:].topk(2, dim=-1).indices[:, 1].tolist()  # then the step's ids
    lp = F.log_softmax(logits_of(model, ps[0], own[0].tokens), dim=-1)
    assert [round(x[0], 4) for x in own[0].token_logprobs] == \
        [round(float(lp[i, t]), 4) for i, t in enumerate(own[0].tokens)]  # the chosen token's, from the logits


def logits_of(model, prompt, new):
    """The logits (one row per new token) that predicted each of `new` after `prompt`."""
    from model import IGNORE_INDEX
    x = torch.tensor([prompt + new])
    with torch.no_grad():  # targets (all ignored) make the model return every position's logits, not the last's
        return model(x, torch.full_like(x, IGNORE_INDEX))[0][0, len(prompt) - 1:-1]


def test_stop_text_holds_back_what_could_become_a_stop_string():
    from engine import StopText
    s = StopText(["abc", "bd", ""])
    assert s.add("xa") == ("x", False) and s.held == "a"
    assert s.add("b") == ("", False) and s.held == "ab"
    assert s.add("d") == ("a", True)  # "bd" ends the text; "a" was never part of a stop string
    s = StopText(["abc"])
    assert s.add("zab") == ("z", False) and s.add("x") == ("abx", False) and s.add("yabcab") == ("y", True)


def test_stop_strings_and_stop_ids_end_the_text_without_showing_them(mt):
    from engine import Engine, Request
    model, tok = mt
    p = prompts(tok, (5,), seed=2)[0]
    full = Engine(model, tok).run([Request(p, 40, temperature=0)])[0]
    stop = full.text[12:15]
    streamed = []
    r = Request(p, 40, temperature=0, stop=["never seen", stop], on_text=streamed.append)
    Engine(model, tok).run([r])
    assert r.text == full.text[:full.text.index(stop)] == "".join(streamed) and r.finish_reason == "stop"
    assert len(r.tokens) < 40
    k = 7  # a token of the greedy run as a stop id: generation ends there, the id is not text
    r = Engine(model, tok).run([Request(p, 40, temperature=0, stop_ids=[full.tokens[k]])])[0]
    first = full.tokens.index(full.tokens[k])
    assert r.tokens == full.tokens[:first + 1] and r.completion_ids() == full.tokens[:first]
    assert r.text == tok.decode(p + full.tokens[:first])[len(tok.decode(p)):] and r.finish_reason == "stop"


def test_complete_writes_what_it_wrote_before_the_engine(mt):
    from engine import complete
    model, tok = mt

    def before(prompt, n, temperature, generator=None):  # engine.complete as it was, on model.generate
        ids = tok.encode(prompt, bos=True)
        y = model.generate(torch.tensor([ids]), n, temperature=temperature, eos_id=[tok.eos_id],
                           generator=generator)[0].tolist()
        new = y[len(ids):]
        cut = next((i for i, t in enumerate(new) if t == tok.eos_id), len(new))
        return tok.decode(ids + new[:cut])[len(tok.decode(ids)):]
    for prompt in ("def encode(", "import json\n"):
        assert complete(model, tok, prompt, 20, temperature=0) == before(prompt, 20, 0)
        got = complete(model, tok, prompt, 20, 0.8, generator=torch.Generator().manual_seed(3))
        assert got == before(prompt, 20, 0.8, torch.Generator().manual_seed(3)) and got


def test_log_probs_of_the_prompt_and_of_new_tokens_are_the_models(mt):
    from engine import Engine, Request
    model, tok = mt
    p = prompts(tok, (12,), seed=3)[0]
    r = Engine(model, tok).run([Request(p, 3, temperature=0, logprobs=2, prompt_logprobs=True)])[0]
    x = torch.tensor([p + r.tokens])
    with torch.no_grad():
        logp = F.log_softmax(model(x, x)[0][0].float(), -1)  # every position's distribution, one full forward
    want = [logp[i, x[0, i + 1]].item() for i in range(x.shape[1] - 1)]
    got = [lp for lp, _ in r.prompt_lps] + [lp for lp, _ in r.token_logprobs]
    assert len(got) == len(want) == len(p) + 2 and max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    for lp, top in r.prompt_lps + r.token_logprobs:
        assert len(top) == 2 and top[0][1] >= top[1][1] and lp <= top[0][1] + 1e-6
    assert all(top[0][0] == t for (_, top), t in zip(r.token_logprobs, r.tokens))  # greedy picks the most likely


def test_limits_and_bad_requests(mt):
    from engine import Engine, Request
    from runtime import UsageError
    model, tok = mt
    e = Engine(model, tok, queue_size=1)
    r = e.run([Request([tok.bos_id, 7], 0)])[0]
    assert r.tokens == [] and r.finish_reason == "length"
    for bad, what in (([], "empty"), ([1] * 65, "context"), ([1, 10_000], "vocabulary")):
        with pytest.raises(UsageError, match=what):
            e.submit(Request(bad, 5))
    with pytest.raises(UsageError, match="temperature"):
        e.submit(Request([1], 5, temperature=-1))
    assert e.submit(Request([1], 5)) and not e.submit(Request([1], 5))  # one may wait; the next is refused


def test_a_request_that_fails_to_sample_or_is_cancelled_leaves_the_others_alone(mt):
    from engine import Engine, Request
    model, tok = mt
    ps = prompts(tok, (4, 8, 6), seed=4)
    nan = Request(ps[0], 10, temperature=float("nan"))  # NaN probabilities: multinomial refuses them
    tiny = Request(ps[1], 10, temperature=1e-30)  # would overflow to NaN too: treated as greedy
    ok = Request(ps[2], 10, temperature=0)
    Engine(model, tok, max_batch=3).run([nan, tiny, ok])
    assert nan.finish_reason == "error" and "sampling" in nan.error
    assert tiny.tokens == alone(model, ps[1], 10, temperature=0) and ok.tokens == alone(model, ps[2], 10, temperature=0)

    e = Engine(model, tok, max_batch=4)
    e.start()
    try:
        started, done = threading.Event(), threading.Event()
        long = Request(ps[0], 60, temperature=0, on_text=lambda t: started.set())
        assert e.submit(long) and started.wait(10)
        long.cancelled = True
        other = Request(ps[1], 12, temperature=0, on_done=lambda r: done.set())
        assert e.submit(other) and done.wait(10)
    finally:
        e.close()
    assert long.finish_reason == "cancelled" and len(long.tokens) < 60
    assert other.tokens == alone(model, ps[1], 12, temperature=0) and other.finish_reason == "length"
