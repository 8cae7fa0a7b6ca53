"""The Redis job queue (jobs.py, worker.py, submit.py) against a real redis-server that each test starts on a free
127.0.0.1 port with persistence off. Workers run as subprocesses, as in production; their texts are compared with
the model's own greedy decoding in this process."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch

from conftest import REPO, one_line_error, run_script, save_tiny_checkpoint, tiny_model
from test_engine import train_tokenizer

import jobs
from runtime import UsageError

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed "
                                 "(Debian: apt-get install redis-server); the queue is tested against a real one")
Q = "t"
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STARTED = []  # worker processes of the running test


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(ok, timeout, what):
    t0 = time.time()
    while not ok():
        if time.time() - t0 > timeout:
            raise AssertionError(f"{what}: not after {timeout} s")
        time.sleep(0.02)


class RedisServer:
    """redis-server on a free loopback port, no RDB snapshots, no AOF: a restart comes back empty."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = jobs.connect(self.url)

        def up():
            try:
                return r.ping()
            except Exception:
                assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
                return False
        wait_for(up, 10, "redis-server answering")

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(autouse=True)
def no_stray_workers():
    """Workers a failed test left running are killed, not left to spin on a shared machine."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint folder 'tiny': a random 2-layer model whose head never picks BOS or EOS (their rows are zero,
    below the largest of the other logits), so every job runs its full max_tokens, and a real tokenizer."""
    root = tmp_path_factory.mktemp("worker")
    tok = train_tokenizer(root)
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=1024, tie_embeddings=False)
    with torch.no_grad():
        model.output.weight[[tok.bos_id, tok.eos_id]] = 0
    save_tiny_checkpoint(root / "tiny" / "ckpt.pt", model, tok)
    return root, model, tok


def greedy_text(model, tok, prompt, n):
    """The reference: model.generate alone, greedy, on BOS + the prompt; the text its new tokens add."""
    ids = [tok.bos_id] + tok.encode(prompt)
    new = model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
    return tok.decode(ids + new)[len(tok.decode(ids)):]


def start_worker(root, server, name, *args):
    log = root / f"{name}-{server.port}.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "worker.py"), "--checkpoint=tiny", "--device=cpu",
                             f"--redis_url={server.url}", f"--queue={Q}", f"--consumer={name}", "--claim_idle=1.0",
                             "--max_batch=4", "--log_interval=0.2", *args], cwd=root, env=ENV,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    proc.log = log
    STARTED.append(proc)
    wait_for(lambda: f"worker {name}:" in log.read_text() or proc.poll() is not None, 90, f"worker {name} ready")
    assert proc.poll() is None, log.read_text()
    return proc


@contextmanager
def logs_on_failure(*procs):
    """A failure inside shows what the workers said (their logs are files in a temporary folder)."""
    try:
        yield
    except BaseException as e:
        logs = "\n".join(f"--- {p.log.name}:\n{p.log.read_text()[-4000:]}" for p in procs)
        raise AssertionError(f"{type(e).__name__}: {e}\n{logs}") from e


def stop_worker(proc):
    """SIGTERM: the worker finishes what it holds and exits 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.log.read_text()[-3000:]


def held_by(r, name):
    return [p["message_id"] for p in r.xpending_range(jobs.stream(Q), jobs.group(Q), "-", "+", 100, name)]


def renewed_by(r, name, since):
    """Entries the worker renewed after it took them: proof it holds them in memory, not merely that Redis delivered
    them (the reply can still sit unread in its socket, and a Redis restart then loses the job). since: {entry:
    when it was delivered}, filled in here."""
    now, out = time.monotonic(), []
    for p in r.xpending_range(jobs.stream(Q), jobs.group(Q), "-", "+", 100, name):
        delivered = since.setdefault(p["message_id"], now - p["time_since_delivered"] / 1000)
        if p["time_since_delivered"] / 1000 < now - delivered - 0.1:
            out.append(p["message_id"])
    return out


def freeze_holding(r, proc, name, renewed=False):
    """SIGSTOP the worker at a moment it holds jobs; returns their entry ids. A frozen worker can neither finish nor
    take any, so this is exactly what it holds, unstored (storing and acknowledging are one atomic step).
    renewed: only once it has renewed one (it runs the job, rather than Redis having merely sent it)."""
    since = {}
    holding = (lambda: renewed_by(r, name, since)) if renewed else (lambda: held_by(r, name))
    for _ in range(20):
        wait_for(holding, 30, f"{name} holding jobs")
        proc.send_signal(signal.SIGSTOP)
        held = held_by(r, name)
        if held:
            return held
        proc.send_signal(signal.SIGCONT)
    raise AssertionError(f"{name} never held a job when stopped")


def assert_drained(r):
    """Nothing left: no job queued or held, no error waiting for a retry."""
    assert r.xlen(jobs.stream(Q)) == 0 and r.xpending(jobs.stream(Q), jobs.group(Q))["pending"] == 0
    assert not r.exists(jobs.errors_hash(Q))


# ---- the protocol, without a worker ----------------------------------------------------------------------------

@pytest.mark.parametrize("job,fragment", [
    ({"prompt": "x"}, "'id'="),
    ({"id": "a b", "prompt": "x"}, "'id'='a b' must be"),
    ({"id": "a"}, "exactly one of 'prompt'"),
    ({"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "exactly one of 'prompt'"),
    ({"id": "a", "prompt": [1, "2"]}, "'prompt' must be a string or a non-empty list of token ids"),
    ({"id": "a", "messages": [{"role": "user"}]}, "'messages' must be"),
    ({"id": "a", "prompt": "x", "max_token": 5}, "unknown field(s) ['max_token']"),
    ({"id": "a", "prompt": "x", "max_tokens": -1}, "'max_tokens' must be an integer >= 0, not -1"),
    ({"id": "a", "prompt": "x", "temperature": True}, "'temperature' must be a number in [0, 2], not true"),
    ({"id": "a", "prompt": "x", "top_p": 0}, "'top_p' must be a number in (0, 1]"),
    ({"id": "a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"id": "a", "prompt": "x", "seed": 2**63}, "'seed' must be an integer in [0, 2**63)"),
])
def test_a_bad_job_is_refused_naming_the_field(job, fragment):
    with pytest.raises(UsageError) as e:
        jobs.check_job(job)
    assert fragment in str(e.value), str(e.value)
    full = jobs.new_job("x", job_id="a", max_tokens=3)
    assert full == {"id": "a", "prompt": "x", "max_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                    "seed": None, "stop": []}


@needs_redis
def test_one_result_per_job_id_acknowledged_with_it_and_waiting(server):
    r = jobs.connect(server.url)
    jobs.ensure_group(r, Q)
    for i in range(3):
        r.xadd(jobs.stream(Q), {"job": json.dumps(jobs.new_job("x", job_id="same"))})
    entries = jobs.take(r, Q, "w1", 10)
    assert len(entries) == 3 and len(held_by(r, "w1")) == 3
    with pytest.raises(UsageError, match="no result for job same after 0.2 s"):
        jobs.wait(r, Q, "same", 0.2)
    # the same job finished three times (submitted twice, taken over from a slow worker): the first result stays
    stored = [jobs.finish(r, Q, e, "same", {"id": "same", "text": f"run {k}", "error": None}, ttl=100)
              for k, (e, _) in enumerate(entries)]
    assert stored == [True, False, False] and r.xlen(jobs.result_key(Q, "same")) == 1
    assert jobs.wait(r, Q, "same", 5)["text"] == "run 0" and 90 < r.ttl(jobs.result_key(Q, "same")) <= 100
    assert_drained(r)  # acknowledged and deleted
    assert jobs.submit(r, Q, jobs.new_job("x", job_id="same")) == "same" and r.xlen(jobs.stream(Q)) == 0  # has one
    # a dead letter's client gets its error; a consumer holding nothing is forgotten, one holding a job is not
    jobs.submit(r, Q, jobs.new_job("y", job_id="doomed"))
    (e, _), = jobs.take(r, Q, "w2", 10)
    jobs.finish(r, Q, e, "doomed", {"id": "doomed", "error": "boom"}, dead=("{raw}", "boom"))
    with pytest.raises(UsageError, match="job doomed failed: boom"):
        jobs.wait(r, Q, "doomed", 5)
    assert jobs.dead_letters(r, Q) == [{"job": "{raw}", "error": "boom", "entry": e}]
    # a job the engine failed on stays pending with its error, which its next delivery reads
    jobs.submit(r, Q, jobs.new_job("z"))
    (e, _), = jobs.take(r, Q, "w3", 10)
    jobs.record_error(r, Q, e, "out of memory")
    _, [(again, _, delivered)] = jobs.reclaim(r, Q, "w3", 0)
    assert (again, delivered, jobs.last_error(r, Q, e)) == (e, 2, "out of memory")
    time.sleep(0.05)
    assert jobs.forget_idle_consumers(r, Q, 0.01) == 2
    assert [c["name"] for c in r.xinfo_consumers(jobs.stream(Q), jobs.group(Q))] == ["w3"]


@needs_redis
def test_clients_get_one_line_errors(tmp_path, server):
    one_line_error(run_script("submit.py", f"--redis_url=redis://127.0.0.1:{free_port()}/0", cwd=tmp_path,
                              check=False), "cannot reach Redis at 127.0.0.1:")
    one_line_error(run_script("submit.py", "--redis_url=http://127.0.0.1/", cwd=tmp_path, check=False),
                   "is not a Redis URL")
    one_line_error(run_script("submit.py", "--temperature=5", cwd=tmp_path, check=False),
                   "'temperature' must be a number in [0, 2], not 5")
    one_line_error(run_script("submit.py", f"--redis_url={server.url}", "--timeout=0.3", cwd=tmp_path, check=False),
                   "after 0.3 s; is a worker.py running on queue 'llamaforge'")
    one_line_error(run_script("worker.py", "--claim_idle=0", cwd=tmp_path, check=False), "claim_idle=0.0 must be > 0")
    one_line_error(run_script("worker.py", "--redis_url=ftp://x", cwd=tmp_path, check=False), "is not a Redis URL")
    printed = run_script("submit.py", f"--redis_url={server.url}", "--timeout=0", cwd=tmp_path).stdout.strip()
    queued = [json.loads(f["job"])["id"] for _, f in jobs.connect(server.url).xrange("llamaforge:jobs")]
    assert len(queued) == 2 and queued[1] == printed  # both stay queued for a worker to come


# ---- workers ------------------------------------------------------------------------------------------------

@needs_redis
def test_many_jobs_several_workers_one_killed_mid_job_every_job_one_result(tiny, server):
    root, model, tok = tiny
    r = jobs.connect(server.url)
    victim, *others = [start_worker(root, server, name) for name in ("victim", "w1", "w2")]
    with logs_on_failure(victim, *others):
        ids = [jobs.submit(r, Q, jobs.new_job(f"job {i}:", job_id=f"j{i}", temperature=0, max_tokens=150))
               for i in range(30)]
        held = freeze_holding(r, victim, "victim")
        victim.kill()  # SIGKILL: no chance to store, acknowledge or say goodbye
        victim.wait()
        held_ids = [json.loads(r.xrange(jobs.stream(Q), e, e)[0][1]["job"])["id"] for e in held]
        results = {i: jobs.wait(r, Q, i, 60) for i in ids}
        for i in ids:
            assert r.xlen(jobs.result_key(Q, i)) == 1, i  # exactly one result
        assert_drained(r)
        assert not r.exists(jobs.dead_stream(Q))
        assert all(results[i]["worker"] in ("w1", "w2") for i in held_ids), held_ids
        assert {res["worker"] for res in results.values()} >= {"w1", "w2"}
        for p in others:
            stop_worker(p)
        taken_over = [int(p.log.read_text().rsplit(" taken over", 1)[0].rsplit(", ", 1)[1]) for p in others]
        assert sum(taken_over) == len(held), (held, [p.log.read_text() for p in others])
        # the texts are the model's own: those the dead worker held as much as the others
        for i in held_ids[:2] + ["j0", "j29"]:
            k = int(i[1:])
            assert results[i]["text"] == greedy_text(model, tok, f"job {k}:", 150), i
            assert results[i]["completion_tokens"] == 150 and results[i]["finish_reason"] == "length"


@needs_redis
def test_bad_jobs_go_to_the_dead_letters_with_their_error_and_the_worker_survives_redis_going_away(tiny, server):
    root, model, tok = tiny
    r = jobs.connect(server.url)
    jobs.ensure_group(r, Q)  # a job two workers took and died with: its third delivery is one too many
    jobs.submit(r, Q, jobs.new_job("ghost", job_id="ghost"))
    (ghost, _), = jobs.take(r, Q, "dead1", 1)
    r.xclaim(jobs.stream(Q), jobs.group(Q), "dead2", 0, [ghost])
    worker = start_worker(root, server, "w", "--max_deliveries=2")
    with logs_on_failure(worker):
        bad = [({"job": "{nope"}, None, "malformed job: the job is not JSON"),
               ({"task": "x"}, None, "malformed job: the stream entry has no 'job' field"),
               ({"job": '{"id": "neg", "prompt": "x", "max_tokens": -3}'}, "neg",
                "malformed job: 'max_tokens' must be an integer >= 0, not -3"),
               ({"job": json.dumps({"id": "long", "prompt": [5] * 1100})}, "long",
                "the prompt is 1101 tokens but the model's context is 1024"),
               ({"job": json.dumps({"id": "chat", "messages": [{"role": "robot", "content": "hi"}]})}, "chat",
                "message 0 needs a role of user/assistant/system")]
        entries = {r.xadd(jobs.stream(Q), fields): (job_id, error) for fields, job_id, error in bad}
        for _ in range(2):  # one id queued twice runs to one result
            r.xadd(jobs.stream(Q), {"job": json.dumps(jobs.new_job("twice", job_id="twice", temperature=0))})
        good = jobs.submit(r, Q, jobs.new_job("after the bad ones", temperature=0, max_tokens=20))
        assert jobs.wait(r, Q, good, 60)["text"] == greedy_text(model, tok, "after the bad ones", 20)
        jobs.wait(r, Q, "twice", 60)
        wait_for(lambda: r.xlen(jobs.dead_stream(Q)) == len(bad) + 1, 30, "the dead letters")
        dead = {d["entry"]: d for d in jobs.dead_letters(r, Q)}
        for entry, (job_id, error) in entries.items():
            assert error in dead[entry]["error"], (error, dead[entry])
            if job_id:  # its client waits under that id: it gets the error instead of a timeout
                with pytest.raises(UsageError, match=f"job {job_id} failed: "):
                    jobs.wait(r, Q, job_id, 5)
        assert "delivered 3 times without a result: its workers died" in dead[ghost]["error"]
        assert json.loads(dead[ghost]["job"])["prompt"] == "ghost"  # the job itself, to resubmit once fixed
        assert r.xlen(jobs.result_key(Q, "twice")) == 1
        wait_for(lambda: "1 duplicates" in worker.log.read_text(), 5, "the duplicate counted")
        assert_drained(r)

        # Redis goes away while a job runs (and comes back empty: persistence is off): the worker waits with back-off,
        # stores the result once it can, and takes new jobs
        jobs.submit(r, Q, jobs.new_job("a long one", job_id="long-job", temperature=0, max_tokens=1000))
        freeze_holding(r, worker, "w", renewed=True)  # mid-job, so the job is still running when Redis goes
        server.kill()
        worker.send_signal(signal.SIGCONT)
        wait_for(lambda: worker.log.read_text().count("retrying in") >= 3, 30, "three retries")
        server.start()
        assert jobs.wait(r, Q, "long-job", 60)["text"] == greedy_text(model, tok, "a long one", 1000)
        after = jobs.submit(r, Q, jobs.new_job("after the outage", temperature=0, max_tokens=20))
        assert jobs.wait(r, Q, after, 30)["text"] == greedy_text(model, tok, "after the outage", 20)
        log = worker.log.read_text()
        delays = [float(d) for d in re.findall(r"retrying in ([\d.]+) s", log)]
        assert delays[:3] == [0.1, 0.2, 0.4] and "is back" in log and worker.poll() is None, log
        stop_worker(worker)
