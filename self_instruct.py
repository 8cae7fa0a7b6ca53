"""Synthetic instruction data the Self-Instruct way (Wang et al. 2022), as Alpaca JSONL for the SFT path:

    python self_instruct.py --api_base=http://127.0.0.1:8000/v1 --num_tasks=500   # any OpenAI-compatible server
    python self_instruct.py --checkpoint=out/sft_alpaca --num_tasks=50           # or one of our checkpoints
    python tokenize_data.py sft --source=data/self_instruct.jsonl --dataset=si --tokenizer=out/demo/ckpt.pt
"""
import sys

seed_tasks = "../shared/data/self_instruct/seed_tasks.jsonl"  # JSONL of {instruction, instances, is_classification}
out = "data/self_instruct.jsonl"  # Alpaca JSONL output, appended to; a restart continues it, never duplicating
num_tasks = 100                 # stop when `out` holds this many tasks (instructions, each with 1..max_instances lines)
domain_file = ""                # domain text for every prompt: .txt (blank-line-separated documents) or .jsonl ("text")
domain_max_chars = 2000         # cut each domain document to this many characters, so prompts stay short
seed = 42                       # seeds which instructions each prompt lists (mixed with the task count already in out)
max_idle_rounds = 10            # give up after this many rounds in a row without a new task (the generator repeats)
# the generator: one of our checkpoints, or an OpenAI-compatible server's POST {api_base}/completions
checkpoint = ""                 # our ckpt.pt or run folder (or a llama2.c .bin / HF folder) to generate with locally
adapter = ""                    # a LoRA run's ckpt.pt applied on top of checkpoint
tokenizer = ""                  # override the checkpoint's tokenizer (a .model, 'gpt2', a llama2.c tokenizer .bin)
prompt_style = "auto"           # local: 'chat' (chat.py's template), 'plain', 'auto' (chat if the vocab has its tokens)
device = "auto"                 # local: 'auto', 'cpu', 'cuda', ...
dtype = "auto"                  # local: 'auto', 'float32', 'bfloat16', 'float16'
api_base = ""                   # e.g. http://127.0.0.1:8000/v1 (our serve.py, llama.cpp's server, vLLM, a hosted API)
api_model = ""                  # the requests' "model" field; "" leaves it out (a one-model server uses its own)
api_key_env = "OPENAI_API_KEY"  # environment variable holding the API key, sent as a Bearer token when set
api_concurrency = 8             # requests in flight at once
api_retries = 5                 # attempts per request on connection errors, timeouts, 408, 429 and 5xx
api_backoff = 1.0               # seconds before the first retry, doubling after each (a Retry-After header wins)
api_timeout = 120.0             # seconds to wait for one response
# the recipe (defaults from the paper's code)
request_batch_size = 5          # instruction-generation prompts per round
num_prompt_instructions = 8     # instructions listed in each prompt
num_machine_instructions = 2    # of those, drawn from the machine-written tasks once there are any
max_tokens = 1024               # per instruction-generation reply
temperature = 0.7               # instruction generation (instances and the classification check are greedy)
top_p = 0.5                     # instruction generation
instance_max_tokens = 350       # per instance-generation reply
max_instances = 5               # instances kept per task
min_words = 4                   # drop instructions with fewer words
max_words = 150                 # drop instructions with more words
rouge_threshold = 0.7           # drop instructions whose ROUGE-L F1 with any pool instruction is above this
blacklist = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to",  # the paper's words, which a text-only model cannot act on; then Stanford Alpaca's
             "video", "audio", "music", "flowchart", "diagram")  # drop instructions holding any of these words
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()
from configurator import configure, print_config, require  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import string  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from http.client import HTTPException  # noqa: E402
from urllib.error import HTTPError  # noqa: E402
from urllib.request import Request, urlopen  # noqa: E402

import numpy as np  # noqa: E402
from rapidfuzz.distance import LCSseq  # noqa: E402
from rapidfuzz.process import cdist  # noqa: E402

from engine import end_ids  # noqa: E402
from runtime import UsageError, check, device_and_dtype  # noqa: E402

INPUT, OUTPUT = re.compile(r"Input\s*\d*\s*:"), re.compile(r"Output\s*\d*\s*:")
BLACKLIST = re.compile(r"\b(" + "|".join(map(re.escape, blacklist)) + r")\b", re.I) if blacklist else None


# ---- ROUGE-L, exactly as rouge_score's RougeScorer(["rougeL"], use_stemmer=False), but fast -------------
def rouge_tokens(text):
    """rouge_score's tokenizer, no stemming: lowercase (first: the Kelvin sign becomes k), non-a-z0-9 runs to spaces."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


class RougePool:
    """Instructions as strings of one character per distinct token, so that rapidfuzz's bit-parallel LCS (C++, all
    cores) scores them; F1 is then computed from the LCS length with rouge_score's own float formula."""

    def __init__(self, threshold):
        self.threshold, self.ids, self.texts, self.seqs = threshold, {}, set(), []

    def encode(self, text):
        ids = [self.ids.setdefault(t, len(self.ids)) for t in rouge_tokens(text)]
        return "".join(chr(i if i < 0xD800 else i + 0x800) for i in ids)  # skip the surrogates: not characters

    def add(self, texts):
        self.texts.update(texts)
        self.seqs += [self.encode(t) for t in texts]

    def similar_pairs(self, queries, choices):
        """{query index: [choice index, ...]} of the encoded pairs with F1 above the threshold t. F1 = 2 LCS / (m + n)
        <= 2 min(m, n) / (m + n): choices of a length outside (m t / (2 - t), m (2 - t) / t) are never scored."""
        t, hits, by_len = self.threshold, defaultdict(list), defaultdict(list)
        c_len = np.array([len(c) for c in choices], dtype=np.int64)
        order = np.argsort(c_len, kind="stable")
        sorted_len = c_len[order]
        for i, q in enumerate(queries):
            by_len[len(q)] += [i] if q else []  # no tokens: rouge_score gives 0 against anything
        for m, rows in by_len.items():
            lo, hi = max(1, int(m * t / (2 - t))), int(m * (2 - t) / t) + 1  # a little wide: the exact F1 decides
            cols = order[np.searchsorted(sorted_len, lo, "left"):np.searchsorted(sorted_len, hi, "right")]
            # F1 = 2 LCS / (m + n) up to rounding, so only LCS >= this gets rouge_score's own float formula
            least = np.maximum(1, np.floor(t * (m + c_len[cols]) / 2 - 1e-6)).astype(np.int32)[None, :]
            col_seqs = [choices[j] for j in cols]
            for k in range(0, len(rows), 1024):  # bounds the (rows x cols) matrix
                block = rows[k:k + 1024]
                lcs = cdist([queries[i] for i in block], col_seqs, scorer=LCSseq.similarity, dtype=np.int32, workers=-1)
                for r, c in zip(*np.nonzero(lcs >= least)):
                    common, n = int(lcs[r, c]), int(c_len[cols[c]])
                    precision, recall = common / n, common / m  # rouge_score: LCS / len(prediction), / len(target)
                    if 2 * precision * recall / (precision + recall) > t:
                        hits[block[r]].append(int(cols[c]))
        return hits

    def keep_novel(self, texts):
        """[bool]: keep a text unless its F1 with a pool instruction, or with a kept text before it, is above the
        threshold (the paper's one-at-a-time loop, batched); kept texts join the pool."""
        seqs = [self.encode(t) for t in texts]
        near_pool, near_batch = self.similar_pairs(seqs, self.seqs), self.similar_pairs(seqs, seqs)
        keep = []
        for i in range(len(texts)):
            keep.append(i not in near_pool and not any(j < i and keep[j] for j in near_batch.get(i, ())))
        self.add([t for t, k in zip(texts, keep) if k])
        return keep


# ---- files: seeds, domain text, the output (read back on a restart) ----------------------------------------
def read_text(path, what):
    try:  # a missing file is runtime's one-line error, naming the path
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8")


def json_lines(path, text, fix="fix or delete that line"):
    """[(line number, object)] of JSONL text, blank lines skipped; a bad line is an error naming it."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): it also cuts at \x85, \u2028, ...
        try:
            rows += [(n, json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n} is not valid JSON ({e.msg}); {fix}")
    return rows


def read_seed_tasks(path):
    tasks = []
    for n, t in json_lines(path, read_text(path, "seed_tasks")):
        ok = isinstance(t, dict) and isinstance(t.get("instruction"), str) and t["instruction"].strip() and \
            isinstance(t.get("is_classification"), bool) and isinstance(t.get("instances"), list) and \
            all(isinstance(i, dict) and {type(i.get("input")), type(i.get("output"))} == {str} for i in t["instances"])
        check(ok, f"{path} line {n} is not a seed task: it needs a non-empty string 'instruction', 'instances' "
                  f"(a list of {{input, output}} strings) and a true/false 'is_classification'; fix that line")
        tasks.append(t)
    check(tasks, f"{path} holds no seed tasks; add at least one line")
    return tasks


def read_domain(path):
    text = read_text(path, "domain_file")
    docs = [r.get("text") if isinstance(r, dict) else None for _, r in json_lines(path, text)] \
        if path.endswith(".jsonl") else re.split(r"\n\s*\n", text)
    docs = [d.strip()[:domain_max_chars] for d in docs if isinstance(d, str) and d.strip()]
    check(docs, f"domain_file {path} holds no documents; pass a .txt of paragraphs or a .jsonl with \"text\" fields")
    return docs


def read_done(f):
    """The instructions already in `out` (open "a+b"), in order, each once. Text after the last newline is what a
    kill mid-write leaves: it is cut off, so that appending continues on a clean line."""
    f.seek(0)
    data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        f.truncate(end)
        print(f"dropped a torn last line ({len(data) - end} bytes) from {out}: a run was killed while writing it",
              file=sys.stderr)
    rows = json_lines(out, data[:end].decode("utf-8"), "fix or delete that line, or pass another --out")
    bad = [n for n, r in rows if not (isinstance(r, dict) and isinstance(r.get("instruction"), str))]
    check(not bad, f"{out} line {bad and bad[0]} has no string 'instruction'; pass another --out, this is not ours")
    return list(dict.fromkeys(r["instruction"] for _, r in rows))


def append_task(f, instruction, instances):
    """A task's lines in one write, then fsync: a kill loses at most the task being written."""
    f.write("".join(json.dumps({"instruction": instruction, "input": i, "output": o}, ensure_ascii=False) + "\n"
                    for i, o in instances).encode())
    f.flush()
    os.fsync(f.fileno())


# ---- prompts, and the parsing of their replies ----------------------------------------------------------
def one_line(text):
    return " ".join(text.split())


def instruction_prompt(instructions, doc):
    head = (f"Here is a document from the domain the tasks should be about:\n{doc}\n\n"
            f"Come up with a series of tasks about this domain:\n") if doc else "Come up with a series of tasks:\n"
    listed = "".join(f"{k}. {one_line(s).rstrip(':')}\n" for k, s in enumerate(instructions, 1))
    return f"{head}{listed}{len(instructions) + 1}."


def classification_prompt(seeds, instruction):
    """Few-shot, with the seeds' own labels as the examples: up to 4 classification tasks and 4 others."""
    shots = [t for t in seeds if t["is_classification"]][:4] + [t for t in seeds if not t["is_classification"]][:4]
    body = "".join(f"Task: {one_line(t['instruction'])}\nClassification: {'Yes' if t['is_classification'] else 'No'}"
                   f"\n\n" for t in shots)
    return ("Tell whether each task is a classification task: one whose answer is a label from a small, finite set."
            f"\n\n{body}Task: {one_line(instruction)}\nClassification:")


def instance_prompt(seeds, instruction, classification, doc, rng):
    """Few-shot from seed tasks of the same kind. Classification: output-first (a label, then an input of that
    class), so that the model does not write inputs of one class only; otherwise input-first."""
    same = [t for t in seeds if t["is_classification"] == classification and t["instances"]]
    text = f"Background document (inputs may quote it):\n{doc}\n\n" if doc else ""
    text += "For each classification task, list its class labels, each followed by an input of that class.\n\n" \
        if classification else "Write examples for each task: an input if the task needs one, then the output.\n\n"
    for t in rng.sample(same, min(3, len(same))):
        text += f"Task: {one_line(t['instruction'])}\n"
        for k, inst in enumerate(t["instances"][:max_instances], 1):
            given = f"Input: {inst['input'].strip()}\n" if inst["input"].strip() else ""
            text += f"Class label: {inst['output'].strip()}\n{given}" if classification else \
                f"Example {k}\n{given}Output: {inst['output'].strip()}\n"
        text += "\n"
    return f"{text}Task: {one_line(instruction)}\n"


def parse_numbered(text):
    """A reply continues the prompt's numbered list: the first item needs no number, the next start a line 'N.'."""
    return [one_line(p) for p in re.split(r"\n\s*\d+\s?\.\s", "\n" + text) if p.strip()]


def parse_instances(text, classification):
    """[(input, output)]: 'Class label: X' then its input; or 'Example N' chunks (or one) of an optional 'Input:'
    and an 'Output:', the output ending at a following 'Input:'."""
    if classification:
        return [(INPUT.sub("", c.partition("\n")[2], count=1).strip(), c.partition("\n")[0].strip())
                for c in (c.strip() for c in text.split("Class label:")[1:])]
    chunks = [c for c in re.split(r"Example\s*\d+\.?", text) if c.strip()] if re.search(r"Example\s*\d+", text) \
        else [text] if OUTPUT.search(text) else []
    pairs = [OUTPUT.split(c, maxsplit=1) if OUTPUT.search(c) else ("", c) for c in chunks]
    return [(INPUT.sub("", given, count=1).strip(), INPUT.split(answer)[0].strip()) for given, answer in pairs]


def rule_violation(text):
    """The first rule a candidate instruction breaks (its count key), or None."""
    words = len(text.split())
    if words < min_words or words > max_words:
        return "too_short" if words < min_words else "too_long"
    if BLACKLIST and BLACKLIST.search(text):
        return "blacklisted"
    if text[0] in string.punctuation or not text[0].isascii():
        return "bad_start"
    # the paper: models bolt "write a program" onto other tasks, and then it is unclear what the answer should be
    return "write_a_program" if text.lower().startswith("write a program") else None


def clean_instances(pairs, finish, counts):
    """The instances worth keeping; none when the task is ambiguous (one input with different outputs)."""
    if finish == "length" and pairs:
        pairs = pairs[:-1]  # the last one was cut by the token limit
        counts["instance_cut_off"] += 1
    counts["empty_output"] += sum(not answer for _, answer in pairs)
    counts["input_equals_output"] += sum(bool(answer) and given == answer for given, answer in pairs)
    kept = [(given, answer) for given, answer in pairs if answer and given != answer]
    if len({given for given, _ in kept if given}) < len({pair for pair in kept if pair[0]}):
        counts["conflicting_outputs"] += 1
        return []
    unique = list(dict.fromkeys(kept))
    counts["duplicate_instance"] += len(kept) - len(unique)
    counts["over_max_instances"] += max(0, len(unique) - max_instances)
    counts["no_instances"] += not unique
    return unique[:max_instances]


# ---- generators: complete(prompts, max_tokens, temperature, top_p, stop) -> [(text, finish_reason)] -------
def api_completer():
    """POST {api_base}/completions (OpenAI's API, which serve.py, llama.cpp's server and vLLM speak), concurrently."""
    url, headers = api_base.rstrip("/") + "/completions", {"Content-Type": "application/json"}
    if os.environ.get(api_key_env or "-"):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    pool, given_up = ThreadPoolExecutor(api_concurrency), threading.Event()

    def post(prompt, params):
        body = json.dumps({**params, "prompt": prompt}).encode()
        wait, fix = 0.0, "start the server or fix --api_base"
        for attempt in range(1, api_retries + 1):
            if given_up.wait(min(wait, 60.0)):  # another request failed for good: the run ends with that error
                return "", "stop"
            wait = api_backoff * 2 ** (attempt - 1)
            try:
                with urlopen(Request(url, body, headers), timeout=api_timeout) as r:
                    choice = json.loads(r.read())["choices"][0]
                return choice["text"] or "", choice.get("finish_reason") or "stop"
            except HTTPError as e:
                problem = f"HTTP {e.code}: {one_line(e.read()[:300].decode(errors='replace')) or e.reason}"
                fix = {401: f"set {api_key_env} to the server's API key", 404: "check --api_base (it ends in /v1)",
                       429: "lower --api_concurrency or raise --api_backoff"}.get(
                    e.code, "see the server's log" if e.code >= 500 else "check --api_model and the sampling settings")
                if e.code not in (408, 429) and e.code < 500:  # the request itself is wrong: retrying cannot help
                    break
                wait = float(e.headers["Retry-After"]) if str(e.headers.get("Retry-After")).isdigit() else wait
            except (OSError, HTTPException) as e:  # refused, reset, timed out, cut short
                problem = str(getattr(e, "reason", None) or e) or type(e).__name__
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                problem, fix = f"not an OpenAI completions reply: {e!r}", "point --api_base at an OpenAI-compatible /v1"
                break
        given_up.set()  # now, before this thread takes the next request from the pool
        raise UsageError(f"no completion from {url} after {attempt} attempt{'s' * (attempt > 1)} ({problem}); {fix} "
                         f"(the tasks written so far stay in {out}; re-running continues them)")

    def complete(prompts, max_new, temp, p, stop):
        params = {"max_tokens": max_new, "temperature": temp, "top_p": p, "stop": list(stop),
                  **({"model": api_model} if api_model else {})}
        return list(pool.map(lambda prompt: post(prompt, params), prompts))  # raises the first failure
    return complete


def local_completer():
    """One of our checkpoints, through the generation engine: a call's prompts decode together, each ends at its
    stop ids and strings. A vocab with the chat tokens gets chat.py's template, unless prompt_style says plain."""
    import torch
    from chat import chat_ids, render_chat
    from checkpoint import load_any, tokenizer_for
    from engine import Engine, Request
    from runtime import autocast
    from tokenizer import SPECIAL_TOKENS
    dev, dev_type, dt = device_and_dtype(device, dtype)
    model, ckpt = load_any(checkpoint, adapter, dev)
    tok = tokenizer_for(ckpt, tokenizer, model.args.vocab_size)
    chat = prompt_style == "chat" or (prompt_style == "auto" and all(s in tok.special_ids for s in SPECIAL_TOKENS))
    stop_ids = set(end_ids(tok)) | ({chat_ids(tok)[2]} if chat else set())
    gen, engine = torch.Generator().manual_seed(seed), Engine(model, tok, max_batch=8, autocast=autocast(dev_type, dt))
    print(f"generating with {checkpoint} ({'chat template' if chat else 'plain completion'})")

    def complete(prompts, max_new, temp, p, stop):
        reqs = []
        for prompt in prompts:
            ids = render_chat(tok, [{"role": "user", "content": prompt}], True)[0] if chat else \
                tok.encode(prompt, bos=True)
            check(len(ids) < model.args.max_seq_len, f"a prompt of {len(ids)} tokens does not fit the model's context "
                  f"of {model.args.max_seq_len}; lower num_prompt_instructions or domain_max_chars, or use a longer "
                  f"one")
            reqs.append(Request(ids, max_new, temp, None, p, seed=int(torch.randint(2**62, (), generator=gen)),
                                stop_ids=stop_ids, stop=stop))  # a seed each: the same text alone or in a batch
        return [(r.text, r.finish_reason) for r in engine.run(reqs)]
    return complete


# ---- the loop -------------------------------------------------------------------------------------------
def one_round(complete, seeds, docs, done, pool, rng, counts, f):
    """Generate, filter, classify and instantiate one batch of instructions; append the tasks; return how many."""
    prompts, prompt_docs = [], [rng.choice(docs) if docs else "" for _ in range(request_batch_size)]
    for doc in prompt_docs:
        listed = rng.sample(done, min(num_machine_instructions, len(done)))
        listed += [t["instruction"] for t in rng.sample(seeds, min(num_prompt_instructions - len(listed), len(seeds)))]
        prompts.append(instruction_prompt(rng.sample(listed, len(listed)), doc))  # shuffled
    end = 2 * num_prompt_instructions  # stop where the list ends, as the paper does (at 16 for 8 listed)
    replies = complete(prompts, max_tokens, temperature, top_p, ["\n\n", f"\n{end}.", f"\n{end} ."])
    counts["prompts"] += len(prompts)
    candidates = {}  # instruction -> the document of its prompt
    for (text, finish), doc in zip(replies, prompt_docs):
        items = parse_numbered(text)
        if finish == "length" and items:
            items.pop()  # unfinished: the token limit cut it
            counts["cut_off"] += 1
        for inst in items:
            counts["candidates"] += 1
            reason = rule_violation(inst) or ("duplicate" if inst in pool.texts or inst in candidates else None)
            if reason:
                counts[reason] += 1
            else:
                candidates[inst] = doc
    keep = pool.keep_novel(list(candidates))
    candidates = [c for c, k in zip(candidates.items(), keep) if k]
    counts["too_similar"] += keep.count(False)
    counts["new_instructions"] += len(candidates)
    if not candidates:
        return 0
    answers = complete([classification_prompt(seeds, c) for c, _ in candidates], 3, 0.0, 1.0, ["\n"])
    is_clf = [text.strip().lower().startswith("yes") for text, _ in answers]
    counts["classification"] += sum(is_clf)
    prompts = [instance_prompt(seeds, c, clf, doc, rng) for (c, doc), clf in zip(candidates, is_clf)]
    replies = complete(prompts, instance_max_tokens, 0.0, 1.0, ["Task:", f"Example {max_instances + 1}"])
    before = len(done)
    for (inst, _), clf, (text, finish) in zip(candidates, is_clf, replies):
        instances = clean_instances(parse_instances(text, clf), finish, counts)
        if instances and len(done) < num_tasks:
            append_task(f, inst, instances)
            done.append(inst)
            counts["examples_written"] += len(instances)
    counts["tasks_written"] += len(done) - before
    return len(done) - before


def main():
    print_config(config)
    check(bool(checkpoint) != bool(api_base), "pass one generator: --checkpoint=PATH (a local model) or "
                                              "--api_base=http://HOST:PORT/v1 (an OpenAI-compatible server)")
    check(not api_base or api_base.startswith(("http://", "https://")),
          f"api_base='{api_base}' is not an http(s) URL; pass e.g. --api_base=http://127.0.0.1:8000/v1")
    require(config, positive=("num_tasks", "request_batch_size", "max_instances", "api_retries", "api_concurrency",
                              "max_idle_rounds", "num_prompt_instructions", "top_p", "rouge_threshold"),
            non_negative=("num_machine_instructions", "temperature"), fraction=("top_p", "rouge_threshold"))
    check(num_machine_instructions <= num_prompt_instructions, f"num_machine_instructions={num_machine_instructions} "
          f"is more than num_prompt_instructions={num_prompt_instructions}; lower it")
    check(prompt_style in ("auto", "chat", "plain"), f"prompt_style='{prompt_style}' is not one of auto, chat, plain")
    device_and_dtype(device, dtype) if checkpoint else None  # a device this machine lacks stops before any work
    seeds, docs = read_seed_tasks(seed_tasks), read_domain(domain_file) if domain_file else []
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a+b") as f:  # appends only: even after seek(), every write lands at the end
        done, pool = read_done(f), RougePool(rouge_threshold)
        pool.add([one_line(t["instruction"]) for t in seeds] + done)
        print(f"{len(seeds)} seed tasks from {seed_tasks}; {len(done)} tasks already in {out}"
              + (f"; {len(docs)} domain documents from {domain_file}" if docs else ""))
        rng = random.Random(f"{seed}:{len(done)}")  # a restart must not replay the prompts whose replies it has
        complete = api_completer() if api_base else local_completer()
        counts, idle, rounds, t0 = Counter(), 0, 0, time.time()
        while len(done) < num_tasks and idle < max_idle_rounds:
            rounds += 1
            written = one_round(complete, seeds, docs, done, pool, rng, counts, f)
            idle = 0 if written else idle + 1
            print(f"round {rounds}: {counts['candidates']} candidates, {counts['new_instructions']} new instructions "
                  f"so far; +{written} tasks, {len(done)}/{num_tasks} in {out} ({time.time() - t0:.0f} s)", flush=True)
    if len(done) < num_tasks:
        print(f"stopped: {max_idle_rounds} rounds in a row added no task", file=sys.stderr)
    print(json.dumps({"tasks_in_out": len(done), **dict(sorted(counts.items()))}))


if __name__ == "__main__":
    main()
