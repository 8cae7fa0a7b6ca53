"""self_instruct.py (its ROUGE-L filter: test_rouge.py): every filter against a scripted OpenAI-compatible server on
127.0.0.1, batching, retries, resume after a kill, bad input, a local checkpoint as the generator, and its output
through tokenize_data.py sft and train.py."""
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO, TINY, run_script, shared
from test_rouge import import_script

# a user's own seed file, in the format of the Self-Instruct seeds (4 classification tasks, 6 others)
SEEDS = [
    ("Suggest a name for a new coffee shop near the university campus.", False, [("", "Campus Grind")]),
    ("Classify the sentiment of the review as positive or negative.", True, [("The food was cold.", "negative")]),
    ("Translate the sentence into Spanish.", False, [("I like apples.", "Me gustan las manzanas.")]),
    ("Is the following number prime? Answer yes or no.", True, [("17", "yes")]),
    ("Summarize the paragraph in one sentence.", False, [("Cats sleep. They play at night.", "Cats sleep, play.")]),
    ("Identify whether the email is spam or not spam.", True, [("You won a free cruise!", "spam")]),
    ("List five fruits that are rich in vitamin C.", False, [("", "Oranges, kiwis, strawberries, guavas, papayas.")]),
    ("Tell me which continent the country is in.", True, [("Kenya", "Africa")]),
    ("Explain the difference between weather and climate.", False, [("", "Weather is short-term; climate is not.")]),
    ("Rewrite the sentence in the passive voice.", False, [("The dog chased the ball.", "The ball was chased.")]),
]
TIPS = "Give three tips for staying healthy during the winter months."
ANIMAL = "Classify the animal as a mammal, bird, or reptile."
CAPITAL, NOUN = "Name the capital city of France.", "Decide whether the given word is a noun or a verb."
CELSIUS = "Convert the temperature from Celsius to Fahrenheit."
HAIKU = "Write a haiku about the first snow of the year."
COLOR = "Label the color as warm or cool."
# replies to the instruction-generation prompts, in the order they arrive: two rounds of two prompts
LISTS = [
    (f" {TIPS}\n10. {ANIMAL}\n11. Describe the image below in two sentences.\n12. Sort it.\n"  # blacklisted, too short
     "13. Write a program that reverses a string in Python.\n"                                   # write_a_program
     '14. "Quoted" tasks may not start with punctuation like this.\n'                            # bad start
     # bad start (non-ASCII)
     "15. Écrivez un poème sur la mer et le ciel du soir.", "stop"),
    (f" {TIPS}\n10. Give three good tips for staying healthy in the winter months.\n"            # duplicate, similar
     "11. Translate the sentence into Spanish.\n12. Translate the following sentence into Spanish please.\n"  # seed
     "13. " + "word " * 151 + "\n14. Name the longest river of the country and then explain how", "length"),
    (f" {CAPITAL}\n10. {NOUN}\n11. {CELSIUS}", "stop"),
    (f" {HAIKU}\n10. {COLOR}\n11. Give three tips for staying healthy during the cold winter months.\n"  # similar
     f"12. {ANIMAL}\n13. {CAPITAL}\n14. Count the words in the sentence that follows.\n"       # duplicates
     "15. Find the smallest number in the given list of numbers.\n"
     "16. Reverse the given list of words and return it.\n17. Count the vowels in the given sentence.", "stop"),
]
CLASSIFICATION = {ANIMAL, NOUN, COLOR}
COLORS = ["red", "orange", "yellow", "blue", "green", "purple", "teal"]
INSTANCES = {  # instruction -> (reply, finish_reason)
    TIPS: ("Example 1\nOutput: Wear layers, drink water and sleep well.\nExample 2\nOutput: \n"  # empty output
           "Example 3\nInput: Stay warm.\nOutput: Stay warm.\n"                                # input = output
           "Example 4\nOutput: Wash your hands often.\n"
           "Example 5\nOutput: Wear layers, drink water and sleep well.", "stop"),                      # duplicate
    ANIMAL: ("Class label: Mammal\nInput: A dolphin nurses its young.\nClass label: Bird\nInput: A penguin has "
             "feathers.\nClass label: Reptile\nInput: A gecko has", "length"),                           # cut off
    CAPITAL: ("Output: Paris.", "stop"),
    NOUN: ("Class label: Noun\nInput: run\nClass label: Verb\nInput: run", "stop"),                     # conflicting
    CELSIUS: ("Example 1\nInput: 0 C\nOutput: 32 F\nExample 2\nInput: 100 C\nOutput: 212 F\n"
              "Example 3\nInput: 37 C\nOutput: 98.6 F\nTask: something else", "stop"),                 # stop at Task:
    HAIKU: ("Snow falls on the roof", "stop"),                                                          # no instances
    COLOR: ("".join(f"Class label: {'warm' if k < 3 else 'cool'}\nInput: {c}\n" for k, c in enumerate(COLORS)), "stop"),
    "Count the words in the sentence that follows.": ("Example 1\nInput: I am here.\nOutput: 3", "stop"),
    "Find the smallest number in the given list of numbers.": ("Example 1\nInput: 3, 1, 2\nOutput: 1", "stop"),
    "Reverse the given list of words and return it.": ("Example 1\nInput: a b\nOutput: b a", "stop"),
}
EXPECTED = [(TIPS, "", "Wear layers, drink water and sleep well."), (TIPS, "", "Wash your hands often."),
            (ANIMAL, "A dolphin nurses its young.", "Mammal"), (ANIMAL, "A penguin has feathers.", "Bird"),
            (CAPITAL, "", "Paris."), (CELSIUS, "0 C", "32 F"), (CELSIUS, "100 C", "212 F"), (CELSIUS, "37 C", "98.6 F"),
            *[(COLOR, c, "warm" if k < 3 else "cool") for k, c in enumerate(COLORS[:5])]]
COUNTS = dict(prompts=4, candidates=22, cut_off=1, too_short=1, too_long=1, blacklisted=1, bad_start=2,
              write_a_program=1, duplicate=4, too_similar=3, new_instructions=9, classification=3, instance_cut_off=1,
              empty_output=1, input_equals_output=1, duplicate_instance=1, over_max_instances=2, conflicting_outputs=1,
              no_instances=1, tasks_written=6, examples_written=14)
EXPECTED_EXTRA = [("Count the words in the sentence that follows.", "I am here.", "3")]  # the 6th task (num_tasks=6)
SMALLEST = ("Find the smallest number in the given list of numbers.", "3, 1, 2", "1")  # the 7th


class FakeLM(ThreadingHTTPServer):
    """POST /v1/completions as OpenAI's legacy API answers it: the instruction lists in arrival order, the
    classification check and the instances by the task in the prompt; stop strings are honoured (and not
    returned). Every request is recorded. Options: fail (close the connection without an answer) every request
    after the first fail_after, answer the first `busy` requests 429 + Retry-After, require an API key."""

    def __init__(self, fail_after=None, busy=0, key="sk-test"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lists, self.requests, self.answered, self.lock = list(LISTS), [], [], threading.Lock()
        self.fail_after, self.busy, self.key, self.statuses = fail_after, busy, key, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, prompt, stop):
        if re.search(r"\n\d+\.$", prompt):
            text, finish = self.lists.pop(0) if self.lists else ("", "stop")
        else:
            task = prompt.rsplit("Task: ", 1)[1]
            if task.endswith("\nClassification:"):
                text, finish = (" Yes" if task[:-len("\nClassification:")] in CLASSIFICATION else " No"), "stop"
            else:
                text, finish = INSTANCES[task.strip()]
        cut = min([text.find(s) for s in stop if s in text], default=-1)
        self.answered.append((prompt, text[:cut] if cut >= 0 else text))
        return (text[:cut], "stop") if cut >= 0 else (text, finish)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        for k, v in [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers]:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.server.statuses.append(status)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append((self.path, body, self.headers.get("Authorization")))
            n = len(srv.requests)
            if srv.fail_after is not None and n > srv.fail_after:
                self.close_connection = True  # as a crashed server: the client sees the connection drop
                return
            if n <= srv.busy:
                return self.reply(429, {"error": {"message": "queue full"}}, [("Retry-After", "0")])
            if srv.key and self.headers.get("Authorization") != f"Bearer {srv.key}":
                return self.reply(401, {"error": {"message": "invalid API key", "type": "auth"}})
            text, finish = srv.answer(body["prompt"], body.get("stop", []))
        self.reply(200, {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


@pytest.fixture
def fake_lm():
    servers = []

    def start(**kw):
        srv = FakeLM(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def write_seeds(path):
    path.write_text("".join(json.dumps({"id": f"seed_task_{i}", "instruction": s, "is_classification": c,
                                        "instances": [{"input": a, "output": b} for a, b in inst]}) + "\n"
                            for i, (s, c, inst) in enumerate(SEEDS)))
    return path


def self_instruct(root, *args, key="sk-test", check=True):
    return run_script("self_instruct.py", f"--seed_tasks={write_seeds(root / 'seeds.jsonl')}", "--out=out.jsonl",
                      "--request_batch_size=2", "--api_backoff=0.01", *args, cwd=root, check=check, timeout=120,
                      env={"OPENAI_API_KEY": key})


def records(path):
    return [tuple(json.loads(line)[k] for k in ("instruction", "input", "output")) for line in open(path)]


def final_counts(proc):
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: counts.get(k, 0) for k in COUNTS}


def listed(prompt):
    """The instructions an instruction-generation prompt lists."""
    return re.findall(r"^\d+\. (.*)$", prompt, flags=re.M)


def error_line(proc, *fragments):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(f in last for f in fragments), last
    return last


# ---- the pipeline against a scripted server --------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One run against the scripted server, 1 request at a time; 2 rounds of 2 prompts, then 6 tasks are in."""
    root = tmp_path_factory.mktemp("si")
    srv = FakeLM(busy=1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        proc = self_instruct(root, f"--api_base={srv.url}", "--num_tasks=6", "--api_concurrency=1")
    finally:
        srv.shutdown()
        srv.server_close()
    return root, srv, proc


def test_each_filter_removes_what_it_should_and_is_counted(generated):
    root, srv, proc = generated
    assert records(root / "out.jsonl") == EXPECTED + EXPECTED_EXTRA
    assert final_counts(proc) == COUNTS
    assert "round 2: 22 candidates, 9 new instructions so far; +4 tasks, 6/6 in out.jsonl" in proc.stdout
    # the request contract: /v1/completions, the key as a Bearer token, the list's stop, greedy instances
    assert {(p, auth) for p, _, auth in srv.requests} == {("/v1/completions", "Bearer sk-test")}
    bodies = [b for _, b, _ in srv.requests]
    assert srv.statuses[0] == 429 and srv.statuses.count(429) == 1 and bodies[0] == bodies[1]  # retried after 429
    lists = [b for b in bodies[1:] if re.search(r"\n\d+\.$", b["prompt"])]
    assert len(lists) == 4 and all(b["stop"] == ["\n\n", "\n16.", "\n16 ."] and b["max_tokens"] == 1024
                                   and b["temperature"] == 0.7 and b["top_p"] == 0.5 for b in lists)
    seeds = {s for s, _, _ in SEEDS}
    # all 8 listed instructions are human seeds at first; then 6 seeds + 2 of the tasks written so far
    assert [len(listed(b["prompt"])) for b in lists] == [8] * 4
    assert all(set(listed(b["prompt"])) <= seeds for b in lists[:2])
    for b in lists[2:]:
        machine = [s for s in listed(b["prompt"]) if s not in seeds]
        assert sorted(machine) == sorted([TIPS, ANIMAL]) and len(set(listed(b["prompt"])) & seeds) == 6
    checks = [b for b in bodies if b["prompt"].endswith("\nClassification:")]
    assert len(checks) == 9 and all(b["temperature"] == 0.0 and b["max_tokens"] == 3 for b in checks)
    assert "Task: Identify whether the email is spam or not spam.\nClassification: Yes" in checks[0]["prompt"]
    instance_prompts = {b["prompt"].rsplit("Task: ", 1)[1].strip(): b["prompt"] for b in bodies
                        if b["prompt"].endswith("\n") and "Task: " in b["prompt"]}
    assert "Class label: " in instance_prompts[ANIMAL] and "Example 1" not in instance_prompts[ANIMAL]  # output-first
    assert "Example 1\n" in instance_prompts[CELSIUS] and "Class label" not in instance_prompts[CELSIUS]  # input-first


def test_concurrent_requests_and_domain_text(tmp_path, fake_lm):
    """4 requests in flight: the same data and counts; a --domain_file's documents appear in the instruction
    prompts, and each task's instance prompt shows the document its instruction was written for."""
    srv = fake_lm()
    (tmp_path / "news.txt").write_text("Bitcoin rose 5% on Monday after ETF inflows.\n\nEther fell as fees dropped.\n")
    proc = self_instruct(tmp_path, f"--api_base={srv.url}", "--num_tasks=10", "--api_concurrency=4",
                         "--domain_file=news.txt", "--max_idle_rounds=1")
    # either reply of a round may reach either prompt now, so which tasks come first varies: with room for
    # all of them, the data and the counts cannot (a 3rd round gets empty lists, and the run stops idle)
    assert sorted(records(tmp_path / "out.jsonl")) == sorted(EXPECTED + EXPECTED_EXTRA + [SMALLEST])
    assert final_counts(proc) == {**COUNTS, "prompts": 6, "tasks_written": 7, "examples_written": 15}
    assert "stopped: 1 rounds in a row added no task" in proc.stderr
    prompts = [b["prompt"] for _, b, _ in srv.requests]
    docs = ["Bitcoin rose 5% on Monday after ETF inflows.", "Ether fell as fees dropped."]
    lists = [p for p in prompts if re.search(r"\n\d+\.$", p)]
    assert len(lists) == 6 and all(sum(d in p for d in docs) == 1 for p in lists)
    instance_prompts = [p for p in prompts if p.endswith("\n") and "Task: " in p]
    assert len(instance_prompts) == 9 and all(sum(d in p for d in docs) == 1 for p in instance_prompts)
    for p in instance_prompts:  # the task's own document: that of the list prompt whose reply held the task
        task = p.rsplit("Task: ", 1)[1].strip()
        own = [d for d in docs if any(d in q and task in reply for q, reply in srv.answered if q in lists)]
        assert any(d in p for d in own), task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SentencePiece vocab with the chat tokens, and untrained 2-layer models with contexts of 1024 and 64."""
    import torch
    from checkpoint import save_checkpoint
    from model import ModelArgs, Transformer
    from test_finetune import make_tokenizer_model
    from tokenizer import make_tokenizer
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer(make_tokenizer_model(root))
    for name, ctx in (("base.pt", 1024), ("short.pt", 64)):
        torch.manual_seed(0)
        args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seq_len=ctx)
        save_checkpoint({"model": Transformer(args).state_dict(), "model_args": args.to_dict(),
                         "tokenizer": tok.to_meta(), "config": {}, "iter_num": 0, "best_val_loss": None}, root / name)
    return root, tok


def test_output_trains_through_sft(generated, tiny, tmp_path):
    """What it writes is what tokenize_data.py sft reads as it is, and train.py fine-tunes on it with the README's
    SFT config (config/sft_alpaca.py), shortened."""
    root, base = generated[0], tiny[0] / "base.pt"
    sft = run_script("tokenize_data.py", "sft", f"--source={root / 'out.jsonl'}", "--data_root=data", "--dataset=si",
                     f"--tokenizer={base}", "--val_fraction=0.2", cwd=tmp_path)
    assert "14 conversations" in sft.stdout
    run_script("train.py", str(REPO / "config" / "sft_alpaca.py"), "--data_root=data", *TINY, "--dataset=si",
               f"--init_from={base}", "--max_iters=3", "--eval_interval=3", "--warmup_iters=1", "--block_size=96",
               "--out_dir=si_run", cwd=tmp_path)
    assert (tmp_path / "si_run" / "ckpt.pt").exists()


def test_the_self_instruct_seed_tasks_read_as_they_are(monkeypatch):
    """The 175 seed tasks of the paper (../shared/data), the default seed_tasks, pass the seed reader."""
    si = import_script(monkeypatch)
    tasks = si.read_seed_tasks(str(shared("self_instruct", "seed_tasks.jsonl")))
    assert len(tasks) == 175 and sum(t["is_classification"] for t in tasks) == 26
    assert all(t["instances"] and t["instruction"].strip() for t in tasks)


# ---- failures, resume ------------------------------------------------------------------------------------

def test_a_killed_server_keeps_the_output_and_a_restart_continues_without_duplicates(tmp_path, fake_lm):
    # round 1 takes 6 requests (2 lists, 2 checks, 2 instance replies); the server dies on the 7th
    srv = fake_lm(fail_after=6)
    proc = self_instruct(tmp_path, f"--api_base={srv.url}", "--num_tasks=6", "--api_concurrency=1",
                         "--api_retries=3", check=False)
    error_line(proc, "no completion from", "after 3 attempts", "the tasks written so far stay in out.jsonl")
    assert len(srv.requests) == 6 + 3  # three attempts at the 7th request
    assert records(tmp_path / "out.jsonl") == EXPECTED[:4]  # round 1's tasks, whole
    # a kill while writing leaves half a line; the restart drops it, and replays of round 1 are duplicates now
    with open(tmp_path / "out.jsonl", "a") as f:
        f.write('{"instruction": "Name the capital city of Fra')
    srv = fake_lm()
    proc = self_instruct(tmp_path, f"--api_base={srv.url}", "--num_tasks=6", "--api_concurrency=1")
    assert "dropped a torn last line" in proc.stderr
    assert "2 tasks already in out.jsonl" in proc.stdout
    assert records(tmp_path / "out.jsonl") == EXPECTED + EXPECTED_EXTRA
    counts = final_counts(proc)
    assert counts["duplicate"] == 4 + 2 and counts["too_similar"] == 2 + 1 and counts["tasks_written"] == 4


def test_unreachable_endpoint_is_one_line_after_the_retries(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "out.jsonl").write_text(json.dumps({"instruction": TIPS, "input": "", "output": "Sleep."}) + "\n")
    before = (tmp_path / "out.jsonl").read_bytes()
    t0 = time.time()
    proc = self_instruct(tmp_path, f"--api_base=http://127.0.0.1:{port}/v1", "--api_retries=3", check=False)
    error_line(proc, f"no completion from http://127.0.0.1:{port}/v1/completions after 3 attempts", "refused")
    assert (tmp_path / "out.jsonl").read_bytes() == before and time.time() - t0 < 30


def test_bad_input_is_one_line(tmp_path, fake_lm):
    srv = fake_lm()
    error_line(self_instruct(tmp_path, f"--api_base={srv.url}", key="", check=False), "HTTP 401",
               "invalid API key", "set OPENAI_API_KEY")
    url = f"--api_base={srv.url}"
    good = json.dumps({"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}],
                       "is_classification": False})
    cases = [(good + "\n{not json\n", "bad.jsonl line 2 is not valid JSON"),
             (good + "\n\n" + json.dumps({"instruction": "Say hi.", "instances": []}) + "\n",
              "bad.jsonl line 3 is not a seed task"),
             ("", "holds no seed tasks")]
    for text, fragment in cases:
        (tmp_path / "bad.jsonl").write_text(text)
        proc = run_script("self_instruct.py", "--seed_tasks=bad.jsonl", url, cwd=tmp_path, check=False)
        error_line(proc, fragment)
    error_line(self_instruct(tmp_path, check=False), "pass one generator")
    error_line(self_instruct(tmp_path, "--api_base=127.0.0.1:8000", check=False), "not an http(s) URL")
    (tmp_path / "out.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\nnot json\n')
    error_line(self_instruct(tmp_path, url, check=False), "out.jsonl line 2 is not valid JSON")


# ---- a local checkpoint as the generator ---------------------------------------------------------------------

def test_smoke_with_a_tiny_local_checkpoint(tiny, tmp_path):
    """An untrained model writes gibberish, so the point is the path: load, chat template (its vocab has the chat
    tokens) or plain completion, sampling, counting; and the context limit as a one-line error."""
    root, _ = tiny
    common = [f"--seed_tasks={write_seeds(tmp_path / 'seeds.jsonl')}", "--out=out.jsonl", "--request_batch_size=2",
              "--max_tokens=24", "--instance_max_tokens=24", "--max_idle_rounds=1", "--num_tasks=1", "--device=cpu"]
    for style, shown in (("auto", "chat template"), ("plain", "plain completion")):
        proc = run_script("self_instruct.py", f"--checkpoint={root / 'base.pt'}", f"--prompt_style={style}", *common,
                          cwd=tmp_path)
        assert f"base.pt ({shown})" in proc.stdout
        counts = json.loads(proc.stdout.strip().splitlines()[-1])
        assert counts["prompts"] == 2 and counts.get("cut_off", 0) + counts.get("candidates", 0) >= 1
    for line in open(tmp_path / "out.jsonl"):
        assert set(json.loads(line)) == {"instruction", "input", "output"}
    proc = run_script("self_instruct.py", f"--checkpoint={root / 'short.pt'}", *common, cwd=tmp_path, check=False)
    error_line(proc, "does not fit the model's context of 64")


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_local_replies_are_model_generate_cut_at_the_stop(tiny, monkeypatch, style):
    """Against an independent reference: greedy model.generate from the same prompt ids, decoded, cut at the stop
    string by hand. Without a stop the reply is all max_tokens tokens, finish_reason "length"."""
    import torch
    from chat import render_chat
    from checkpoint import load_model
    root, tok = tiny
    si = import_script(monkeypatch)
    for key, value in (("checkpoint", str(root / "base.pt")), ("prompt_style", style), ("device", "cpu")):
        monkeypatch.setattr(si, key, value)
    complete = si.local_completer()
    model, _ = load_model(root / "base.pt")
    prompt = "the cat sat on a mat and"
    ids = render_chat(tok, [{"role": "user", "content": prompt}], True)[0] if style == "chat" else \
        tok.encode(prompt, bos=True)
    new = model.generate(torch.tensor([ids]), 30, temperature=0.0)[0, len(ids):].tolist()
    ends = (tok.eos_id, tok.bos_id, tok.special_ids["<|end_of_turn|>"] if style == "chat" else -1)  # BOS: a new doc
    stops = [i for i in new if i in ends]
    new = new[:new.index(stops[0])] if stops else new
    text = tok.decode(ids + new)[len(tok.decode(ids)):]
    assert len(text) > 12
    assert complete([prompt], 30, 0.0, 1.0, []) == [(text, "stop" if stops else "length")]
    stop = text[8:11]
    assert complete([prompt, prompt], 30, 0.0, 1.0, ["zzz", stop]) == [(text[:text.find(stop)], "stop")] * 2
    # an end-of-sequence id ends the reply and is not text: pretend the 6th token generated is the tokenizer's EOS
    import checkpoint
    real = checkpoint.tokenizer_for
    monkeypatch.setattr(checkpoint, "tokenizer_for", lambda *a: setattr(t := real(*a), "eos_id", new[5]) or t)
    text = tok.decode(ids + new[:new.index(new[5])])[len(tok.decode(ids)):]
    assert si.local_completer()([prompt], 30, 0.0, 1.0, []) == [(text, "stop")]
