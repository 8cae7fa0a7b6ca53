"""DPO (dpo.py): preference data rendered as SFT renders it, log-probs over answer tokens only (checked against
engine.continuation_logprobs, an independent scoring path), the loss against hand-computed values and exactly ln 2
at step 0, training that learns the preference, exact resume (full and LoRA), precomputed reference log-probs, DDP,
evaluate.py preference, and one-line errors. A tiny SentencePiece vocab and 2-layer model, as in test_finetune."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, one_line_error, read_metrics, run_script
from test_finetune import make_base, make_tokenizer_model

WORDS = ["cat", "dog", "mat", "ball", "red", "sat", "ran", "big"]


def records(n=60, seed=0):
    """A preference anyone can learn: the chosen answer repeats the word, the rejected one calls it bad."""
    rng = np.random.default_rng(seed)
    return [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": f"bad {w}"} for w in rng.choice(WORDS, n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    base, tok = make_base(root, make_tokenizer_model(root))
    other, _ = make_base(root, root / "tok.model", seed=1, name="other.pt")
    (root / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records()))
    prep(root, f"--source={root / 'p.jsonl'}", f"--tokenizer={base}")
    return root, base, other, tok


def prep(root, *args, dataset="pref", check=True):
    return run_script("tokenize_data.py", "dpo", "--data_root=data", f"--dataset={dataset}", "--block_size=63",
                      *args, cwd=root, check=check)


def train(root, *args, check=True, dataset="pref"):
    return run_script("train.py", "--data_root=data", f"--dataset={dataset}", *TINY, "--block_size=63",
                      "--warmup_iters=0", *args, cwd=root, check=check)


# ---- data -----------------------------------------------------------------------------------------

def test_every_record_shape_renders_as_sft_and_drops_and_cuts_are_counted(env):
    from chat import alpaca_messages, chat_ids, render_chat
    from dpo import preference_pairs
    _, _, _, tok = env
    eot = chat_ids(tok)[2]
    recs = [{"prompt": "say cat", "chosen": "cat cat", "rejected": "bad cat"},
            {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "say cat"}],
             "chosen": [{"role": "assistant", "content": "cat cat"}], "rejected": "bad cat"},
            {"chosen": [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat cat"}],
             "rejected": [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "bad cat"}]},
            {"instruction": "say", "input": "cat", "output": "x", "chosen": " cat cat ", "rejected": "bad cat"},
            {"prompt": "say dog", "chosen": "dog", "rejected": "dog"},  # identical: dropped
            {"prompt": " ".join(["the"] * 80), "chosen": "a", "rejected": "b"},  # no room for an answer: dropped
            {"prompt": "say", "chosen": "up " * 40 + "a", "rejected": "up " * 40 + "b"},  # identical once cut
            {"prompt": "say", "chosen": "up " * 40, "rejected": "down"}]  # cut, kept
    pairs, counts = preference_pairs(tok, list(enumerate(recs, 1)), block_size=40)
    assert counts == {"identical": 1, "prompt_too_long": 1, "identical_after_cut": 1, "truncated": 1}
    assert pairs[4] is pairs[5] is pairs[6] is None
    p, c, r = pairs[7]
    assert len(p) + len(c) == 41 and c[-1] != r[-1] == chat_ids(tok)[2]  # the cut answer lost its end of turn
    p, c, r = pairs[0]
    assert pairs[2] == pairs[0]  # two whole conversations: the prompt is what they share
    conv = [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat cat"}]
    assert p + c == render_chat(tok, conv)[0] and c[-1] == r[-1] == eot  # what sft trains on, ending the turn
    assert pairs[1][0] == render_chat(tok, [{"role": "user", "content": "be kind\n\nsay cat"}], True)[0]
    alpaca = alpaca_messages({"instruction": "say", "input": "cat", "output": "cat cat"})
    assert pairs[3][0] + pairs[3][1] == render_chat(tok, alpaca)[0]  # stripped as sft strips Alpaca outputs


def test_cli_writes_the_format_and_splits_by_record_as_sft_does(env):
    from data import load_meta, split_documents
    from dpo import PreferenceBatches, preference_pairs
    root, _, _, tok = env
    meta = load_meta(root / "data" / "pref")
    assert meta["format"] == "preference" and meta["block_size"] == 63 and "reference" not in meta
    b = PreferenceBatches(root / "data" / "pref", 63)
    recs = records()
    want, _ = preference_pairs(tok, list(enumerate(recs, 1)), 63)
    _, val_idx = split_documents(len(recs), 0.05, 1337)  # the split sft makes of the same records
    got = [tuple(b.tokens["val"][b.offsets["val"][3 * i + k]:b.offsets["val"][3 * i + k + 1]].tolist()
                 for k in range(3)) for i in range(b.size("val"))]
    assert got == [tuple(map(list, want[i])) for i in val_idx]


# ---- log-probs and the loss --------------------------------------------------------------------------

def test_answer_logps_count_answer_tokens_only(env):
    """Against engine.continuation_logprobs (its own batching and masking): the sum of log p(answer | prompt)."""
    from checkpoint import load_model
    from dpo import PreferenceBatches, as_pairs, sequence_logps
    from engine import continuation_logprobs
    from model import IGNORE_INDEX
    root, base, _, _ = env
    model, _ = load_model(base)
    b = PreferenceBatches(root / "data" / "pref", 63)
    x, y = b.get("train", [3, 0, 7], "cpu")
    logp, n = sequence_logps(model, x, y.targets)
    for row, i in enumerate([3, 0, 7]):
        o = b.offsets["train"][3 * i:3 * i + 4]
        p, c, r = (b.tokens["train"][o[k]:o[k + 1]].tolist() for k in range(3))
        (lc, nc), (lr, nr) = continuation_logprobs(model, p, [c, r])
        assert as_pairs(n)[row].tolist() == [nc, nr]
        assert as_pairs(logp)[row].tolist() == pytest.approx([lc, lr], abs=1e-4)
        for k, answer in enumerate((c, r)):  # no prompt or padding position is a target
            targets = y.targets[row + 3 * k]
            assert targets[:len(p) - 1].eq(IGNORE_INDEX).all() and targets[len(p) + len(answer) - 1:].eq(-100).all()
    assert torch.allclose(sequence_logps(model, x, y.targets, loss_chunk=7)[0], logp, atol=1e-5)  # loss_chunk_size


def test_losses_against_hand_computed_values():
    from dpo import pair_metrics, preference_losses
    logp, ref, n = torch.tensor([[-3.0, -5.0]]), torch.tensor([[-4.0, -4.0]]), torch.tensor([[2.0, 4.0]])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    # h = (-3 + 4) - (-5 + 4) = 2, beta 0.5: -log sigmoid(1)
    losses, rewards = preference_losses(logp, ref, n, beta=0.5)
    assert losses.item() == pytest.approx(-math.log(sig(1.0)), abs=1e-6)
    assert rewards.tolist() == [[0.5, -0.5]]
    ls = preference_losses(logp, ref, n, beta=0.5, label_smoothing=0.1)[0]
    assert ls.item() == pytest.approx(-0.9 * math.log(sig(1.0)) - 0.1 * math.log(sig(-1.0)), abs=1e-6)
    # IPO: per-token h' = 1/2 - (-1/4) = 0.75; (0.75 - 1 / (2 * 0.5))^2
    assert preference_losses(logp, ref, n, beta=0.5, loss="ipo")[0].item() == pytest.approx(0.0625, abs=1e-6)
    # the SFT term: the chosen answer's mean next-token loss, 3 / 2 per token
    sft = preference_losses(logp, ref, n, beta=0.5, sft_weight=0.2)[0]
    assert sft.item() == pytest.approx(-math.log(sig(1.0)) + 0.2 * 1.5, abs=1e-6)
    # pair 2: the chosen answer is less likely in sum (-6 < -2), more likely per token (-1 > -2); rewards -1, 1
    m = pair_metrics(torch.tensor([[-3.0, -5.0], [-6.0, -2.0]]), torch.tensor([[2, 4], [6, 1]]),
                     torch.tensor([[-4.0, -4.0], [-4.0, -4.0]]), beta=0.5)
    assert m["acc"] == 0.5 and m["logp_acc"] == 0.5 and m["logp_acc_per_token"] == 0.5
    assert m["margin"] == pytest.approx((1.0 - 2.0) / 2) and m["ppl"] == pytest.approx(math.exp(9 / 8))
    assert m["loss"] == pytest.approx((-math.log(sig(1.0)) - math.log(sig(-2.0))) / 2)  # pair 2: beta h = -2
    alone = pair_metrics(torch.tensor([[-3.0, -5.0]]), torch.tensor([[2, 4]]))  # no reference: no rewards
    assert set(alone) == {"pairs", "logp_acc", "logp_acc_per_token", "ppl", "logp_chosen", "logp_rejected"}


def test_loss_is_exactly_ln2_at_step_0_with_a_frozen_copy_and_with_adapters_off(env):
    import copy
    from checkpoint import load_model
    from dpo import PreferenceBatches, as_pairs, frozen_logps, preference_losses, sequence_logps
    from lora import add_lora, adapters_off
    root, base, _, _ = env
    model, _ = load_model(base)
    x, y = PreferenceBatches(root / "data" / "pref", 63).get("train", [1, 2, 3, 4], "cpu")
    ln2 = torch.tensor(math.log(2))

    def step0(reference):
        logp, n = sequence_logps(model.train(), x, y.targets)  # the policy as train.py runs it
        return preference_losses(as_pairs(logp), reference, as_pairs(n))
    losses, rewards = step0(frozen_logps(copy.deepcopy(model), x, y.targets))
    assert torch.equal(losses, ln2.expand(4)) and not rewards.any()
    add_lora(model, rank=4)  # B = 0: the adapted model starts as its base
    losses, rewards = step0(frozen_logps(model, x, y.targets, adapters=False))
    assert torch.equal(losses, ln2.expand(4)) and not rewards.any()
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3)  # trained-looking adapters...
    with torch.no_grad(), adapters_off(model):  # ...and the base is still there, exactly, with them switched off
        assert torch.equal(model(x)[0], load_model(base)[0](x)[0])
    assert not torch.equal(model(x)[0], load_model(base)[0](x)[0])
    assert not torch.equal(step0(frozen_logps(model, x, y.targets, adapters=False))[0], ln2.expand(4))


# ---- training ---------------------------------------------------------------------------------------

FULL = ["--eval_interval=6", "--gradient_accumulation_steps=2", "--learning_rate=1e-2", "--dropout=0.1",
        "--dpo_label_smoothing=0.1", "--log_interval=4", "--max_iters=12"]


@pytest.fixture(scope="module")
def full_run(env):
    """One full fine-tuning DPO run that several tests read."""
    root, base, _, _ = env
    return train(root, f"--init_from={base}", *FULL, "--out_dir=full_all")


def test_training_learns_the_preference_and_logs_it(env, full_run):
    root, _, _, _ = env
    assert "DPO: 57 train and 3 val preference pairs" in full_run.stdout and "val pref acc 0.000" in full_run.stdout
    assert "1,008 tokens per iteration" in full_run.stdout  # 2 steps x 4 pairs x 2 rows x 63
    ev, tr = read_metrics(root / "full_all", "eval"), read_metrics(root / "full_all", "train")
    assert ev[0]["val_loss"] == ev[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-9)  # policy == reference
    assert ev[0]["val_margin"] == ev[0]["val_acc"] == 0
    assert ev[-1]["val_acc"] == 1.0 and ev[-1]["val_margin"] > 0.5 and ev[-1]["val_loss"] < 0.5
    assert ev[-1]["val_reward_chosen"] > 0 > ev[-1]["val_reward_rejected"]
    assert tr[0]["loss"] < math.log(2)
    assert {"margin", "acc", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"} <= set(tr[0])
    assert f"iter 12: loss {tr[-1]['loss']:.4f}" in full_run.stdout
    assert f"margin {tr[-1]['margin']:.3f}" in full_run.stdout
    ckpt = torch.load(root / "full_all" / "ckpt.pt", weights_only=True)
    assert ckpt["dpo"]["reference"]["checkpoint"] == str(env[1])


def rows(out_dir):
    keys = ("type", "iter", "loss", "margin", "acc", "logp_chosen", "val_loss", "val_acc", "val_margin")
    return [{k: r[k] for k in keys if k in r} for r in read_metrics(out_dir)]


def test_full_run_resumes_exactly(env, full_run):
    """Stopped mid log window (iter 7 of the window 5-8) and resumed: the same metrics.jsonl, DPO numbers too."""
    root, base, _, _ = env
    train(root, f"--init_from={base}", *FULL, "--stop_at_iter=7", "--out_dir=full_part")
    train(root, "--init_from=resume", "--out_dir=full_part")  # the reference is re-read from base, by fingerprint
    assert rows(root / "full_part") == rows(root / "full_all") and len(rows(root / "full_all")) == 6


def test_lora_run_resumes_exactly(env):
    root, base, _, _ = env
    common = [f"--init_from={base}", "--lora_rank=4", "--lora_dropout=0.1", "--dpo_sft_weight=0.1", "--eval_interval=4",
              "--learning_rate=1e-2", "--log_interval=3", "--max_iters=8"]
    train(root, *common, "--out_dir=lora_all")
    train(root, *common, "--stop_at_iter=5", "--out_dir=lora_part")
    train(root, "--init_from=resume", "--out_dir=lora_part")
    assert rows(root / "lora_part") == rows(root / "lora_all") and len(rows(root / "lora_all")) == 6
    assert "adapter" in torch.load(root / "lora_all" / "ckpt.pt", weights_only=True)


def test_precomputed_reference_log_probs_train_as_the_live_reference(env, full_run):
    from checkpoint import load_model
    from data import load_meta
    from dpo import PreferenceBatches, objective
    root, base, other, _ = env
    prep(root, f"--source={root / 'p.jsonl'}", f"--reference={base}", dataset="pref_ref")
    assert load_meta(root / "data" / "pref_ref")["reference"]["checkpoint"] == str(base)
    train(root, f"--init_from={base}", *FULL, "--stop_at_iter=4", "--out_dir=stored", dataset="pref_ref")
    stored, live = rows(root / "stored"), rows(root / "full_all")[:len(rows(root / "stored"))]
    assert len(stored) == 2 and stored[1]["loss"] == pytest.approx(live[1]["loss"], abs=1e-5)
    batches = PreferenceBatches(root / "data" / "pref_ref", 63)
    config = {"init_from": str(other), "lora_rank": 0, "dpo_beta": 0.1, "dpo_loss": "sigmoid",
              "dpo_label_smoothing": 0.0, "dpo_sft_weight": 0.0}
    with pytest.raises(Exception, match="stores the reference log-probs of .* --reference="):
        objective(batches, load_model(other)[0], config, None, "cpu")  # another starting model: refused
    with pytest.raises(Exception, match="DPO tunes a trained"):
        objective(batches, load_model(other)[0], {**config, "init_from": "scratch"}, None, "cpu")
    ev = run_script("evaluate.py", "preference", "--data_root=data", "--dataset=pref_ref", f"--checkpoint={base}",
                    cwd=root)  # no --reference: the stored log-probs are the reference
    out = json.loads(ev.stdout.splitlines()[-1])
    assert out["reference"] == "stored with the data" and out["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_ddp_two_processes_normalise_by_the_pairs_of_the_step(env):
    root, base, _, _ = env
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           "--data_root=data", "--dataset=pref", *TINY, "--block_size=63", f"--init_from={base}", "--max_iters=2",
           "--eval_interval=2", "--log_interval=1", "--device=cpu", "--out_dir=ddp", "--learning_rate=1e-2"]
    proc = subprocess.run(cmd, cwd=root, env=e, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tr = read_metrics(root / "ddp", "train")
    assert tr[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # each rank's share of the step's pairs: ln 2 in all
    assert tr[1]["loss"] < tr[0]["loss"]


def test_evaluate_preference_command(env, full_run):
    root, base, _, _ = env
    ev = ["evaluate.py", "preference", "--data_root=data", "--dataset=pref", f"--reference={base}"]
    before = json.loads(run_script(*ev, f"--checkpoint={base}", "--split=train", cwd=root).stdout.splitlines()[-1])
    assert before["pairs"] == 57 and before["loss"] == pytest.approx(math.log(2), abs=1e-9) and before["acc"] == 0
    after = json.loads(run_script(*ev, "--checkpoint=full_all", cwd=root).stdout.splitlines()[-1])
    last = read_metrics(root / "full_all", "eval")[-1]  # train.py's eval drew 2 x 4 val pairs: the 3, repeated
    assert after["pairs"] == 3 and after["acc"] == last["val_acc"] == 1.0 and after["logp_acc"] == 1.0


# ---- bad input ---------------------------------------------------------------------------------------

def test_errors(env):
    from dpo import PreferenceBatches, preference_pairs
    from runtime import UsageError
    root, base, _, tok = env
    (root / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    one_line_error(prep(root, f"--source={root / 'bad.jsonl'}", f"--tokenizer={base}", dataset="bad", check=False),
                   "bad.jsonl line 1 needs 'chosen' and 'rejected' fields")
    conv = lambda last: [{"role": "user", "content": last}, {"role": "assistant", "content": "x"}]  # noqa: E731
    for rec, why in [({"chosen": conv("a"), "rejected": conv("b")}, "share all but their last message"),
                     ({"prompt": "a", "chosen": ["b"], "rejected": "c"}, "one assistant message"),
                     ({"prompt": {"a": 1}, "chosen": "b", "rejected": "c"}, "'prompt' must be a string")]:
        with pytest.raises(UsageError, match=f"f.jsonl line 3 .*{why}"):
            preference_pairs(tok, [(3, rec)], 63, "f.jsonl")
    (root / "same.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n' * 4)
    one_line_error(prep(root, f"--source={root / 'same.jsonl'}", f"--tokenizer={base}", dataset="bad", check=False),
                   "pair is left", "'identical': 4")
    with pytest.raises(UsageError, match=r"rows \(prompt \+ answer\) of up to .* raise block_size to .*block_size=8"):
        PreferenceBatches(root / "data" / "pref", 8)
