"""Preference tuning (DPO, IPO): the preference dataset, its batches, and the objective train.py optimises when a
dataset's meta.json says "format": "preference" (tokenize_data.py dpo makes one).

A pair is a prompt and two answers rendered with chat.py's template, the prompt tokenized once and shared:
    prompt    BOS <|user|> {prompt} <|end_of_turn|> <|assistant|>
    chosen    {answer} <|end_of_turn|>            rejected    {answer} <|end_of_turn|>
so prompt + chosen is exactly what SFT renders for that conversation. Per split, on disk (data/README.md):
    {split}.bin            prompt, chosen and rejected ids of every pair, concatenated
    {split}.offsets.bin    int64, 3n + 1 boundaries: pair i is [o[3i], o[3i+1]), [o[3i+1], o[3i+2]), [o[3i+2], o[3i+3])
    {split}.reference.bin  float32 (n, 2), optional: the reference model's log-probs of (chosen, rejected)

The loss (Rafailov et al., 2023): with log-probs summed over answer tokens only (prompt and padding targets are
IGNORE_INDEX and add exactly 0) and h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), per pair
    sigmoid   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      eps: label smoothing (conservative DPO)
    ipo       (h' - 1 / (2 beta))^2, h' from log-probs averaged per answer token (Azar et al., 2023; as TRL does)
plus sft_weight x the chosen answer's mean next-token loss (it counters the fall of both log-probs). The implicit
rewards are beta (log pi - log ref); a pair is ranked right when the chosen answer's reward is the higher one.
"""
import copy
import math
import os
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from chat import alpaca_messages, chat_ids, render_chat
from checkpoint import build_model, check_tokenizers, load_checkpoint
from configurator import require
from data import (DatasetUpdate, dataset_meta, load_meta, open_split, split_documents, to_device, token_dtype,
                  write_tokens)
from lora import adapters_off, base_fingerprint
from model import IGNORE_INDEX
from runtime import UsageError, check

LOSSES = ("sigmoid", "ipo")
STATS = ("reward_chosen", "reward_rejected", "margin", "acc", "logp_chosen", "logp_rejected")  # means over pairs


# ---- records -> token ids ----------------------------------------------------------------------------

def answer_text(a):
    """An answer: a string, or a list holding one assistant message."""
    if isinstance(a, str):
        return a
    if isinstance(a, list) and len(a) == 1 and isinstance(a[0], dict) and a[0].get("role") == "assistant" \
            and isinstance(a[0].get("content"), str):
        return a[0]["content"]
    raise UsageError(f"an answer must be a string or a list of one assistant message, got {str(a)[:60]!r}")


def record_pair(r):
    """(prompt messages, chosen text, rejected text) of a record: {prompt, chosen, rejected} (a prompt string or chat
    messages; answers as strings or one assistant message), two whole conversations {chosen, rejected} that differ
    only in their last message, or Alpaca's {instruction, input, chosen, rejected} (its prompt, as sft renders it)."""
    if not isinstance(r, dict) or "chosen" not in r or "rejected" not in r:
        raise UsageError(f"needs 'chosen' and 'rejected' fields (it has {sorted(r) if isinstance(r, dict) else r!r})")
    chosen, rejected, prompt = r["chosen"], r["rejected"], r.get("prompt")
    if prompt is None and isinstance(r.get("instruction"), str):
        return (alpaca_messages({**r, "output": ""})[:1], *(answer_text(a).strip() for a in (chosen, rejected)))
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1
                and chosen[:-1] == rejected[:-1]):
            raise UsageError("has no 'prompt', and its 'chosen' and 'rejected' are not two conversations that share "
                             "all but their last message")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise UsageError(f"'prompt' must be a string or a list of chat messages, got {str(prompt)[:60]!r}")
    return prompt, answer_text(chosen), answer_text(rejected)


def render_pair(tok, prompt, chosen, rejected):
    """(prompt ids, chosen ids, rejected ids). Each answer is rendered in its whole conversation, exactly as SFT
    renders it, and cut after the prompt's ids (chat.py renders message by message, so they are its prefix)."""
    p = render_chat(tok, prompt, add_generation_prompt=True)[0]
    out = [p]
    for a in (chosen, rejected):
        ids = render_chat(tok, prompt + [{"role": "assistant", "content": a}])[0]
        assert ids[:len(p)] == p and ids[-1] == chat_ids(tok)[2]
        out.append(ids[len(p):])
    return tuple(out)


def preference_pairs(tok, records, block_size, where="source"):
    """[(prompt, chosen, rejected) ids, or None for a dropped pair] in record order, and the counts of the pairs
    dropped (by why) and of those kept but cut ("truncated"). A row (prompt + one answer) keeps at most
    block_size + 1 tokens: the prompt is never cut, the answers are cut at their end. A pair is dropped when its
    answers are identical, when its prompt leaves no room for an answer token, or when its cut answers are
    identical."""
    out, counts = [], {"identical": 0, "prompt_too_long": 0, "identical_after_cut": 0, "truncated": 0}
    for n, r in records:
        try:
            p, c, rj = render_pair(tok, *record_pair(r))
        except (UsageError, ValueError, AttributeError, TypeError, KeyError) as e:
            raise UsageError(f"{where} line {n} {e}; fix that record")
        room = block_size + 1 - len(p)
        cut = max(len(c), len(rj)) > room
        why = ("identical" if c == rj else "prompt_too_long" if room < 1 else
               "identical_after_cut" if c[:room] == rj[:room] else "truncated" if cut else None)
        if why:
            counts[why] += 1
        out.append(None if why not in (None, "truncated") else (p, c[:room], rj[:room]))
    return out, counts


# ---- the dataset: write, read, batch ---------------------------------------------------------------------------

def flatten(pairs):
    """(all ids, 3n + 1 offsets) of a list of (prompt, chosen, rejected) id lists."""
    parts = [part for trio in pairs for part in trio]
    return np.array([t for part in parts for t in part], dtype=np.int64), np.cumsum([0] + [len(q) for q in parts])


def write_preference(update, tok, splits, block_size, references=None, **extra):
    """Stage every split {name: [(prompt, chosen, rejected)]} (and its reference log-probs (n, 2), if given) in a
    DatasetUpdate and commit it with meta.json "format": "preference"; returns the meta dict."""
    dt, info = token_dtype(tok.vocab_size), {}
    for name, pairs in splits.items():
        ids, offsets = flatten(pairs)
        write_tokens(update.path(f"{name}.bin"), [ids], dt)
        write_tokens(update.path(f"{name}.offsets.bin"), [offsets], np.int64)
        info[name] = {"file": f"{name}.bin", "offsets": f"{name}.offsets.bin", "pairs": len(pairs),
                      "tokens": len(ids), "max_row_tokens": max(len(p) + max(len(c), len(r)) for p, c, r in pairs)}
        if references:
            write_tokens(update.path(f"{name}.reference.bin"), [references[name]], np.float32)
            info[name]["reference"] = f"{name}.reference.bin"
    meta = dataset_meta(tok.to_meta(), tok.vocab_size, dt, tok.bos_id, tok.eos_id, info, format="preference",
                        task="preference", block_size=block_size, **extra)
    update.commit(meta)
    return meta


def prepare(folder, tok, records, source, block_size, val_fraction, seed, ref=None, ref_path="", say=print):
    """tokenize_data.py dpo: records [(line, record)] -> the preference dataset in folder, split by record before any
    pair is dropped (so the same records split as sft splits them); ref (a loaded checkpoint) stores its log-probs of
    every pair beside them. say() gets the progress lines; returns the meta dict."""
    check(len(records) >= 2, f"{source} holds {len(records)} record(s); need at least 2 (train and val)")
    pairs, counts = preference_pairs(tok, records, block_size, source)
    truncated = counts.pop("truncated")
    splits = {name: [pairs[i] for i in idx if pairs[i]]
              for name, idx in zip(("train", "val"), split_documents(len(records), val_fraction, seed))}
    for name, kept in splits.items():
        check(kept, f"no {name} pair is left once {counts} are dropped; fix the data or raise --block_size")
    say(f"{len(records):,} records from {source}: dropped {counts}, cut {truncated:,} pair(s) to block_size + 1 = "
        f"{block_size + 1} tokens; split {len(splits['train']):,} train / {len(splits['val']):,} val pairs")
    refs, extra = None, {}
    if ref is not None:
        check_tokenizers(ref.get("tokenizer"), tok.to_meta(), f"--reference={ref_path} and the data's tokenizer",
                         "pass the reference's own tokenizer (--tokenizer=its ckpt.pt)")
        model = build_model(ref).eval()
        check(block_size <= model.args.max_seq_len, f"block_size={block_size} exceeds the reference's context "
                                                    f"{model.args.max_seq_len}; lower --block_size")
        t0 = time.time()
        refs = {name: precompute_reference(model, kept, pad_id=tok.eos_id) for name, kept in splits.items()}
        extra = {"reference": {"checkpoint": os.path.abspath(ref_path), "fingerprint": base_fingerprint(model)}}
        say(f"reference log-probs of {ref_path} computed in {time.time() - t0:.1f} s")
    with DatasetUpdate(folder) as up:
        meta = write_preference(up, tok, splits, block_size, refs, dropped=counts, truncated=truncated,
                                val_fraction=val_fraction, seed=seed, source=os.path.abspath(source), **extra)
    for name, info in meta["splits"].items():
        say(f"  {name}: {info['pairs']:,} pairs, {info['tokens']:,} tokens, longest row {info['max_row_tokens']}")
    say(f"wrote {up.dir / 'meta.json'}")
    return meta


def pair_batch(tokens, offsets, indices, pad_id=0):
    """Inputs x and targets y (int64, 2B x T) of the pairs at indices: a row prompt + chosen for each pair, then a
    row prompt + rejected for each, right-padded to the longest row (T = its length - 1). y is the next token where
    that is an answer token (the first one is predicted from the prompt's last token), else IGNORE_INDEX: prompt
    and padding positions never count."""
    rows = []
    for k in (1, 2):
        for i in indices:
            o = offsets[3 * i:3 * i + 4]
            pair = np.asarray(tokens[o[0]:o[3]], dtype=np.int64)
            rows.append((pair[:o[1] - o[0]], pair[o[k] - o[0]:o[k + 1] - o[0]]))
    T = max(len(p) + len(a) for p, a in rows) - 1
    x = np.full((len(rows), T), pad_id, dtype=np.int64)
    y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    for r, (p, a) in enumerate(rows):
        ids = np.concatenate([p, a])
        x[r, :len(ids) - 1] = ids[:-1]
        y[r, len(p) - 1:len(ids) - 1] = a
    return x, y


def is_preference(data_dir):
    return load_meta(data_dir).get("format") == "preference"


class Targets(NamedTuple):
    """What a preference batch has in place of SFT's targets: the targets (2B, T) and the stored reference
    log-probs (B, 2: chosen, rejected), or None where the reference runs as the policy trains."""
    targets: object
    reference: object


class PreferenceBatches:
    """A preference dataset with data.Batches' interface (size, get, sft_notes), so train.py's loop takes it as it
    is: positions are pair indices, and a batch of B pairs is (x, Targets) of 2B rows."""
    sft = False

    def __init__(self, data_dir, block_size):
        self.dir, self.block_size, self.meta = Path(data_dir), block_size, load_meta(data_dir)
        self.pad_id, self.tokens, self.offsets, self.reference = self.meta.get("eos_id") or 0, {}, {}, {}
        fix = f"re-run python tokenize_data.py dpo --dataset={self.dir.name}"
        for s in ("train", "val"):
            self.tokens[s] = open_split(data_dir, s)
            info = self.meta["splits"][s]
            names = [info.get("offsets", "?")] + ([info["reference"]] if "reference" in info else [])
            check(all((self.dir / n).is_file() for n in names), f"{self.dir}/{s}.* files are missing; {fix}")
            off = np.fromfile(self.dir / info["offsets"], dtype=np.int64)
            check(len(off) == 3 * info.get("pairs", -1) + 1 and off[-1] == len(self.tokens[s]),
                  f"{self.dir}/{s}.* files disagree with meta.json; {fix}")
            self.offsets[s] = off
            self.reference[s] = (np.fromfile(self.dir / info["reference"], dtype=np.float32).reshape(-1, 2)
                                 if "reference" in info else None)
            check(self.reference[s] is None or len(self.reference[s]) == info["pairs"],
                  f"{self.dir}/{s}.reference.bin does not hold one log-prob pair per pair; {fix}")
        longest = max(self.meta["splits"][s].get("max_row_tokens", 0) for s in ("train", "val"))
        check(longest <= block_size + 1, f"{self.dir} holds rows (prompt + answer) of up to {longest} tokens, more "
              f"than block_size + 1 = {block_size + 1}; raise block_size to {longest - 1}, or {fix} "
              f"--block_size={block_size}")

    def size(self, split):
        return len(self.offsets[split]) // 3

    def get(self, split, positions, device=None):
        x, y = pair_batch(self.tokens[split], self.offsets[split], positions, self.pad_id)
        ref = self.reference[split][positions] if self.reference[split] is not None else None
        if device is not None:
            x, y, *rest = to_device(device, x, y, *([] if ref is None else [ref]))
            ref = rest[0] if rest else None
        return x, Targets(y, ref)

    def sft_notes(self):
        m, dropped = self.meta, self.meta.get("dropped", {})
        ref = m.get("reference")
        return [f"DPO: {self.size('train'):,} train and {self.size('val'):,} val preference pairs (a batch is "
                f"2 x batch_size rows); tokenize_data.py dropped {sum(dropped.values()):,} ({dropped}) and cut "
                f"{m.get('truncated', 0):,} at block_size={m.get('block_size')}; reference log-probs "
                + (f"stored, of {ref['checkpoint']}" if ref else "computed as the run goes")]

    def classify_examples(self, split, n):
        return []


# ---- the loss --------------------------------------------------------------------------------------------------

def check_settings(config):
    """train.py's DPO settings, checked before any work."""
    require(config, positive=("dpo_beta",), non_negative=("dpo_sft_weight",))
    check(config["dpo_loss"] in LOSSES, f"dpo_loss={config['dpo_loss']!r} is not one of {', '.join(LOSSES)}")
    check(0 <= config["dpo_label_smoothing"] < 0.5, f"dpo_label_smoothing={config['dpo_label_smoothing']} must be "
          f"in [0, 0.5): the fraction of pairs taken to be mislabelled")
    check(config["dpo_loss"] == "sigmoid" or not config["dpo_label_smoothing"],
          "dpo_label_smoothing applies to dpo_loss='sigmoid' only; drop it or use the sigmoid loss")


def sequence_logps(model, x, targets, loss_chunk=0):
    """(each row's answer log-prob, summed over its tokens; their number). model.py's own loss path with
    reduction="none" gives -log p(target) at every position, and exactly 0 where the target is IGNORE_INDEX."""
    _, nll = model(x, targets, reduction="none", loss_chunk=loss_chunk)
    return -nll.view(targets.shape).sum(-1), (targets != IGNORE_INDEX).sum(-1)


def as_pairs(rows):
    """(2B,) rows, chosen then rejected -> (B, 2) columns chosen, rejected."""
    return rows.view(2, -1).t()


@torch.no_grad()
def frozen_logps(model, x, targets, adapters=True):
    """The reference's answer log-probs (B, 2): model in eval mode (no dropout) and without gradients; adapters=False
    switches a LoRA model's adapters off, so the reference is its base."""
    was = model.training
    model.eval()
    try:
        with nullcontext() if adapters else adapters_off(model):
            logp, _ = sequence_logps(model, x, targets)
    finally:
        model.train(was)
    return as_pairs(logp)


def preference_losses(logp, ref, n, beta=0.1, loss="sigmoid", label_smoothing=0.0, sft_weight=0.0):
    """Per-pair losses (B,) and rewards (B, 2) from the policy's and the reference's answer log-probs (B, 2: chosen,
    rejected) and the answers' token counts n (B, 2)."""
    delta = logp - ref
    if loss == "ipo":
        h = delta[:, 0] / n[:, 0] - delta[:, 1] / n[:, 1]
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        h = delta[:, 0] - delta[:, 1]
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if sft_weight:
        losses = losses - sft_weight * logp[:, 0] / n[:, 0]
    return losses, beta * delta.detach()


def pair_stats(logp, rewards):
    """(B, len(STATS)) per pair, in STATS' order."""
    margin = rewards[:, 0] - rewards[:, 1]
    return torch.stack([rewards[:, 0], rewards[:, 1], margin, (margin > 0).float(), logp[:, 0], logp[:, 1]], 1)


def pair_metrics(logp, n, ref=None, beta=0.1, loss="sigmoid", label_smoothing=0.0, sft_weight=0.0):
    """Over all pairs, each counting once: logp_acc (how often the model alone gives the chosen answer the higher
    log-prob; _per_token: per answer token), ppl of the chosen answers, both log-probs, and with a reference the
    loss, the rewards, their margin and acc (how often the chosen answer's reward is the higher)."""
    logp, n = logp.double(), n.double()
    out = {"pairs": len(logp), "logp_acc": (logp[:, 0] > logp[:, 1]).double().mean().item(),
           "logp_acc_per_token": (logp[:, 0] / n[:, 0] > logp[:, 1] / n[:, 1]).double().mean().item(),
           "ppl": math.exp(min(-logp[:, 0].sum().item() / n[:, 0].sum().item(), 50.0)),
           "logp_chosen": logp[:, 0].mean().item(), "logp_rejected": logp[:, 1].mean().item()}
    if ref is not None:
        losses, rewards = preference_losses(logp, ref.double(), n, beta, loss, label_smoothing, sft_weight)
        out = {"loss": losses.mean().item(), **out,
               **{k: v.item() for k, v in zip(STATS, pair_stats(logp, rewards).mean(0))}}
    return out


@torch.no_grad()
def score_pairs(model, batches, reference=None):
    """(policy log-probs (N, 2), answer token counts (N, 2), reference log-probs (N, 2) or None) over an iterable of
    (x, Targets) batches: those of reference(x, targets) if given, else those the batches carry."""
    logps, counts, refs = [], [], []
    for x, y in batches:
        logp, n = sequence_logps(model, x, y.targets)
        logps.append(as_pairs(logp))
        counts.append(as_pairs(n))
        refs.append(reference(x, y.targets) if reference is not None else y.reference)
    ref = torch.cat(refs) if all(r is not None for r in refs) else None
    return torch.cat(logps), torch.cat(counts), ref


class DPO:
    """The preference objective: loss() of a micro-batch summed over its pairs (train.py divides by the pairs of the
    whole step, which pairs() counts), evaluate() over fixed batches, and a log window of STATS that a checkpoint
    carries (state()), so a resumed run logs the same lines as one never stopped."""

    def __init__(self, reference, beta=0.1, loss="sigmoid", label_smoothing=0.0, sft_weight=0.0, record=None,
                 device="cpu"):
        self.reference = reference  # (x, targets) -> (B, 2) log-probs; None: every batch carries them
        self.settings = (beta, loss, label_smoothing, sft_weight)
        self.record = record or {}  # which weights the reference is: saved with each checkpoint
        self.window = torch.zeros(1 + len(STATS), device=device)  # pairs, then the sum of each of STATS

    def pairs(self, y):
        return torch.tensor(len(y.targets) // 2, device=y.targets.device)

    def loss(self, model, x, y, loss_chunk=0):
        ref = y.reference if y.reference is not None else self.reference(x, y.targets)
        logp, n = sequence_logps(model, x, y.targets, loss_chunk)
        logp, n = as_pairs(logp), as_pairs(n)
        losses, rewards = preference_losses(logp, ref, n, *self.settings)
        stats = pair_stats(logp.detach(), rewards).sum(0)
        self.window += torch.cat([stats.new_tensor([len(logp)]), stats])
        return losses.sum()

    def evaluate(self, model, batches):
        return pair_metrics(*score_pairs(model, batches, self.reference), *self.settings)

    def log_window(self):
        """The means of STATS since the last call (one host sync), and a new window."""
        n, *sums = self.window.tolist()
        self.window.zero_()
        return {k: s / n for k, s in zip(STATS, sums)} if n else {}

    def state(self):
        return {"dpo": {"reference": self.record, "window": self.window.tolist()}}


def progress_text(stats):
    """The DPO part of train.py's progress line ("" for other objectives)."""
    return f" margin {stats['margin']:.3f} acc {stats['acc']:.2f}" if stats else ""


def eval_text(scores):
    return (f"val pref acc {scores['val_acc']:.3f}, margin {scores['val_margin']:.3f} (rewards chosen "
            f"{scores['val_reward_chosen']:.3f}, rejected {scores['val_reward_rejected']:.3f}), val log-probs chosen "
            f"{scores['val_logp_chosen']:.2f}, rejected {scores['val_logp_rejected']:.2f}")


def objective(batches, model, config, resumed, device):
    """train.py's DPO objective for a preference dataset (None for other data). The reference is the frozen starting
    checkpoint: its log-probs stored with the data when they are that checkpoint's; else, with LoRA, the same model
    with its adapters switched off (one model in memory); else a frozen copy of the starting weights, re-read from
    the starting checkpoint (checked by fingerprint) when the run resumes."""
    if not isinstance(batches, PreferenceBatches):
        return None
    check(config["init_from"] != "scratch", "DPO tunes a trained (e.g. SFT) model against itself: set init_from to "
                                            "that checkpoint")
    saved = (resumed or {}).get("dpo")
    record = saved["reference"] if saved else {"checkpoint": os.path.abspath(config["init_from"]),
                                               "fingerprint": base_fingerprint(model)}
    stored = batches.meta.get("reference")
    if stored and all(r is not None for r in batches.reference.values()):
        check(stored["fingerprint"] == record["fingerprint"], f"{batches.dir} stores the reference log-probs of "
              f"{stored['checkpoint']}, other weights than this run's start {record['checkpoint']}; re-run "
              f"python tokenize_data.py dpo with --reference={record['checkpoint']}, or without --reference")
        reference = None
    elif config["lora_rank"]:
        reference = partial(frozen_logps, model, adapters=False)
    else:
        ref_model = build_model(load_checkpoint(record["checkpoint"])) if saved else copy.deepcopy(model)
        check(base_fingerprint(ref_model) == record["fingerprint"], f"{record['checkpoint']}, this run's DPO "
              f"reference, changed since the run started; put it back, or start a new run from {config['out_dir']}")
        reference = partial(frozen_logps, ref_model.requires_grad_(False).to(device))
    obj = DPO(reference, config["dpo_beta"], config["dpo_loss"], config["dpo_label_smoothing"],
              config["dpo_sft_weight"], record, device)
    if saved:
        obj.window = torch.tensor(saved["window"], device=device)
    return obj


@torch.no_grad()
def precompute_reference(model, pairs, batch_size=16, pad_id=0):
    """(n, 2) float32 log-probs of (chosen, rejected) under model, computed as train.py computes them."""
    ids, offsets = flatten(pairs)
    out = [frozen_logps(model, *map(torch.from_numpy, pair_batch(ids, offsets, range(a, min(a + batch_size,
                                                                                               len(pairs))), pad_id)))
           for a in range(0, len(pairs), batch_size)]
    return torch.cat(out).float().numpy()
