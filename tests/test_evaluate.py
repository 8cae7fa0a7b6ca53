"""evaluate.py against hand-computed references: split loss/perplexity/accuracy, continuation scoring,
HellaSwag acc and acc_norm, the plot, train.py's sample_prompts, and the CLI end to end."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from runtime import UsageError
import torch
import torch.nn.functional as F

import evaluate
import engine as model_lib
from checkpoint import save_checkpoint
import conftest
from conftest import REPO, TINY, make_dataset, read_metrics, run_script, shared

FIXTURE = REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl"


def tiny_model(vocab_size=64, max_seq_len=16, seed=0):
    return conftest.tiny_model(seed, vocab_size=vocab_size, max_seq_len=max_seq_len)


# ---- loss over a split -------------------------------------------------------------------------

def test_split_metrics_match_independent_cross_entropy():
    model = tiny_model()
    data = np.random.default_rng(0).integers(0, 64, size=203).astype(np.uint16)  # 202 targets: 12 windows + 10
    res = evaluate.split_metrics(model, data, batch=5)
    # reference: each non-overlapping window of 16 alone, cross-entropy and argmax by hand
    nll, hits = [], 0
    with torch.no_grad():
        for s in range(0, 202, 16):
            chunk = torch.tensor(data[s:min(s + 17, 203)].astype(np.int64))
            logits, _ = model(chunk[None, :-1], chunk[None, 1:])
            nll.append(F.cross_entropy(logits[0], chunk[1:], reduction="none"))
            hits += int((logits[0].argmax(-1) == chunk[1:]).sum())
    nll = torch.cat(nll)
    assert res["tokens_scored"] == len(nll) == 202  # every token but the first scored exactly once
    assert math.isclose(res["loss"], nll.mean().item(), rel_tol=1e-5)
    assert math.isclose(res["ppl"], math.exp(nll.mean().item()), rel_tol=1e-5)
    assert res["acc"] == hits / 202
    part = evaluate.split_metrics(model, data, n_max=40, batch=2)
    assert part["tokens_scored"] == 40 and math.isclose(part["loss"], nll[:40].mean().item(), rel_tol=1e-5)


# ---- continuation scoring ----------------------------------------------------------------------

def reference_logprob(model, context, cont):
    """Log-prob of cont after context from one unbatched, unpadded forward."""
    seq = torch.tensor(context + cont)
    with torch.no_grad():
        logits, _ = model(seq[None, :-1], seq[None, 1:])
    logp = F.log_softmax(logits[0], -1)[torch.arange(len(seq) - 1), seq[1:]]
    return logp[len(context) - 1:].sum().item()


def test_score_continuations_batched_equals_one_at_a_time_and_truncates_left():
    model = tiny_model()
    ctx, conts = [1, 5, 9, 3], [[7], [8, 2, 4], [11, 12]]
    got = model_lib.continuation_logprobs(model, ctx, conts)
    for (lp, n), c in zip(got, conts):
        assert n == len(c) and math.isclose(lp, reference_logprob(model, ctx, c), rel_tol=1e-5, abs_tol=1e-5)
    # 20 context tokens + 3 do not fit a context of 16: keep the last 16 + 1 - 3 = 14 context tokens
    long_ctx = list(range(1, 21))
    got = model_lib.continuation_logprobs(model, long_ctx, [[5, 6, 7], [9]])
    assert math.isclose(got[0][0], reference_logprob(model, long_ctx[-14:], [5, 6, 7]), rel_tol=1e-5)
    assert math.isclose(got[1][0], reference_logprob(model, long_ctx[-14:], [9]), rel_tol=1e-5)


# ---- HellaSwag ---------------------------------------------------------------------------------

class CharTokenizer:
    """One id per character (its code point); BOS = 1."""
    bos_id, eos_id, vocab_size = 1, 2, 128

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [ord(c) for c in text] + [2] * eos


class BigramModel(torch.nn.Module):
    """Logits depend on the previous token only: table[prev]. Deterministic and hand-computable."""
    def __init__(self, table, max_seq_len=64):
        super().__init__()
        self.table, self.args = table, SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, tokens, targets=None, reduction="mean", ignore_index=-100):
        return self.table[tokens], None


def successor_table(bonus=4.0):
    """Strongly predicts 'the next character code' (a -> b -> c ...), uniform otherwise."""
    t = torch.zeros(128, 128)
    t[torch.arange(127), torch.arange(1, 128)] = bonus
    return t


def hand_logprob(table, text_before, ending):
    """Sum of log p(next | prev) over the characters of " " + ending, computed with numpy."""
    logp = table.numpy() - np.log(np.exp(table.numpy()).sum(1, keepdims=True))
    seq = [ord(c) for c in text_before[-1] + " " + ending]
    return sum(logp[a, b] for a, b in zip(seq, seq[1:]))


def test_hellaswag_fixture_answer_known_by_construction():
    items = evaluate.read_hellaswag(str(FIXTURE))
    assert [it["label"] for it in items] == [0, 2]
    assert items[1]["ctx"] == "opq rst" and items[1]["endings"][0] == "azby"  # official file: [step] removed
    table = successor_table()
    model = BigramModel(table)
    for it in items:  # the scores are exactly the hand-computed log-probs
        ctx_ids, cont_ids = evaluate.encode_item(CharTokenizer(), it["ctx"], it["endings"])
        got = [lp for lp, _ in model_lib.continuation_logprobs(model, ctx_ids, cont_ids)]
        want = [hand_logprob(table, it["ctx"], e) for e in it["endings"]]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    res = evaluate.hellaswag_scores(model, CharTokenizer(), items)
    assert res == {"acc": 1.0, "acc_norm": 1.0, "n": 2, "truncated": 0, "chance": 0.25}
    # a model with no idea (uniform) gets both wrong here: it prefers the shortest / the longest ending
    assert evaluate.hellaswag_scores(BigramModel(torch.zeros(128, 128)), CharTokenizer(), items)["acc"] == 0.0


def test_acc_and_acc_norm_differ_when_lengths_differ(tmp_path):
    # uniform model: every token costs log(128), so an ending of c characters (plus its space token)
    # scores -(c+1)log128: acc picks the shortest, acc_norm (divided by c) the longest
    f = tmp_path / "hs.jsonl"
    f.write_text(json.dumps({"ctx": "xy", "endings": ["ab", "abcdefgh", "abc", "abcd"], "label": 1}) + "\n")
    items = evaluate.read_hellaswag(str(f))
    res = evaluate.hellaswag_scores(BigramModel(torch.zeros(128, 128)), CharTokenizer(), items)
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0)


def test_hellaswag_counts_truncated_items():
    items = evaluate.read_hellaswag(str(FIXTURE))
    res = evaluate.hellaswag_scores(BigramModel(successor_table(), max_seq_len=9), CharTokenizer(), items)
    # item 1: BOS + 7 + (1 + 6) - 1 = 14 > 9; item 2: BOS + 7 + (1 + 6) - 1 = 14 > 9
    assert res["truncated"] == 2 and res["n"] == 2


@pytest.mark.parametrize("line, what", [
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "4 non-empty"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"]}', "KeyError"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}', "label 0-3"),
    ('{"ctx": "a", "endings": ', "JSONDecodeError"),
])
def test_malformed_hellaswag_line_names_its_line_number(tmp_path, line, what):
    f = tmp_path / "bad.jsonl"
    f.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(UsageError, match=f"line 2 .*{what}") as e:
        evaluate.read_hellaswag(str(f))
    assert "\n" not in str(e.value)


# ---- plot --------------------------------------------------------------------------------------

def test_plot_draws_several_runs(tmp_path, monkeypatch):
    for name, scale in (("adamw", 1.0), ("sgd", 1.5)):
        d = tmp_path / name
        d.mkdir()
        recs = [{"type": "train", "iter": i, "tokens": 100 * i, "loss": scale * 5 / i, "lr": 1e-3, "grad_norm": 1.0 / i}
                for i in range(1, 11)]
        recs += [{"type": "eval", "iter": i, "tokens": 100 * i, "val_loss": scale * 6 / (i + 1)} for i in (0, 5, 10)]
        recs += [{"type": "sample", "iter": 10, "tokens": 1000, "prompt": "a", "text": "b"}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = tmp_path / "pics" / "loss.png"
    monkeypatch.setattr(evaluate, "runs", f"{tmp_path / 'adamw'},{tmp_path / 'sgd'}")
    monkeypatch.setattr(evaluate, "out", str(png))
    monkeypatch.setattr(evaluate, "logx", True)
    res = evaluate.plot()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert res["runs"]["sgd"]["final_val_loss"] == pytest.approx(1.5 * 6 / 11)
    monkeypatch.setattr(evaluate, "runs", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="metrics.jsonl not found"):
        evaluate.plot()


# ---- CLI end to end ----------------------------------------------------------------------------

def test_cli_loss_table_json_and_empty_split(tmp_path):
    d, toks = make_dataset(tmp_path / "data", n_tokens=3000)
    model = tiny_model(max_seq_len=32)
    meta = json.loads((d / "meta.json").read_text())
    save_checkpoint({"model": model.state_dict(), "model_args": model.args.to_dict(), "config": {},
                     "tokenizer": meta["tokenizer"]}, tmp_path / "ckpt.pt")
    proc = run_script("evaluate.py", "loss", f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--data_root={tmp_path / 'data'}",
                      "--dataset=tiny", "--split=val", f"--json_out={tmp_path / 'res.json'}", "--device=cpu")
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads((tmp_path / "res.json").read_text())
    assert "perplexity" not in proc.stdout and "  ppl" in proc.stdout  # the table comes first
    want = evaluate.split_metrics(model, toks[:300])  # val is the first 10% of the tokens
    assert last["tokens_scored"] == 299 and math.isclose(last["loss"], want["loss"], rel_tol=1e-5)
    (d / "val.bin").write_bytes(b"")
    bad = run_script("evaluate.py", "loss", f"--checkpoint={tmp_path / 'ckpt.pt'}", f"--data_root={tmp_path / 'data'}",
                     "--dataset=tiny", check=False)
    assert bad.returncode != 0 and "empty" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_hellaswag_on_stories260k():
    model_bin, tok = shared("stories260K", "stories260K.bin"), shared("stories260K", "tok512.model")
    proc = run_script("evaluate.py", "hellaswag", f"--checkpoint={model_bin}", f"--tokenizer={tok}",
                      f"--hellaswag_file={FIXTURE}", "--device=cpu")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["n"] == 2 and res["truncated"] == 0 and res["chance"] == 0.25
    assert res["acc"] in (0.0, 0.5, 1.0) and res["acc_norm"] in (0.0, 0.5, 1.0)
    assert "characters" in proc.stdout


def test_train_sample_prompts_logged_without_disturbing_training(tmp_path):
    sp = make_tokenizer_meta()
    make_dataset(tmp_path / "data", vocab_size=512, n_tokens=4000, tokenizer=sp)
    common = [f"--data_root={tmp_path / 'data'}", "--dataset=tiny", *TINY, "--max_iters=4", "--eval_interval=2",
              "--log_interval=1"]
    run_script("train.py", *common, f"--out_dir={tmp_path / 'a'}", "--sample_prompts=('Once upon a time', 'Lily')",
               "--sample_max_new_tokens=8")
    run_script("train.py", *common, f"--out_dir={tmp_path / 'b'}")
    samples = read_metrics(tmp_path / "a", "sample")
    assert [(s["iter"], s["prompt"]) for s in samples] == \
        [(i, p) for i in (0, 2, 4) for p in ("Once upon a time", "Lily")]
    assert all(isinstance(s["text"], str) and s["tokens"] == s["iter"] * 4 * 32 for s in samples)
    # sampling uses its own generator: the training run is bit-identical to one that does not sample
    assert read_metrics(tmp_path / "a", "train") and \
        [r["loss"] for r in read_metrics(tmp_path / "a", "train")] == \
        [r["loss"] for r in read_metrics(tmp_path / "b", "train")]


def make_tokenizer_meta():
    from tokenizer import make_tokenizer
    return make_tokenizer(str(shared("stories260K", "tok512.model"))).to_meta()
