"""Fine-tuning: continued pretraining from a checkpoint, SFT data + batching + loss masking,
classification (data, constrained scoring, metrics), generate.py --chat, and their one-line errors.
Everything runs on a tiny SentencePiece vocab and a 2-layer model built in the module fixture."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY, make_dataset, one_line_error, quick_vocab, read_metrics, run_script

WORDS = "the cat sat on a mat and a dog ran to the big red ball it was good bad happy sad up down".split()


def make_tokenizer_model(root, vocab_size=320):
    """A tiny SentencePiece vocab with the chat specials built in, on sentences of WORDS."""
    rng = np.random.default_rng(0)
    return quick_vocab(root, "\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(400)), vocab_size)


def make_base(root, tok_path, seed=0, name="base.pt"):
    """An untrained tiny Llama saved as one of our checkpoints, with the tokenizer recorded."""
    from checkpoint import save_checkpoint
    from model import ModelArgs, Transformer
    from tokenizer import make_tokenizer
    tok = make_tokenizer(tok_path)
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seq_len=64)
    model = Transformer(args)
    save_checkpoint({"model": model.state_dict(), "model_args": args.to_dict(), "tokenizer": tok.to_meta(),
                     "config": {}, "iter_num": 0, "best_val_loss": None}, root / name)
    return root / name, tok


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    tok_path = make_tokenizer_model(root)
    base, tok = make_base(root, tok_path)
    rng = np.random.default_rng(1)
    # answers of very different lengths, so micro-batches hold different numbers of trained tokens
    records = [{"instruction": f"say {w}", "input": "the cat" if i % 3 == 0 else "",
                "output": " ".join([w] * (1 + i % 7))}
               for i, w in enumerate(rng.choice(WORDS, 60))]
    (root / "alpaca.json").write_text(json.dumps(records))
    run_script("tokenize_data.py", "sft", f"--source={root / 'alpaca.json'}", "--data_root=data", "--dataset=sft",
               f"--tokenizer={base}", "--val_fraction=0.2", cwd=root)
    return root, base, tok, records


def sft(root, *args, check=True):
    return run_script("tokenize_data.py", "sft", "--data_root=data", *args, cwd=root, check=check)


def train(root, *args, check=True):
    return run_script("train.py", "--data_root=data", *TINY, "--log_interval=1", *args, cwd=root, check=check)


# ---- SFT data ----------------------------------------------------------------------------------

def test_sft_files_hold_the_rendered_examples_and_their_labels(env):
    from chat import IGNORE_INDEX, alpaca_messages, render_chat
    from data import load_meta, open_sft
    root, _, tok, records = env
    meta = load_meta(root / "data" / "sft")
    assert meta["format"] == "sft" and meta["task"] == "sft" and meta["tokenizer"]["sha256"] == tok.to_meta()["sha256"]
    examples = [render_chat(tok, alpaca_messages(r)) for r in records]
    rendered = {tuple(ids): labels for ids, labels in examples}
    seen = []
    for split in ("train", "val"):
        tokens, mask, offsets = open_sft(root / "data" / "sft", split)
        assert meta["splits"][split]["examples"] == len(offsets) - 1
        for a, b in zip(offsets[:-1], offsets[1:]):
            ids = tuple(int(t) for t in tokens[a:b])
            labels = rendered[ids]  # every stored example is one rendered record, whole
            assert [int(m) for m in mask[a:b]] == [lab != IGNORE_INDEX for lab in labels]
            seen.append(ids)
    # split by example: each lands in exactly one split
    assert sorted(seen) == sorted(tuple(ids) for ids, _ in examples)
    assert meta["splits"]["val"]["examples"] == 12


def test_sft_batch_masks_prompt_and_padding_and_loss_covers_answers_only(env):
    from chat import IGNORE_INDEX
    from checkpoint import load_model
    from data import open_sft, sft_batch
    root, base, tok, _ = env
    tokens, mask, offsets = open_sft(root / "data" / "sft", "train")
    idx = [0, 1, 2, 3]
    x, y = sft_batch(tokens, mask, offsets, idx, block_size=63, pad_id=tok.eos_id)
    lengths = [int(offsets[i + 1] - offsets[i]) for i in idx]
    assert x.shape == (4, max(lengths) - 1)  # padded to this batch's longest example, not block_size
    for r, i in enumerate(idx):
        ids, m = np.asarray(tokens[offsets[i]:offsets[i + 1]]), np.asarray(mask[offsets[i]:offsets[i + 1]])
        n = len(ids) - 1
        assert (x[r, :n] == ids[:-1]).all() and (x[r, n:] == tok.eos_id).all()  # right padding
        assert (y[r, n:] == IGNORE_INDEX).all()  # padding is never a target
        assert (y[r, :n][m[1:] == 0] == IGNORE_INDEX).all()  # nor is any prompt token
        assert (y[r, :n][m[1:] == 1] == ids[1:][m[1:] == 1]).all()  # answers are their next tokens
        assert y[r, n - 1] == tok.special_ids["<|end_of_turn|>"]  # the end of turn is trained: the model learns to stop
    model, _ = load_model(base)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    logits, loss = model(xt, yt, ignore_index=IGNORE_INDEX)
    answer = torch.from_numpy(np.concatenate([mask[offsets[i] + 1:offsets[i + 1]] for i in idx]).astype(bool))
    # an independent reference: cross-entropy over exactly the answer positions, gathered by hand
    logp = F.log_softmax(logits.float(), -1)
    manual = torch.cat([-logp[r, :lengths[r] - 1].gather(-1, xt.new_tensor(np.asarray(
                        tokens[offsets[i] + 1:offsets[i + 1]], dtype=np.int64))[:, None]).squeeze(-1)
                        for r, i in enumerate(idx)])[answer].mean()
    assert torch.allclose(loss, manual, atol=1e-5)
    # truncation: block_size cuts every example to block_size + 1 tokens
    xs, _ = sft_batch(tokens, mask, offsets, idx, block_size=8)
    assert xs.shape == (4, 8)


def test_two_micro_batches_give_the_gradient_of_one_batch(env):
    """train.py normalises by the answer-token count of the whole step: one SGD step over 2
    micro-batches of 2 examples equals one step over a batch of all 4, although the micro-batches
    hold different numbers of trained tokens (a mean of means would weight them wrongly)."""
    from data import open_sft, sft_batch
    root, base, _, _ = env
    tokens, mask, offsets = open_sft(root / "data" / "sft", "train")
    g = torch.Generator().manual_seed(1337)  # train.py's sampler for seed 1337, rank 0
    draws = [torch.randint(len(offsets) - 1, (2,), generator=g).tolist() for _ in range(2)]
    counts = [int((sft_batch(tokens, mask, offsets, d, 63)[1] != -100).sum()) for d in draws]
    assert counts[0] != counts[1], counts
    common = ["--dataset=sft", f"--init_from={base}", "--optimizer=sgd", "--momentum=0.0", "--weight_decay=0.0",
              "--grad_clip=0.0", "--learning_rate=1.0", "--lr_schedule=constant", "--warmup_iters=0", "--max_iters=1",
              "--eval_interval=1", "--block_size=63"]
    train(root, *common, "--batch_size=2", "--gradient_accumulation_steps=2", "--out_dir=accum")
    train(root, *common, "--batch_size=4", "--gradient_accumulation_steps=1", "--out_dir=whole")
    w0 = torch.load(base, weights_only=True)["model"]
    a, b = (torch.load(root / d / "ckpt.pt", weights_only=True)["model"] for d in ("accum", "whole"))
    for k in w0:
        assert torch.allclose(a[k] - w0[k], b[k] - w0[k], atol=1e-6, rtol=1e-4), k
    assert any((a[k] - w0[k]).abs().max() > 1e-4 for k in w0)  # the step did move the weights


def test_sft_training_and_chat_generation_stop_at_end_of_turn(env):
    root, base, tok, _ = env
    recs = [{"messages": [{"role": "user", "content": f"the {w}"}, {"role": "assistant", "content": "good dog"}]}
            for w in WORDS * 2]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    sft(root, f"--source={root / 'chat.jsonl'}", "--dataset=chat", f"--tokenizer={base}", "--show=1")
    train(root, "--dataset=chat", f"--init_from={base}", "--max_iters=40", "--eval_interval=40", "--learning_rate=1e-2",
          "--warmup_iters=0", "--block_size=63", "--out_dir=chat")
    ev = read_metrics(root / "chat", "eval")
    assert ev[-1]["val_loss"] < 0.5 * ev[0]["val_loss"]  # answers only: the loss is "good dog" + end of turn
    out = run_script("generate.py", "--checkpoint=chat/ckpt.pt", "--chat=True", "--prompt=the cat", "--temperature=0",
                     "--max_new_tokens=20", cwd=root).stdout
    assert out == "good dog\n"  # stopped by itself at <|end_of_turn|>, which is not printed
    proc = chat_stdin(root, "the ball\n\nthe red dog\nthe up\n", "--max_new_tokens=20")  # blank lines are skipped
    assert proc.stdout.splitlines() == ["good dog"] * 3 and "dropped" not in proc.stderr
    long = "the cat sat on the mat and the dog ran\n" * 4  # 4 turns overflow the 64-token context
    proc = chat_stdin(root, long, "--max_new_tokens=10")
    assert proc.stdout.splitlines() == ["good dog"] * 4 and "dropped the oldest turn" in proc.stderr
    # the default max_new_tokens (256) must not crowd earlier turns out of a 64-token context: unless given, a reply
    # may take a quarter of it; the input marker goes to stderr, before each message and at the end of input
    proc = chat_stdin(root, "the ball\nthe dog\n")
    assert proc.stdout.splitlines() == ["good dog"] * 2 and "dropped" not in proc.stderr \
        and proc.stderr.count("> ") == 3


def chat_stdin(root, text, *args):
    """generate.py --interactive as a user runs it: one message per stdin line."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint=chat/ckpt.pt", "--interactive=True",
                           "--temperature=0", *args], cwd=root, env=env, input=text, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_tinystories_instruct_entries_become_story_prompts(env):
    from chat import story_prompt
    root, base, _, _ = env
    # the TinyStories-Instruct text format: "Key: value" lines, a Story, entries split by <|endoftext|>
    text = ("Features: Dialogue\nWords: climb, ring, messy\nSummary: A girl finds a ring.\nStory: \n\n"
            "Lily liked to climb. She found a messy ring.\n\n\"Look!\" she said.\n<|endoftext|>\n"
            "Words: run, ball, red\nFeatures: BadEnding, Twist\nRandom sentence: The sun was hot.\nStory: \n"
            "Tom had a red ball. He ran.\n<|endoftext|>\n"
            # keys after the story
            "Story: \n\nAnna sang.\n\nShe was glad.\nSummary: Anna sings.\nWords: sing\n<|endoftext|>\n")
    (root / "ts_instruct.txt").write_text(text)
    proc = sft(root, f"--source={root / 'ts_instruct.txt'}", "--dataset=ts", f"--tokenizer={base}", "--show=2")
    assert story_prompt(["climb", "ring", "messy"], ["Dialogue"]).startswith(
        'Write a story. In the story, try to use the verb "climb", the noun "ring" and the adjective "messy".')
    assert "Possible story:" in story_prompt(["run"]) and "bad ending" in story_prompt([], ["BadEnding"])
    from sources import tinystories_entries
    entries = tinystories_entries(text)
    assert [e["Words"] for e in entries] == ["climb, ring, messy", "run, ball, red", "sing"]
    assert entries[2]["Story"] == "Anna sang.\n\nShe was glad." and entries[2]["Summary"] == "Anna sings."
    assert entries[0]["Story"] == "Lily liked to climb. She found a messy ring.\n\n\"Look!\" she said."
    assert "3 conversations" in proc.stdout and "'<|end_of_turn|>'" in proc.stdout  # the --show debug view


def test_sft_errors(env):
    root, base, _, _ = env
    (root / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    one_line_error(sft(root, f"--source={root / 'bad.jsonl'}", f"--tokenizer={base}", check=False),
                   "line 2", "not valid JSON")
    (root / "empty.jsonl").write_text("\n")
    one_line_error(sft(root, f"--source={root / 'empty.jsonl'}", f"--tokenizer={base}", check=False), "no examples")
    (root / "odd.jsonl").write_text('{"prompt": "a"}\n')
    one_line_error(sft(root, f"--source={root / 'odd.jsonl'}", f"--tokenizer={base}", check=False),
                   "line 1", "instruction")
    (root / "ok.jsonl").write_text('{"instruction": "say hi", "output": "hi"}\n' * 6)
    sft(root, f"--source={root / 'ok.jsonl'}", f"--tokenizer={base}", "--dataset=nomask")
    (root / "data" / "nomask" / "train.mask.bin").unlink()  # a half-copied dataset
    one_line_error(train(root, "--dataset=nomask", f"--init_from={base}", "--max_iters=1", check=False),
                   "train.mask.bin not found")


# ---- continued pretraining from a checkpoint ---------------------------------------------------

@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_continued_pretraining_from_a_checkpoint_with_constant_lr(env, opt):
    root, base, tok, _ = env
    make_dataset(root / "data", name="more", vocab_size=64, tokenizer=tok.to_meta())  # ids < 64 of the same tokenizer
    train(root, "--dataset=more", f"--init_from={base}", f"--optimizer={opt}", "--lr_schedule=constant",
          "--warmup_iters=0", f"--learning_rate={0.05 if opt == 'sgd' else 3e-3}",
          "--max_iters=30", "--eval_interval=30",
          "--dim=64", f"--out_dir=cont_{opt}")  # --dim is ignored: the architecture comes from the checkpoint
    tr, ev = read_metrics(root / f"cont_{opt}", "train"), read_metrics(root / f"cont_{opt}", "eval")
    assert [r["iter"] for r in tr] == list(range(1, 31)) and len({r["lr"] for r in tr}) == 1  # fresh, constant schedule
    assert ev[-1]["val_loss"] < ev[0]["val_loss"] - (0.3 if opt == "adamw" else 0.02)  # SGD is slow from a fresh init
    ckpt = torch.load(root / f"cont_{opt}" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["dim"] == 32 and ckpt["config"]["optimizer"] == opt


def test_a_different_tokenizer_is_refused(env):
    root, base, tok, _ = env
    other = dict(tok.to_meta(), sha256="0" * 64, path=None)  # same kind, size and specials; other pieces
    make_dataset(root / "data", name="otherTok", vocab_size=tok.vocab_size, tokenizer=other)
    one_line_error(train(root, "--dataset=otherTok", f"--init_from={base}", "--out_dir=x", check=False),
                   "tokenizer mismatch", "sha256")
    fewer = dict(tok.to_meta(), special_tokens=[])
    make_dataset(root / "data", name="noSpecials", vocab_size=tok.vocab_size, tokenizer=fewer)
    one_line_error(train(root, "--dataset=noSpecials", f"--init_from={base}", "--out_dir=x", check=False),
                   "special_tokens")


# ---- classification ----------------------------------------------------------------------------

def test_classification_data_metrics_and_constrained_predictions(env):
    root, base, tok, _ = env
    # numeric labels with label_names (like twitter_financial_news_sentiment): 0 bad, 1 good, 2 meh
    rows = [("the dog was good and happy", 1), ("it was bad and sad", 0), ("the cat sat on a mat", 2)] * 8
    (root / "cls.csv").write_text("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows) + "\n")
    proc = run_script("tokenize_data.py", "classify", f"--source={root / 'cls.csv'}", "--data_root=data",
                      "--dataset=cls", f"--tokenizer={base}", "--label_names=('bad','good','meh')",
                      "--val_fraction=0.25", cwd=root)
    assert "stratified" in proc.stdout
    val = [json.loads(ln) for ln in (root / "data" / "cls" / "val.classify.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in val) == ["bad"] * 2 + ["good"] * 2 + ["meh"] * 2  # stratified: 25% of each
    train(root, "--dataset=cls", f"--init_from={base}", "--max_iters=80", "--eval_interval=80", "--learning_rate=1e-2",
          "--batch_size=8", "--warmup_iters=0", "--block_size=63", "--out_dir=cls")
    res = json.loads(run_script("evaluate.py", "classify", "--checkpoint=cls/ckpt.pt", "--data_root=data",
                                "--dataset=cls", cwd=root).stdout.strip().splitlines()[-1])
    assert res["examples"] == 6 and res["accuracy"] == 1.0 and res["macro_f1"] == 1.0
    assert res["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]] \
        and res["majority_accuracy"] == pytest.approx(1 / 3)
    # the training log's label accuracy is the constrained prediction evaluate.py makes, on the same 6 texts
    first, last = read_metrics(root / "cls", "eval")[0], read_metrics(root / "cls", "eval")[-1]
    assert last["val_label_acc"] == res["accuracy"] and first["val_label_acc"] < 1.0


def test_classification_metrics_against_hand_computed_values():
    from evaluate import classification_metrics
    m = classification_metrics(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]] and m["accuracy"] == pytest.approx(0.6)
    assert (m["a_precision"], m["a_recall"], m["b_precision"], m["b_recall"]) == pytest.approx((0.5, 0.5, 2 / 3, 1.0))
    assert m["b_f1"] == pytest.approx(0.8) and m["c_f1"] == 0.0 and m["macro_f1"] == pytest.approx((0.5 + 0.8) / 3)


def test_classification_errors(env):
    root, base, _, _ = env
    (root / "lab.jsonl").write_text('{"text": "x", "label": "good"}\n{"text": "y", "label": "great"}\n')
    cls = lambda src, *a: run_script("tokenize_data.py", "classify", f"--source={src}",  # noqa: E731
                                     f"--tokenizer={base}", "--label_names=('good','bad')", *a, cwd=root, check=False)
    one_line_error(cls(root / "lab.jsonl"), "line 2", "'great'", "label set")
    (root / "badjson.jsonl").write_text('{"text": "x", "label": "good"}\n\n{"text": "y" "label"}\n')
    one_line_error(cls(root / "badjson.jsonl"), "line 3", "not valid JSON")
    (root / "nolab.csv").write_text("news,sentiment\nhello,good\n")
    one_line_error(cls(root / "nolab.csv"), "line 2", "--text_field")
    (root / "empty.csv").write_text("text,label\n")
    one_line_error(cls(root / "empty.csv"), "0 labelled")
    (root / "one.jsonl").write_text('{"text": "x", "label": "good"}\n{"text": "y", "label": "good"}\n')
    one_line_error(cls(root / "one.jsonl"), "examples of 1 label(s) ['good']", "at least two")  # a fake 100%
    one_line_error(cls(root / "lab.jsonl", "--label_names=('good','good')"), "repeats a label")
    # Financial PhraseBank's sentence@label lines: a stray line without its label names the format and the way out
    (root / "fpb.txt").write_text("the dog was good@good\nstray line without a label\nit was bad@bad\nx@good\n")
    one_line_error(cls(root / "fpb.txt"), "line 2", "no '@label'", "--skip_bad_lines=True")
    proc = cls(root / "fpb.txt", "--skip_bad_lines=True", "--dataset=fpb", "--data_root=data", "--val_fraction=0.5")
    assert proc.returncode == 0 and "skipped 1 bad line(s)" in proc.stdout and "(lines 2)" in proc.stdout
