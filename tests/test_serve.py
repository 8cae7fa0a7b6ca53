"""serve.py live on 127.0.0.1, through the official openai client (and raw HTTP where the client would hide what is
sent): answers are compared with the model run in this process, errors with OpenAI's statuses and shapes."""
import http.client
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from conftest import REPO, run_script, save_tiny_checkpoint, tiny_model
from test_engine import train_tokenizer

KEY = "test-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A checkpoint folder 'tiny' (a random 2-layer model, a real SentencePiece vocab with the chat tokens)."""
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(root)
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=1024)
    save_tiny_checkpoint(root / "tiny" / "ckpt.pt", model, tok)
    return root, model, tok


def start(root, *args, **env_vars):
    """serve.py on a free port (it prints the address it got); (process, base URL)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_vars)
    log = open(root / f"server{len(list(root.glob('server*.log')))}.log", "w")  # stderr: tracebacks, if any
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--checkpoint=tiny", "--port=0", "--device=cpu",
                             *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert found, (line, open(log.name).read())
    proc.log = log.name
    return proc, found.group()


def wait_ready(base, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if call(base, "GET", "/health")[0] == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"{base} not ready after {timeout} s: {call(base, 'GET', '/health')}")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"serve.py did not stop within 20 s of SIGTERM:\n{open(proc.log).read()[-3000:]}")


def call(base, method, path, body=None, key=KEY, raw=None):
    """(status, parsed JSON body, headers) of one plain HTTP request."""
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body=raw if raw is not None else None if body is None else json.dumps(body),
                 headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data), resp.headers
    except ValueError:
        return resp.status, data.decode(), resp.headers


@pytest.fixture(scope="module")
def server(served):
    proc, base = start(served[0], "--max_batch=4", LLAMAFORGE_API_KEY=KEY)  # the key from the environment
    wait_ready(base)
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def greedy(model, ids, n, stop_id=None):
    """The reference: model.generate alone on these ids, cut at stop_id."""
    new = model.generate(torch.tensor([ids]), n, temperature=0, eos_id=stop_id)[0, len(ids):].tolist()
    return new[:new.index(stop_id)] if stop_id in new else new


def text_after(tok, ids, new):
    return tok.decode(ids + new)[len(tok.decode(ids)):]


def test_models_health_metrics_and_the_api_key(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    status, body, _ = call(server, "GET", "/v1/models", key=None)
    assert status == 401 and set(body["error"]) >= {"message", "type", "code"}
    assert call(server, "GET", "/health", key=None)[0] == 200  # operators' routes need no key
    client.completions.create(model="tiny", prompt="x", max_tokens=2)
    status, text, headers = call(server, "GET", "/metrics", key=None)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for series in ('llamaforge_requests_total{route="/v1/completions",status="200"}', "llamaforge_queue_depth",
                   "llamaforge_running_requests", "llamaforge_generation_tokens_total",
                   'llamaforge_request_latency_seconds_bucket{le="+Inf"}', "llamaforge_time_to_first_token_seconds"):
        assert series in text, series


def test_completions_are_the_models_greedy_text_with_true_usage_and_finish_reason(served, client):
    _, model, tok = served
    prompts = ["import json\n", "def encode(self, o):"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for c, p in zip(out.choices, prompts):
        ids = tok.encode(p, bos=True)
        new = greedy(model, ids, 12, tok.eos_id)
        assert c.text == text_after(tok, ids, new) and c.finish_reason == ("length" if len(new) == 12 else "stop")
    assert out.usage.prompt_tokens == sum(len(tok.encode(p, bos=True)) for p in prompts)
    assert out.usage.completion_tokens == 24 and out.usage.total_tokens == out.usage.prompt_tokens + 24
    ids = tok.encode(prompts[0])  # token ids without BOS: the server adds it, as for text
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0).choices[0].text \
        == out.choices[0].text


def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = client.completions.create(model="tiny", prompt="class JSONDecoder", max_tokens=40, temperature=0)
    text = full.choices[0].text
    stop = text[12:15]
    want = text[:text.index(stop)]
    cut = client.completions.create(model="tiny", prompt="class JSONDecoder", max_tokens=40, temperature=0,
                                    stop=["\x00never", stop])
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="class JSONDecoder", max_tokens=40, temperature=0,
                                            stop=[stop], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == cut.usage.completion_tokens > 0


def test_a_seeded_request_samples_the_same_text_alone_and_among_others(client):
    ask = lambda seed: client.completions.create(model="tiny", prompt="def loads(s):", max_tokens=30,  # noqa: E731
                                                 temperature=1.0, top_p=0.95, seed=seed).choices[0].text
    alone, crowd = ask(7), {}
    threads = [threading.Thread(target=lambda s=s: crowd.__setitem__(s, ask(s))) for s in (1, 7, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert crowd[7] == alone and len(set(crowd.values())) == 4  # its own generator: the others do not matter
    # top_k (an extension field, as vLLM takes it): 1 keeps only the best token, so any seed samples the greedy text
    greedy_text = client.completions.create(model="tiny", prompt="def loads(s):", max_tokens=30, temperature=0)
    for seed in (1, 2):
        top1 = client.completions.create(model="tiny", prompt="def loads(s):", max_tokens=30, temperature=1.0,
                                         seed=seed, extra_body={"top_k": 1})
        assert top1.choices[0].text == greedy_text.choices[0].text


def test_chat_follows_the_template_and_stops_at_the_end_of_turn(served, client):
    from chat import chat_ids, render_chat
    _, model, tok = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is JSON?"}]
    ids = render_chat(tok, messages, add_generation_prompt=True)[0]
    eot = chat_ids(tok)[2]
    new = greedy(model, ids, 30, eot)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == text_after(tok, ids, new)
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_echo_returns_the_prompts_own_log_probs(served, client):
    _, model, tok = served
    text = "import json"
    out = client.completions.create(model="tiny", prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=1)
    c = out.choices[0]
    ids = tok.encode(text, bos=True)
    full = ids + greedy(model, ids, 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full]), torch.tensor([full]))[0][0], -1)
    want = [logp[i - 1, full[i]].item() for i in range(1, len(full))]  # every token after the BOS the server added
    assert c.text.startswith(text) and len(c.logprobs.token_logprobs) == len(want)
    assert max(abs(a - b) for a, b in zip(c.logprobs.token_logprobs, want)) < 1e-4
    assert "".join(c.logprobs.tokens) == c.text and c.logprobs.text_offset[1] == len(c.logprobs.tokens[0])
    assert all(len(top) == 1 for top in c.logprobs.top_logprobs)
    with_bos = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=0)
    assert with_bos.choices[0].logprobs.token_logprobs[0] is None  # nothing predicts the first token


BAD = [({"prompt": "x", "model": "gpt-4"}, "model"), ({"prompt": "x " * 1100}, "context"),
       ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
       ({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "top_p": 0}, "top_p"),
       ({"prompt": "x", "max_tokens": "many"}, "max_tokens"), ({"prompt": "x", "seed": -1}, "seed"),
       ({"prompt": "x", "stream": True, "logprobs": 1}, "logprobs"), ({"prompt": 5}, "prompt"),
       ({"prompt": [[1, "a"]]}, "prompt"), ({"prompt": [99999]}, "vocabulary"), ({"prompt": "x", "stop": [1]}, "stop"),
       ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream"), ({"prompt": "x", "top_k": -5}, "top_k"),
       ({"prompt": "x", "temperature": float("nan")}, "temperature"), ({"prompt": "x", "logprobs": 99}, "logprobs")]


@pytest.mark.parametrize("body,what", BAD)
def test_a_bad_field_is_a_400_in_openais_shape(server, body, what):
    status, answer, _ = call(server, "POST", "/v1/completions", {"model": "tiny", **body})
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    assert what in answer["error"]["message"] and answer["error"]["code"]


def test_client_errors_never_break_the_server(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    for raw in (b"{bad json", b"[1, 2]", b"\xff\xfe", b""):
        status, answer, _ = call(server, "POST", "/v1/completions", raw=raw)
        assert status == 400 and "JSON" in answer["error"]["message"]
    for messages in ([], [{"role": "user", "content": 5}], "hi", [{"role": "user"}]):
        assert call(server, "POST", "/v1/chat/completions", {"messages": messages})[0] == 400
    status, answer, _ = call(server, "GET", "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    assert call(server, "GET", "/v1/completions")[0] == 405
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=3).choices[0].text is not None


def test_tokenizer_routes_as_lm_evaluation_harness_uses_them(served, server):
    _, _, tok = served
    status, info, _ = call(server, "GET", "/tokenizer_info")
    assert status == 200 and (info["bos_token"], info["eos_token"]) == ("<s>", "</s>")
    tokens = lambda body: call(server, "POST", "/tokenize", body)[1]["tokens"]  # noqa: E731
    assert tokens({"prompt": info["eos_token"], "add_special_tokens": False}) == [tok.eos_id]  # how it finds EOS
    assert tokens({"prompt": "import json", "add_special_tokens": False}) == tok.encode("import json")
    assert tokens({"prompt": "import json"}) == tok.encode("import json", bos=True)
    ids = tok.encode("def dumps(obj):")
    assert call(server, "POST", "/detokenize", {"tokens": ids})[1]["prompt"] == "def dumps(obj):"
    assert call(server, "POST", "/detokenize", {"tokens": [-1]})[0] == 400


def llama2c_tokenizer_bytes(tok):
    """tok's vocabulary in llama2.c's tokenizer.bin layout (what Llama2cTokenizer reads)."""
    sp = tok.backend
    pieces = [sp.id_to_piece(i).replace("\u2581", " ").encode() for i in range(sp.vocab_size())]
    return struct.pack("<I", max(map(len, pieces))) + b"".join(
        struct.pack("<fi", sp.get_score(i), len(p)) + p for i, p in enumerate(pieces))


def test_health_and_every_route_answer_503_until_the_model_is_loaded(served):
    """The tokenizer comes through a named pipe, so loading waits, for certain, until the test writes it."""
    root, _, tok = served
    fifo = root / "slow_tok.bin"
    os.mkfifo(fifo)
    proc, base = start(root, f"--tokenizer={fifo}")
    try:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
            status, answer, headers = call(base, method, path, {"prompt": "x"})
            assert status == 503 and answer["error"]["code"] == "model_loading" and headers["Retry-After"], answer
        with pytest.raises(openai.InternalServerError):
            openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0).models.list()
        with open(fifo, "wb") as f:
            f.write(llama2c_tokenizer_bytes(tok))
        wait_ready(base, 30)
        status, answer, _ = call(base, "POST", "/v1/completions", {"prompt": "import", "max_tokens": 3})
        assert status == 200, (answer, open(proc.log).read()[-3000:])
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def small(served):
    """A server with one batch row and one queue place: the third concurrent request must be refused."""
    proc, base = start(served[0], "--max_batch=1", "--queue_size=1", f"--api_key={KEY}")  # the key as a setting
    wait_ready(base)
    yield base
    stop(proc)


def test_a_full_queue_answers_429_with_retry_after_and_nothing_else_fails(small):
    results, client = [], openai.OpenAI(base_url=small + "/v1", api_key=KEY, max_retries=0)

    def one():
        try:
            client.completions.create(model="tiny", prompt="import", max_tokens=200, temperature=0)
            results.append((200, None))
        except openai.RateLimitError as e:  # the client's own type for a 429
            results.append((429, e))
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    refused = [e for s, e in results if s == 429]
    assert all(e.type == "rate_limit_error" and e.response.headers["Retry-After"] for e in refused)


def test_a_client_that_hangs_up_cancels_its_generation(small):
    def cancelled():
        text = call(small, "GET", "/metrics")[1]
        found = re.search(r'llamaforge_generations_total\{reason="cancelled"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0
    before = cancelled()
    host, port = small.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "import", "max_tokens": 250, "temperature": 0,
                                                        "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    resp.close()
    conn.close()
    t0 = time.time()
    while cancelled() == before and time.time() - t0 < 20:
        time.sleep(0.05)
    assert cancelled() == before + 1
    assert call(small, "POST", "/v1/completions", {"prompt": "import", "max_tokens": 3})[0] == 200
    # not streamed: the server notices the hang-up while it waits for the tokens, and stops generating them
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "import", "max_tokens": 1000, "temperature": 0}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    t0 = time.time()  # hang up once it runs (1000 tokens take ~4 s here), not before the server has read it
    while "llamaforge_running_requests 1.0" not in call(small, "GET", "/metrics")[1] and time.time() - t0 < 20:
        time.sleep(0.01)
    conn.close()
    t0 = time.time()
    while cancelled() == before + 1 and time.time() - t0 < 20:
        time.sleep(0.05)
    assert cancelled() == before + 2, call(small, "GET", "/metrics")[1]


def test_loadgen_reports_every_level_and_only_429s_under_load(small, tmp_path):
    out = run_script("loadgen.py", f"--url={small}", f"--api_key={KEY}", "--clients=1,4", "--duration=1.5",
                     "--max_tokens=8", "--json_out=load.json", cwd=tmp_path)
    levels = json.loads((tmp_path / "load.json").read_text())["levels"]
    assert [r["clients"] for r in levels] == [1, 4] and all(r["requests"] > 0 for r in levels)
    assert all(set(r["not_200"]) <= {"429"} for r in levels) and "out tok/s" in out.stdout
    assert levels[0]["output_tokens_per_s"] > 0 and levels[1]["p99_s"] >= levels[1]["p50_s"] > 0


def test_loadgen_and_serve_refuse_what_cannot_work(tmp_path):
    from conftest import one_line_error
    one_line_error(run_script("loadgen.py", "--url=http://127.0.0.1:9", "--duration=1", cwd=tmp_path, check=False),
                   "cannot reach")
    one_line_error(run_script("serve.py", "--checkpoint=nope.pt", "--port=0", cwd=tmp_path, check=False), "not found")
    one_line_error(run_script("serve.py", "--max_batch=0", cwd=tmp_path, check=False), "max_batch")


HELLASWAG_TASK = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {file}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"), reason="runs lm-evaluation-harness (~30 s; pip install "
                    "'lm_eval[api]'); set LLAMAFORGE_SLOW=1")
def test_lm_eval_local_completions_scores_hellaswag_as_evaluate_py_does(tmp_path):
    """lm-evaluation-harness's own client, tokenizing through /tokenize and scoring through echo + logprobs, against
    evaluate.py hellaswag on the same 40 items of the real validation set with the real stories260K model."""
    pytest.importorskip("lm_eval")
    import evaluate
    import engine as model_lib
    from checkpoint import load_any, tokenizer_for
    from conftest import shared
    model_bin, tok_file = shared("stories260K", "stories260K.bin"), shared("stories260K", "tok512.model")
    lines = shared("hellaswag", "hellaswag_val_preprocessed.jsonl").read_text().splitlines()[:40]
    (tmp_path / "hs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hellaswag_local.yaml").write_text(HELLASWAG_TASK.format(file=tmp_path / "hs.jsonl"))
    proc, base = start(tmp_path, f"--checkpoint={model_bin}", f"--tokenizer={tok_file}")
    try:
        wait_ready(base)
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        args = f"model=stories260K,base_url={base}/v1/completions,tokenizer_backend=remote,max_length=512"
        run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                              "--tasks", "hellaswag_local", "--include_path", str(tmp_path / "tasks"),
                              "--output_path", str(tmp_path / "out"), "--log_samples"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        stop(proc)
    run_script("evaluate.py", "hellaswag", f"--checkpoint={model_bin}", f"--tokenizer={tok_file}",
               f"--hellaswag_file={tmp_path / 'hs.jsonl'}", "--device=cpu", "--json_out=ours.json", cwd=tmp_path)
    ours = json.loads((tmp_path / "ours.json").read_text())
    theirs = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["hellaswag_local"]
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours["acc"], ours["acc_norm"]) and ours["n"] == 40
    model, ckpt = load_any(str(model_bin))  # and item by item: every ending's log-likelihood, not only the argmaxes
    tok = tokenizer_for(ckpt, str(tok_file), model.args.vocab_size)
    for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines():
        sample = json.loads(line)
        ref = model_lib.continuation_logprobs(model, *evaluate.encode_item(tok, sample["doc"]["ctx"],
                                                                        sample["doc"]["endings"]))
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert max(abs(a - b) for a, (b, _) in zip(got, ref)) < 1e-3, (sample["doc_id"], got, ref)
