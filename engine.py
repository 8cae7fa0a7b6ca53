"""Text in, text out: the one generation engine that generate.py, train.py's samples and serve.py share.

Requests are decoded together (continuous batching, as vLLM and llama.cpp's server do): every request owns a row
of one pre-allocated KV-cache pool and its own position; a new request is prefilled into a free row between two
decode steps and joins the batch at the next one; a finished request leaves at once, and the last active row is
copied into its slot, so the active rows are always the first b rows of the pool and one decode step serves
them all. Each request samples with its own settings and its own torch.Generator, so what it gets does not depend
on what else is in the batch. A script calls Engine.run(requests) in its own thread; a server calls start() once,
then submit() from any thread, and the engine's thread alone touches the model.
"""
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, KVCache, check_sampling, sample_next, token_logprobs
from runtime import GREEDY_BELOW, UsageError


def end_ids(tok):
    """The ids that end a document: EOS, and BOS too. llama2.c's data separates documents by BOS alone (its models
    end a story by starting the next one, where run.c stops), ours starts every document with BOS: either way a
    BOS in generated text is the start of another document, never part of this one."""
    return sorted({tok.eos_id, tok.bos_id} - {None})


class StopText:
    """Cuts generated text at the first of some stop strings. Text whose end could still grow into a stop string
    is held back until the next piece rules that out, so nothing of a stop string is ever shown."""

    def __init__(self, stops=()):
        self.stops, self.held = [s for s in stops if s], ""

    def add(self, text):
        """(the text that is now safe to show, whether a stop string was reached)"""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False


class Request:
    """One generation: prompt ids (BOS included if wanted) in; tokens, text and finish_reason out. The engine's
    thread calls on_text(new text) as text becomes final and on_done(request) once at the end; the fields are
    complete when on_done runs. stop_ids end the text without being part of it (EOS, <|end_of_turn|>); stop are
    strings that do the same. logprobs=n records each new token's log-prob and the n most likely alternatives;
    prompt_logprobs the same for every prompt token after the first (scoring, as lm-evaluation-harness does).
    finish_reason: "stop" (a stop id or string), "length" (max_new_tokens or the context's end), "cancelled"
    or "error" (then error holds the reason). The callbacks run inside the engine's step: they must not run the
    engine's model (its KV cache is attached mid-step)."""

    def __init__(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, generator=None,
                 stop_ids=(), stop=(), logprobs=None, prompt_logprobs=False, on_text=None, on_done=None):
        self.ids, self.max_new_tokens = [int(i) for i in ids], max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed, self.generator = seed, generator
        self.stop_ids, self.stop = set(stop_ids), list(stop)
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.on_text, self.on_done = on_text, on_done
        self.tokens, self.token_logprobs, self.prompt_lps = [], [], None  # logprob entries: (lp, [(id, lp), ...])
        self.text, self.finish_reason, self.error = "", None, None
        self.cancelled = False  # set from any thread; the engine drops the request before its next step
        self.t_submit = self.t_first = self.t_done = None

    def completion_ids(self):
        """The new tokens that belong to the text: without the stop id that ended it."""
        stopped = self.tokens and self.tokens[-1] in self.stop_ids
        return self.tokens[:-1] if stopped else list(self.tokens)


class Engine:
    """max_batch requests decode together; up to queue_size more wait (submit refuses beyond that). decode_step: a
    compiled model.decode_step to use instead of the model's own (the caller compiles); it returns the logits (B, 1,
    V), or the pair (logits, their argmax (B,)) when it computes the greedy ids itself (torch's argmax over a 32000
    vocab costs ~28 us a token). A step with a decode_ids(token id, position) method (decode.CompiledDecoder) is
    called through it at batch 1: Python ints in, (logits (1, V), argmax id) out, no tensor op around it. autocast:
    the context the engine's thread runs in (a script's run() uses the caller's)."""

    def __init__(self, model, tok, max_batch=8, queue_size=64, decode_step=None, autocast=None):
        if max_batch < 1 or queue_size < 0:
            raise UsageError(f"max_batch={max_batch} must be >= 1 and queue_size={queue_size} >= 0")
        self.model, self.tok, self.max_batch, self.queue_size = model, tok, max_batch, queue_size
        self.step_fn, self.compiled = decode_step or model.decode_step, decode_step is not None
        self.decode_ids = getattr(decode_step, "decode_ids", None)
        self.autocast = autocast or nullcontext()
        self.device = model.norm.weight.device  # (a plain parameter even when the matrices are int8)
        self.waiting, self.active, self.admitting = deque(), [], None
        self.cond = threading.Condition()
        self.pool, self.views = None, {}
        self.first = model.layers[0].attention  # read every step: _attach sees what is attached in one lookup
        self.pos = [0] * max_batch  # each active row's next position
        self.thread, self.closed = None, False
        self.steps = self.rows = 0  # decode steps and rows decoded: rows / steps is the mean batch

    # ---- entry points

    def check(self, req):
        """UsageError unless the request can run: a non-empty prompt of known ids that fits the context."""
        L, V = self.model.args.max_seq_len, self.model.args.vocab_size
        if not req.ids:
            raise UsageError("the prompt is empty; give at least one token (e.g. BOS)")
        if len(req.ids) > L:
            raise UsageError(f"the prompt is {len(req.ids)} tokens but the model's context is {L}; shorten it")
        if not all(0 <= i < V for i in req.ids):
            raise UsageError(f"the prompt holds token ids outside the vocabulary [0, {V})")
        if req.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens={req.max_new_tokens} must be >= 0")
        try:
            check_sampling(req.temperature, req.top_k, req.top_p)
        except ValueError as e:
            raise UsageError(str(e))

    def submit(self, req):
        """Queue a request (from any thread); False when queue_size requests are already waiting."""
        self.check(req)
        with self.cond:
            if self.closed:
                raise UsageError("the engine is closed")
            if len(self.waiting) >= self.queue_size:
                return False
            req.t_submit = time.time()
            self.waiting.append(req)
            self.cond.notify()
        return True

    @torch.no_grad()
    def run(self, requests):
        """Decode requests to their end in the calling thread (scripts); returns them. The model's layers get
        their caches back to None afterwards, so a training step can follow."""
        for r in requests:
            self.check(r)
            r.t_submit = time.time()
        self.waiting.extend(requests)
        try:
            with self.autocast:
                while any(r.finish_reason is None for r in requests):
                    self.step()
        finally:
            self.model.clear_cache()
        return requests

    def start(self):
        """Serve submitted requests from a thread of the engine's own until close()."""
        self.thread = threading.Thread(target=self._serve, name="engine", daemon=True)
        self.thread.start()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def _serve(self):
        with torch.no_grad(), self.autocast:
            while True:
                with self.cond:
                    while not (self.waiting or self.active or self.closed):
                        self.cond.wait()
                    if self.closed:
                        break
                try:
                    self.step()
                except Exception as e:  # a bug or out of memory: fail the requests in flight, serve the next ones
                    traceback.print_exc(file=sys.stderr)
                    for r in self.active + [self.admitting]:
                        if r is not None and r.finish_reason is None:
                            self._finish(r, "error", f"{type(e).__name__}: {e}")
                    self.active, self.admitting = [], None
        self.model.clear_cache()

    # ---- one step: admit, decode, retire

    def step(self):
        """Drop cancelled requests, prefill waiting ones into free rows, decode one token for every active row."""
        for r in self.active:
            if r.cancelled and r.finish_reason is None:
                self._finish(r, "cancelled")
        self._retire()
        self._admit()
        if self.active:
            self._decode()
            self._retire()

    def _admit(self):
        while len(self.active) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    return
                req = self.admitting = self.waiting.popleft()
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            if not self.active:
                self._make_pool()
            self._prefill(req, len(self.active))
            if req.finish_reason is None:
                self.active.append(req)
            self.admitting = None

    def _make_pool(self):
        """The KV rows of every request, in the dtype attention computes in (autocast's, else the weights')."""
        kind = self.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.model.norm.weight.dtype
        if self.pool is None or self.pool[0].k.dtype != dtype:
            a = self.model.args
            self.pool = [KVCache(self.max_batch, a.max_seq_len, a.n_kv_heads, a.dim // a.n_heads, dtype, self.device)
                         for _ in self.model.layers]
            self.views = {}

    def _attach(self, start, stop):
        """Give every layer a cache over rows start:stop of the pool. The view objects are made once and reused:
        torch.compile guards on the modules it sees, and new ones every step would recompile the decode step."""
        if (start, stop) not in self.views:
            self.views[start, stop] = [KVCache(0, 0, 0, 0, None, None, k=c.k[start:stop], v=c.v[start:stop])
                                       for c in self.pool]
        views = self.views[start, stop]
        if self.first.cache is views[0]:  # attached already (every decode step of one batch)
            return
        for layer, cache in zip(self.model.layers, views):
            layer.attention.cache = cache

    def _prefill(self, req, row):
        req.decoder, req.stop_text = self.tok.stream(req.ids[-1]), StopText(req.stop)
        if req.seed is not None and req.generator is None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.seed)
        # the last generated token is never fed back, so it needs no cache slot: a prompt of T tokens leaves room
        # for L - T + 1 new ones, each predicted from at most L tokens
        req.limit = min(req.max_new_tokens, self.model.args.max_seq_len - len(req.ids) + 1)
        self._attach(row, row + 1)
        x = torch.tensor([req.ids], dtype=torch.long, device=self.device)
        if req.prompt_logprobs:  # every position's logits (targets all ignored: no loss is wanted, just the logits)
            logits, _ = self.model(x, torch.full_like(x, IGNORE_INDEX), reduction="sum")
            req.prompt_lps = self._logprobs(logits[0, :-1], x[0, 1:], req.logprobs or 0)
        else:
            logits, _ = self.model(x)
        self.pos[row] = len(req.ids)
        if req.limit == 0:
            return self._finish(req, "length")
        self._sample([req], logits[:, -1])

    def _decode(self):
        b = len(self.active)
        self._attach(0, b)
        if self.decode_ids is not None and b == 1:
            logits, best = self.decode_ids(self.active[0].tokens[-1], self.pos[0])
            best = [best]
        else:  # tokens and positions in one tensor (one copy to the device), each a contiguous row of it
            both = torch.tensor([[r.tokens[-1] for r in self.active], self.pos[:b]], device=self.device)
            logits = self.step_fn(both[0][:, None], both[1])
            logits, best = logits if isinstance(logits, tuple) else (logits, None)
            logits = logits[:, -1]
            if self.compiled and logits.is_cuda:
                logits = logits.clone()  # a replayed CUDA graph reuses its output buffer
        for i in range(b):
            self.pos[i] += 1
        self.steps, self.rows = self.steps + 1, self.rows + b
        self._sample(self.active, logits, best)

    def _sample(self, reqs, logits, best=None):
        """One new token for each request from its row of logits (B, V), each with its own settings and generator;
        best: the rows' argmax (a tensor or a list), if the decode step computed it."""
        ids = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.temperature < GREEDY_BELOW]
        if greedy:  # as sample_next does at temperature 0, for all greedy rows at once
            best = logits.argmax(-1) if best is None else best
            best = best if isinstance(best, list) else best.tolist()
            for i in greedy:
                ids[i] = best[i]
        for i, r in enumerate(reqs):
            if ids[i] is None:
                try:
                    ids[i] = int(sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)[0])
                except RuntimeError as e:  # e.g. a generator on another device: this request fails, not the batch
                    self._finish(r, "error", f"sampling failed: {e}")
        scored = [i for i, r in enumerate(reqs) if r.logprobs is not None and ids[i] is not None]
        lps = self._logprobs(logits[scored], torch.tensor([ids[i] for i in scored], device=logits.device),
                             max(reqs[i].logprobs for i in scored)) if scored else []
        for i, lp in zip(scored, lps):
            reqs[i].token_logprobs.append((lp[0], lp[1][:reqs[i].logprobs]))
        for r, t in zip(reqs, ids):
            if t is not None:
                self._emit(r, t)

    @staticmethod
    def _logprobs(logits, targets, n):
        """[(log p(target), [(id, log p) of the n most likely ids])] for each row: the model's own distribution,
        before temperature or top-k/top-p, as OpenAI's API reports it."""
        logp = F.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(-1, targets[:, None])[:, 0].tolist()
        top = logp.topk(min(n, logp.shape[-1]), dim=-1) if n else None  # a toy vocab may hold fewer than n
        alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())] if n else [[]] * len(chosen)
        return list(zip(chosen, alts))

    def _emit(self, r, token):
        r.tokens.append(token)
        if r.t_first is None:
            r.t_first = time.time()
        if token in r.stop_ids:
            return self._finish(r, "stop")
        text, hit = r.stop_text.add(r.decoder.add(token))
        self._show(r, text)
        if hit:
            return self._finish(r, "stop", flush=False)  # the rest of the text is the stop string and beyond
        if len(r.tokens) >= r.limit:
            self._finish(r, "length")

    def _show(self, r, text):
        if text:
            r.text += text
            if r.on_text is not None:
                r.on_text(text)

    def _finish(self, r, reason, error=None, flush=True):
        if flush and hasattr(r, "decoder"):  # held-back text that never became a stop string, an unfinished character
            text, hit = r.stop_text.add(r.decoder.flush())
            self._show(r, text if hit else text + r.stop_text.held)
        r.finish_reason, r.error, r.t_done = reason, error, time.time()
        if r.on_done is not None:
            r.on_done(r)

    def _retire(self):
        """Remove finished rows; the last active row moves into each freed one, so the active rows stay pool[:b]."""
        for row in reversed(range(len(self.active))):
            if self.active[row].finish_reason is None:
                continue
            last = len(self.active) - 1
            if row != last:
                n = self.pos[last]
                for c in self.pool:
                    c.k[row, :, :n] = c.k[last, :, :n]
                    c.v[row, :, :n] = c.v[last, :, :n]
                self.pos[row] = self.pos[last]
                self.active[row] = self.active[last]
            self.active.pop()


def complete(model, tok, prompt, max_new_tokens, temperature=0.8, top_k=None, top_p=None, generator=None,
             stop_ids=None):
    """The text the model writes after prompt, up to max_new_tokens or a stop id (default: the tokenizer's
    EOS). The prompt is encoded with BOS and cut from the left to leave room for at least one new token; the
    answer is decoded in context, so its first space survives."""
    ids = tok.encode(prompt, bos=True)[-(model.args.max_seq_len - 1):]
    stops = end_ids(tok) if stop_ids is None else list(stop_ids)
    req = Request(ids, max_new_tokens, temperature, top_k, top_p, generator=generator, stop_ids=stops)
    Engine(model, tok, max_batch=1).run([req])
    return req.text


@torch.no_grad()
def continuation_logprobs(model, context_ids, continuation_ids_list):
    """[(sum of log p(continuation tokens | context), number of continuation tokens)] for each
    continuation, all in one batch. When context + continuation exceeds the model's context, the
    context loses tokens from its left (the end, nearest the continuation, matters most); a
    continuation longer than the whole context keeps only its first max_seq_len tokens."""
    L = model.args.max_seq_len
    conts = [list(c)[:L] for c in continuation_ids_list]
    if any(len(c) == 0 for c in conts):
        raise UsageError("an empty continuation has no tokens to score")
    keep = max(1, L + 1 - max(len(c) for c in conts))  # the last token is only a target, never an input
    context_ids = list(context_ids)[-keep:]
    if not context_ids:
        raise UsageError("the context must hold at least one token (e.g. BOS) to predict the first continuation token")
    rows = [context_ids + c for c in conts]
    T = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)  # right padding: causal attention never looks at it
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (r, c) in enumerate(zip(rows, conts)):
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
        y[i, len(context_ids) - 1:len(r) - 1] = torch.tensor(c)  # targets only where a continuation token is predicted
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else "cpu"
    logits, _ = model(x.to(device), y.to(device), reduction="sum")
    logp = token_logprobs(logits, y.to(device)).double()
    return [(float(s), len(c)) for s, c in zip(logp.sum(-1).tolist(), conts)]


@torch.no_grad()
def predict_labels(model, tok, texts, labels):
    """The label a classifier gives each text, constrained to the label set: every label's answer (its tokens and
    <|end_of_turn|>, rendered exactly as training rendered it) is scored by its summed log-prob after chat.py's
    classification prompt, and the best one wins, so the model can only ever answer with a label."""
    from chat import classification_messages, render_chat
    out = []
    for text in texts:
        prompt = render_chat(tok, classification_messages(text, labels), add_generation_prompt=True)[0]
        answers = [render_chat(tok, classification_messages(text, labels, lab))[0][len(prompt):] for lab in labels]
        scores = continuation_logprobs(model, prompt, answers)
        out.append(labels[max(range(len(labels)), key=lambda i: scores[i][0])])
    return out
