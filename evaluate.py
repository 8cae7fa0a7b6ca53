"""Evaluate a checkpoint, and draw training curves.

    python evaluate.py loss --checkpoint=out/demo --dataset=demo --split=val          # loss, perplexity, accuracy
    python evaluate.py hellaswag --checkpoint=out/demo --hellaswag_file=hellaswag_val.jsonl
    python evaluate.py classify --checkpoint=out/classify_adamw --dataset=fpb                  # accuracy, F1, confusion
    python evaluate.py preference --checkpoint=out/dpo --dataset=prefs --reference=out/sft   # held-out DPO pairs
    python evaluate.py plot --runs=out/adamw,out/sgd --out=docs/loss.png              # metrics.jsonl -> PNG

Each subcommand prints a table, then one JSON line with the same numbers (and writes it to json_out if
set) so scripts can read results without parsing the table. A subcommand is a function that returns a
dict of results; adding one is one entry in COMMANDS at the bottom.
"""
import json
import os
import re
import sys
import time
from contextlib import nullcontext
from functools import partial

# -----------------------------------------------------------------------------
# every subcommand
checkpoint = "out/ckpt.pt"      # our ckpt.pt or its run directory, a llama2.c .bin, or a Hugging Face folder
adapter = ""                    # a LoRA run's ckpt.pt to apply on top of --checkpoint (its base)
tokenizer = ""                  # override the checkpoint's tokenizer: a SentencePiece .model path or 'gpt2'
device = "auto"                 # 'auto' (cuda if available), 'cpu', 'cuda', ...
dtype = "auto"                  # 'auto' (bf16 on CUDA where supported, fp32 otherwise), 'float32', 'bfloat16', ...
json_out = ""                   # also write the results to this JSON file
# loss
data_root = "data"              # pretokenized datasets live in data_root/dataset (tokenize_data.py pretokenize)
dataset = "demo"                # the dataset folder under data_root (loss, classify)
split = "val"                   # any split in the dataset's meta.json
max_tokens = 0                  # score only the first this-many tokens of the split; 0 = the whole split
block_size = 0                  # window length; 0 = the model's context (max_seq_len)
batch_size = 8                  # windows per forward pass
# hellaswag
hellaswag_file = "hellaswag_val.jsonl"  # official rowanz/hellaswag file, or the cleaned {ctx, endings, label} variant
max_items = 0                   # score only the first this-many items; 0 = all
# classify (data from tokenize_data.py classify: data_root/dataset/{split}.classify.jsonl + the label set in meta.json)
# preference (data from tokenize_data.py dpo)
reference = ""                  # the DPO reference checkpoint, for rewards and margins ("" = the log-probs stored
                                # with the data, if any; else log-probs only)
dpo_beta = 0.1                  # beta of the rewards and the loss, as in train.py
# plot
runs = ""                       # comma-separated run directories holding metrics.jsonl (train.py's out_dir)
out = "loss.png"                # where plot writes the PNG
logx = False                    # log-scale the tokens axis (shows early training better)
# -----------------------------------------------------------------------------
import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import check_tokenizers, load_any, tokenizer_for  # noqa: E402
from configurator import configure, require  # noqa: E402
from data import check_token_ids, load_meta, open_split  # noqa: E402
from dpo import PreferenceBatches, frozen_logps, pair_metrics, score_pairs  # noqa: E402
from engine import continuation_logprobs, predict_labels  # noqa: E402
from model import loss_metrics, score_batch  # noqa: E402
from runtime import (UsageError, atomic_file, autocast, check, check_output, device_and_dtype,  # noqa: E402
                     handle_errors, write_text)
from sources import jsonl  # noqa: E402


def setup():
    """(model, checkpoint dict, device, autocast context) from the config globals."""
    dev, dev_type, dt = device_and_dtype(device, dtype)
    model, ckpt = load_any(checkpoint, adapter, dev)
    return model, ckpt, dev, autocast(dev_type, dt)


def get_tokenizer(model, ckpt):
    """The tokenizer key if set, else the checkpoint's own (llama2.c and some HF imports record none)."""
    return tokenizer_for(ckpt, tokenizer, model.args.vocab_size)


# ---- loss, perplexity, next-token accuracy over a split ---------------------------------------

@torch.no_grad()
def split_metrics(model, data, n_max=0, window=0, batch=8, device="cpu", ctx=nullcontext()):
    """Score tokens 1..N of data (a 1-D token array) given everything before them in the same window.
    Windows of the model's context do not overlap, so each token is predicted exactly once; the first
    token of a window is predicted from nothing but itself, which makes this a little pessimistic
    next to a sliding window (the price of scoring every token once at 1x the compute)."""
    window = window or model.args.max_seq_len
    n = len(data) - 1 if not n_max else min(n_max, len(data) - 1)  # tokens to score; the first has no target
    if n < 1:
        raise UsageError(f"the split holds {len(data)} token(s); at least 2 are needed to score one next-token "
                         f"prediction")
    starts = list(range(0, n, window))
    sums = [0.0, 0, 0]
    for k in range(0, len(starts), batch):
        group = starts[k:k + batch]
        # a short last window goes in a batch of its own so nothing needs padding
        for rows in ([s for s in group if s + window <= n], [s for s in group if s + window > n]):
            if not rows:
                continue
            T = min(window, n - rows[0])
            chunk = np.stack([data[s:s + T + 1] for s in rows]).astype(np.int64)
            x, y = torch.from_numpy(chunk[:, :-1]).to(device), torch.from_numpy(chunk[:, 1:]).to(device)
            with ctx:
                sums = [a + b for a, b in zip(sums, score_batch(model, x, y))]
    return {**loss_metrics(*sums), "tokens_scored": n, "window": window}


def loss():
    model, ckpt, dev, ctx = setup()  # scoring token ids needs no tokenizer, but they must be the model's ids
    data_dir = os.path.join(data_root, dataset)
    tok = ckpt.get("tokenizer") or {}
    check_tokenizers(ckpt.get("tokenizer"), load_meta(data_dir)["tokenizer"], f"checkpoint {checkpoint} and {data_dir}",
                     f"pretokenize the data with --tokenizer={tok.get('path') or tok.get('kind')}")
    data = open_split(data_dir, split)  # stops with a one-line error on a missing, damaged or empty split
    top = check_token_ids(data_dir, split, model.args.vocab_size)
    if block_size > model.args.max_seq_len:
        raise UsageError(f"block_size={block_size} exceeds the model's context {model.args.max_seq_len}; "
                         f"lower it or use 0")
    t0 = time.time()
    res = split_metrics(model, data, max_tokens, block_size, batch_size, dev, ctx)
    return {"task": "loss", "checkpoint": checkpoint, "dataset": data_dir, "split": split, **res,
            "max_token_id": top, "seconds": round(time.time() - t0, 2)}


# ---- scoring continuations: HellaSwag here, classification later ------------------------------

def clean_hellaswag(text):
    """The cleaning the harnesses apply to the official file (WikiHow items carry [header], [title],
    [step] markup); the preprocessed variant is already clean and passes through unchanged."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def read_hellaswag(path, n_max=0):
    """Items {ctx, endings (4), label} from a JSONL file; a bad line stops with its line number."""
    if not os.path.isfile(path):
        raise UsageError(f"HellaSwag file '{path}' not found; download hellaswag_val.jsonl from "
                         f"github.com/rowanz/hellaswag (data/) and pass --hellaswag_file=PATH")
    def item(d):
        ctx_text, endings, label = d["ctx"], d["endings"], int(d["label"])
        if not (isinstance(ctx_text, str) and isinstance(endings, list) and len(endings) == 4
                and all(isinstance(e, str) and e.strip() for e in endings) and 0 <= label < 4):
            raise ValueError("needs a string ctx, 4 non-empty string endings and a label 0-3")
        if "ctx_a" in d:  # the official file: clean the way the harnesses do
            ctx_text, endings = clean_hellaswag(ctx_text), [clean_hellaswag(e) for e in endings]
        return {"ctx": ctx_text, "endings": endings, "label": label}
    items = []
    for _, it in jsonl(path, "a HellaSwag item", "expected JSON with ctx, endings (4 strings) and label 0-3", item):
        items.append(it)
        if n_max and len(items) == n_max:
            break
    if not items:
        raise UsageError(f"{path} holds no HellaSwag items; pass the hellaswag_val.jsonl file")
    return items


def encode_item(tok, ctx_text, endings):
    """(context ids, [ending ids]). Encode context + " " + ending whole, as the harnesses do, and cut
    where the tokenizations of the four texts stop agreeing with the context's: the ending's leading
    space then lands in its first token whichever tokenizer this is (SentencePiece's "▁" or GPT-2's " ")."""
    ctx_ids = tok.encode(ctx_text, bos=True)
    wholes = [tok.encode(ctx_text + " " + e, bos=True) for e in endings]
    k = len(ctx_ids)
    for w in wholes:  # a merge across the boundary moves the cut left by a token or so
        k = next((i for i, (a, b) in enumerate(zip(ctx_ids[:k], w)) if a != b), min(k, len(w) - 1))
    return ctx_ids[:k], [w[k:] for w in wholes]


def hellaswag_scores(model, tok, items, device="cpu", ctx=nullcontext(), log_every=0):
    """acc: the ending with the highest summed log-prob is the label. acc_norm: log-prob divided by the
    ending's length in characters, as lm-evaluation-harness does (some scripts divide by tokens, which
    gives different numbers); it stops favouring short endings just for being short."""
    correct = correct_norm = truncated = 0
    t0 = time.time()
    for k, item in enumerate(items, 1):
        ctx_ids, cont_ids = encode_item(tok, item["ctx"], item["endings"])
        truncated += len(ctx_ids) + max(len(c) for c in cont_ids) - 1 > model.args.max_seq_len
        with ctx:
            scores = continuation_logprobs(model, ctx_ids, cont_ids)
        logp = [s for s, _ in scores]
        norm = [s / len(e) for s, e in zip(logp, item["endings"])]
        correct += int(np.argmax(logp)) == item["label"]
        correct_norm += int(np.argmax(norm)) == item["label"]
        if log_every and k % log_every == 0:
            print(f"{k:,}/{len(items):,} items: acc {correct / k:.4f}, acc_norm {correct_norm / k:.4f}, "
                  f"{time.time() - t0:.0f} s", file=sys.stderr)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n, "truncated": truncated, "chance": 0.25}


def hellaswag():
    model, ckpt, dev, ctx = setup()
    tok = get_tokenizer(model, ckpt)
    items = read_hellaswag(hellaswag_file, max_items)
    t0 = time.time()
    res = hellaswag_scores(model, tok, items, dev, ctx, log_every=500)
    return {"task": "hellaswag", "checkpoint": checkpoint, "file": hellaswag_file, **res,
            "acc_norm_divides_by": "characters", "seconds": round(time.time() - t0, 2)}


# ---- pictures ----------------------------------------------------------------------------------

def read_run(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found; pass --runs=DIR,DIR with train.py out_dir folders that hold "
                         f"metrics.jsonl")
    recs = [r for _, r in jsonl(path, "JSON", "the log is damaged (a crash mid-write?): delete that line")]
    if not any(r.get("type") in ("train", "eval") for r in recs):
        raise UsageError(f"{path} holds no train or eval records yet; let the run log at least log_interval "
                         f"iterations")
    return recs


def plot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    dirs = [d for d in runs.split(",") if d.strip()]
    if not dirs:
        raise UsageError("no runs given; pass --runs=out/adamw,out/sgd (train.py out_dir folders)")
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True, height_ratios=[3, 1, 1])
    results = {"task": "plot", "out": out, "runs": {}}
    for k, d in enumerate(dirs):
        recs, name, color = read_run(d.strip()), os.path.basename(os.path.normpath(d.strip())), f"C{k}"
        tr = [r for r in recs if r.get("type") == "train"]
        ev = [r for r in recs if r.get("type") == "eval"]
        if tr:
            x = [r["tokens"] for r in tr]
            axes[0].plot(x, [r["loss"] for r in tr], color=color, alpha=0.45, lw=1, label=f"{name} train")
            axes[1].plot(x, [r["lr"] for r in tr], color=color, lw=1.2, label=name)
            axes[2].plot(x, [r["grad_norm"] for r in tr], color=color, lw=1, label=name)
        if ev:
            axes[0].plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], color=color, lw=2, marker="o",
                         ms=4, label=f"{name} val")
            results["runs"][name] = {"final_val_loss": ev[-1]["val_loss"], "tokens": ev[-1]["tokens"]}
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].set_title("training curves: thin = train (per log interval), thick = val")
    axes[1].set_ylabel("learning rate")
    axes[2].set_ylabel("grad norm\n(before clipping)")
    for ax in axes[1:]:  # log: SGD's and AdamW's learning rates differ by ~100x
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].set_xlabel("tokens seen")
    if logx:
        axes[2].set_xscale("log")
    axes[2].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else (f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}")))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if len(dirs) > 1:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=90, format=os.path.splitext(out)[1][1:])
    return results


# ---- output ------------------------------------------------------------------------------------

def report(results):
    """A table for people, then one JSON line (and json_out) for scripts."""
    width = max(len(k) for k in results)
    for k, v in results.items():
        number = isinstance(v, int) and not isinstance(v, bool)
        text = f"{v:.4f}" if isinstance(v, float) else (f"{v:,}" if number else v)
        print(f"  {k:<{width}}  {text}")
    if results.get("task") == "hellaswag":
        print("  (acc_norm divides each ending's log-prob by its length in characters, like lm-evaluation-harness)")
    line = json.dumps(results)
    print(line)
    if json_out:
        write_text(json_out, line + "\n")


# ---- classification: constrained to the label set ----------------------------------------------

def classification_metrics(gold, pred, labels):
    """Accuracy, per-class precision/recall/F1, macro F1 and the confusion matrix (rows gold, cols predicted)."""
    k = {lab: i for i, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, pred):
        cm[k[g], k[p]] += 1
    res = {"accuracy": float(np.trace(cm) / max(1, cm.sum()))}
    f1s = []
    for i, lab in enumerate(labels):
        tp = cm[i, i]
        prec = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        rec = tp / cm[i].sum() if cm[i].sum() else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        res.update({f"{lab}_precision": float(prec), f"{lab}_recall": float(rec), f"{lab}_f1": float(f1)})
        f1s.append(f1)
    res["macro_f1"] = float(np.mean(f1s))
    res["confusion_matrix"] = cm.tolist()
    return res


def classify():
    """Each held-out text is rendered with chat.py's classification prompt; every label's answer
    (its tokens + <|end_of_turn|>, exactly as training rendered it) is scored by its summed log-prob,
    and the best one is the prediction: the model can only ever answer with a label."""
    model, ckpt, dev, ctx = setup()
    tok = get_tokenizer(model, ckpt)
    data_dir = os.path.join(data_root, dataset)
    meta = load_meta(data_dir)
    if meta.get("task") != "classify":
        raise UsageError(f"{data_dir} was not made by python tokenize_data.py classify (meta.json has no label set); "
                         f"make it so")
    labels = meta["labels"]
    path = os.path.join(data_dir, f"{split}.classify.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found; re-run python tokenize_data.py classify (splits: train, val)")
    rows = [r for _, r in jsonl(path)][:max_items or None]
    if not rows:
        raise UsageError(f"{path} holds no examples; re-run python tokenize_data.py classify with more data")
    t0 = time.time()
    with ctx:
        pred = predict_labels(model, tok, [r["text"] for r in rows], labels)
    gold = [r["label"] for r in rows]
    train_path = os.path.join(data_dir, "train.classify.jsonl")  # the majority class is the train split's
    train_labels = [r["label"] for _, r in jsonl(train_path)] if os.path.isfile(train_path) else gold
    majority = max(labels, key=train_labels.count)
    return {"task": "classify", "checkpoint": checkpoint, "dataset": data_dir, "split": split, "examples": len(rows),
            "labels": ",".join(labels), **classification_metrics(gold, pred, labels),
            "majority_label": majority, "majority_accuracy": gold.count(majority) / len(gold),
            "seconds": round(time.time() - t0, 2)}


def preference():
    """A preference split (tokenize_data.py dpo), every pair once: how often the model gives the chosen answer the
    higher log-prob (logp_acc, and per answer token), and with a reference the DPO rewards, margin, their accuracy
    and the loss, exactly as train.py logs them."""
    model, ckpt, dev, ctx = setup()
    data_dir = os.path.join(data_root, dataset)
    tok = ckpt.get("tokenizer") or {}
    check_tokenizers(tok or None, load_meta(data_dir)["tokenizer"], f"checkpoint {checkpoint} and {data_dir}",
                     f"make the pairs with tokenize_data.py dpo --tokenizer={tok.get('path') or tok.get('kind')}")
    batches = PreferenceBatches(data_dir, model.args.max_seq_len)
    if split not in batches.offsets:
        raise UsageError(f"split='{split}' is not one of {', '.join(batches.offsets)}")
    ref = partial(frozen_logps, load_any(reference, "", dev)[0]) if reference else None
    n = min(max_items or batches.size(split), batches.size(split))
    t0 = time.time()
    with ctx:
        scores = score_pairs(model, (batches.get(split, list(range(a, min(a + batch_size, n))), dev)
                                     for a in range(0, n, batch_size)), ref)
    return {"task": "preference", "checkpoint": checkpoint, "dataset": data_dir, "split": split,
            "reference": reference or ("stored with the data" if scores[2] is not None else "none"),
            **pair_metrics(*scores, beta=dpo_beta), "seconds": round(time.time() - t0, 2)}


COMMANDS = {"loss": loss, "hellaswag": hellaswag, "plot": plot, "classify": classify, "preference": preference}

# the settings each subcommand reads: --help shows these only
MODEL = "checkpoint adapter tokenizer device dtype json_out "
USES = {"loss": MODEL + "data_root dataset split max_tokens block_size batch_size",
        "hellaswag": MODEL + "hellaswag_file max_items", "classify": MODEL + "data_root dataset split max_items",
        "preference": MODEL + "data_root dataset split max_items batch_size reference dpo_beta",
        "plot": "runs out logx json_out"}

if __name__ == "__main__":
    handle_errors()
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        configure(globals(), ["--help"])
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise UsageError(f"give a subcommand, one of {', '.join(COMMANDS)}; "
                         f"e.g. python evaluate.py loss --checkpoint=out/ckpt.pt")
    config = configure(globals(), sys.argv[2:], only=USES[sys.argv[1]].split())
    require(config, positive=("batch_size", "dpo_beta"), non_negative=("max_tokens", "block_size", "max_items"))
    if json_out:  # checked before the work, not after it
        check_output(json_out, "json_out")
    if sys.argv[1] == "plot":
        check_output(out, "out")
        check(os.path.splitext(out)[1] in (".png", ".pdf", ".svg"), f"out={out} needs a .png, .pdf or .svg name")
    report(COMMANDS[sys.argv[1]]())
