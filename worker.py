"""Run generation jobs from a Redis queue (jobs.py) on the batching engine. Any number of workers, on one machine or
many, share a queue; each holds up to max_batch jobs, decoded together. A job is acknowledged only once its result is
stored; a killed worker's jobs are taken over by the others after claim_idle seconds; Redis going away makes it wait
and retry (back-off doubling up to max_backoff), never exit. SIGTERM: finish the jobs in hand, then exit.

    redis-server --save '' --port 6379 &
    python worker.py --checkpoint=out/demo --redis_url=redis://127.0.0.1:6379/0
    python submit.py --prompt="Once upon a time" --max_tokens=40
"""
import os
import sys

checkpoint = "out/ckpt.pt"      # our ckpt.pt (or its run directory), a llama2.c .bin, or a Hugging Face folder
adapter = ""                    # a LoRA run's ckpt.pt applied on top of --checkpoint (its base)
tokenizer = ""                  # instead of the checkpoint's: a SentencePiece .model, 'gpt2', or a llama2.c .bin
device = "auto"                 # 'auto', 'cpu', 'cuda', ...
dtype = "auto"                  # 'auto' (bf16 on CUDA where supported, fp32 otherwise), 'float32', 'bfloat16', ...
redis_url = "redis://127.0.0.1:6379/0"  # the Redis server: redis://[:password@]host:port/db (rediss:// for TLS)
queue = "llamaforge"            # key prefix: jobs in <queue>:jobs, results <queue>:result:<id>, failures <queue>:dead
consumer = ""                   # this worker's name in the consumer group; "" = hostname-pid
max_batch = 16                  # jobs decoded together; a worker holds no more than this many at a time
max_tokens = 256                # new tokens when a job sets none (the context's end stops earlier)
add_bos = True                  # start every prompt with BOS unless it does (training documents start with it)
claim_idle = 60.0               # seconds a job may go unrenewed (its worker dead) before a live worker takes it over
max_deliveries = 3              # a job delivered more often than this without a result goes to <queue>:dead
result_ttl = 86400              # seconds a result is kept in Redis
max_backoff = 30.0              # Redis unreachable: retry after 0.1 s, then doubling up to this many seconds
log_interval = 10.0             # seconds between status lines (jobs done, jobs/s, in flight, taken over, dead)
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()
from configurator import configure, require  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from queue import Empty, SimpleQueue  # noqa: E402

import redis  # noqa: E402

import jobs  # noqa: E402
from chat import chat_ids, render_chat  # noqa: E402
from checkpoint import load_any, tokenizer_for  # noqa: E402
from engine import Engine, Request, end_ids  # noqa: E402
from runtime import UsageError, autocast, device_and_dtype  # noqa: E402

POLL = 0.01  # seconds between looks for new jobs while some run: a new one joins the batch this much later at most


class Worker:
    """The loop of one worker: take jobs, hand them to the engine, store what it finishes, renew and reclaim.
    The engine's thread only puts finished entry ids into self.done; everything that talks to Redis runs here."""

    def __init__(self, r, engine, tok, name):
        self.r, self.engine, self.tok, self.name = r, engine, tok, name
        self.running = {}  # entry id -> (job, engine request, time taken): the jobs this worker holds
        self.done, self.to_store = SimpleQueue(), []  # finished entries, from the engine's thread; not yet stored
        self.tick = claim_idle / 4  # renew our jobs 4 times per claim_idle: a busy worker's job is never taken
        self.next_tick, self.cursor, self.group_ready = 0.0, "0-0", False
        self.stopping, self.wake = False, threading.Event()
        self.counts = dict(done=0, dead=0, retried=0, taken_over=0, duplicates=0)
        self.t_log, self.logged = time.time(), dict(self.counts)
        self.ends = end_ids(tok)  # EOS, and BOS: it starts another document, as serve.py stops

    # ---- one job

    def request_for(self, job):
        """The engine request of a checked job: its prompt encoded (BOS in front) or its chat rendered."""
        if "messages" in job:
            ids, stops = render_chat(self.tok, job["messages"], add_generation_prompt=True)[0], \
                [chat_ids(self.tok)[2], *self.ends]
        else:
            p = job["prompt"]
            ids, stops = self.tok.encode(p) if isinstance(p, str) else list(p), self.ends
            ids = [self.tok.bos_id] + ids if add_bos and (not ids or ids[0] != self.tok.bos_id) else ids
        return Request(ids, max_tokens if job["max_tokens"] is None else job["max_tokens"], job["temperature"],
                       job["top_k"] or None, job["top_p"], job["seed"], stop_ids=stops, stop=job["stop"])

    def start(self, entry_id, fields, delivered=1):
        if entry_id in self.running:  # our own job, reclaimed because we were too slow to renew it: it runs already
            return
        raw = (fields or {}).get("job")
        try:
            job = jobs.parse_job(raw)
        except UsageError as e:
            return self.dead_letter(entry_id, raw, jobs.job_id_of(raw), f"malformed job: {e}")
        if jobs.stored_result(self.r, queue, job["id"]) is not None:  # it ran already (queued twice, taken over late)
            self.counts["duplicates"] += 1
            return jobs.finish(self.r, queue, entry_id)
        if delivered > max_deliveries:
            error = jobs.last_error(self.r, queue, entry_id) or "its workers died or stopped while running it"
            return self.dead_letter(entry_id, raw, job["id"], f"delivered {delivered} times without a result: {error}")
        try:
            req = self.request_for(job)
            req.on_done = lambda _, e=entry_id: self.done.put(e)
            self.engine.submit(req)  # never full: the engine's queue holds max_batch and we hold no more jobs
        except UsageError as e:  # a prompt longer than the context, token ids outside the vocabulary, a bad role
            return self.dead_letter(entry_id, raw, job["id"], str(e))
        self.running[entry_id] = (job, req, time.time())

    def dead_letter(self, entry_id, raw, job_id, error):
        res = {"id": job_id, "text": "", "finish_reason": "error", "error": error, "worker": self.name}
        jobs.finish(self.r, queue, entry_id, job_id, res, result_ttl, dead=(raw, error))
        self.counts["dead"] += 1
        print(f"job {job_id or entry_id} -> {jobs.dead_stream(queue)}: {error}", file=sys.stderr, flush=True)

    def store(self):
        """Store every finished job's result (and acknowledge it). One that failed in the engine stays pending with
        its error noted: it is retried after claim_idle, by any worker, until max_deliveries."""
        while True:
            try:
                self.to_store.append(self.done.get_nowait())
            except Empty:
                break
        while self.to_store:  # one at a time: if Redis goes away midway the rest wait here, not lost
            entry_id = self.to_store[0]
            job, req, t0 = self.running[entry_id]
            if req.finish_reason == "error":
                jobs.record_error(self.r, queue, entry_id, req.error)
                self.counts["retried"] += 1
            else:
                stored = jobs.finish(self.r, queue, entry_id, job["id"], {
                    "id": job["id"], "text": req.text, "finish_reason": req.finish_reason, "error": None,
                    "prompt_tokens": len(req.ids), "completion_tokens": len(req.completion_ids()),
                    "worker": self.name, "seconds": round(req.t_done - t0, 4)}, result_ttl)
                self.counts["done" if stored else "duplicates"] += 1  # another run of its id stored first
            del self.running[entry_id]
            self.to_store.pop(0)

    # ---- the loop

    def maintain(self):
        """Renew our jobs, take over those of silent workers, forget long-gone workers."""
        jobs.renew(self.r, queue, self.name, self.running)
        free = max_batch - len(self.running)
        if free > 0 and not self.stopping:
            self.cursor, claimed = jobs.reclaim(self.r, queue, self.name, claim_idle, self.cursor, free)
            for entry_id, fields, delivered in claimed:
                if entry_id not in self.running:
                    self.counts["taken_over"] += 1
                self.start(entry_id, fields, delivered)
        jobs.forget_idle_consumers(self.r, queue, 10 * claim_idle)

    def step(self):
        if not self.group_ready:
            jobs.ensure_group(self.r, queue)
            self.group_ready = True
        self.store()
        if time.monotonic() >= self.next_tick:
            self.maintain()
            self.next_tick = time.monotonic() + self.tick
        free, got = max_batch - len(self.running), []
        if free > 0 and not self.stopping:  # block only when idle: while jobs run, their results must not wait
            got = jobs.take(self.r, queue, self.name, free, None if self.running else int(min(1.0, self.tick) * 1000))
            for entry_id, fields in got:
                self.start(entry_id, fields)
        if self.running and not got:
            try:  # sleep until a job finishes, or (with room for more) until it is time to look for new ones
                self.to_store.append(self.done.get(timeout=POLL if free > 0 else self.tick))
            except Empty:
                pass

    def run(self):
        backoff, down, said = 0.1, False, False
        while not (self.stopping and not self.running):
            if self.stopping and not said:
                print(f"SIGTERM: finishing {len(self.running)} jobs in hand, then exiting", flush=True)
                said = True
            try:
                self.step()
                if down:
                    print(f"Redis at {jobs.where(self.r)} is back; {len(self.running)} jobs in hand", flush=True)
                backoff, down = 0.1, False
            except redis.AuthenticationError as e:  # a ConnectionError, but waiting will not fix it
                raise UsageError(f"Redis at {jobs.where(self.r)} refused the credentials ({e}); put them in the "
                                 f"URL: redis://USER:PASSWORD@HOST:PORT/DB")
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError) as e:
                print(f"warning: Redis at {jobs.where(self.r)} unreachable ({e}); retrying in {backoff:.1f} s "
                      f"({len(self.running)} jobs in hand)", file=sys.stderr, flush=True)
                self.wake.wait(backoff)  # the engine keeps decoding meanwhile; SIGTERM cuts the wait short
                backoff, down = min(2 * backoff, max_backoff), True
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):  # e.g. WRONGTYPE: the queue's keys hold something else
                    raise UsageError(f"Redis at {jobs.where(self.r)} answered: {e}; pick another --queue")
                self.group_ready = False  # Redis restarted empty (or someone deleted the stream): recreate it
            self.log()
        self.log(force=True)

    def log(self, force=False):
        now = time.time()
        if not force and now - self.t_log < log_interval or self.counts == self.logged:
            return
        rate = (self.counts["done"] - self.logged["done"]) / max(now - self.t_log, 1e-9)
        print(f"jobs: {self.counts['done']} done ({rate:.1f}/s), {len(self.running)} running, "
              f"{self.counts['taken_over']} taken over, {self.counts['retried']} failed (retried), "
              f"{self.counts['dead']} dead, {self.counts['duplicates']} duplicates", flush=True)
        self.t_log, self.logged = now, dict(self.counts)

    def stop(self, signum, frame):  # only flags: printing here could land inside a print of the loop's
        self.stopping = True
        self.wake.set()


def main():
    require(config, positive=("max_batch", "max_tokens", "claim_idle", "max_deliveries", "result_ttl", "max_backoff",
                              "log_interval"))
    jobs.check_name("queue", queue)
    if consumer:
        jobs.check_name("consumer", consumer)
    r = jobs.connect(redis_url)  # a bad URL stops here, before the model loads
    dev, dev_type, dt = device_and_dtype(device, dtype)
    model, ckpt = load_any(checkpoint, adapter, dev)
    tok = tokenizer_for(ckpt, tokenizer, model.args.vocab_size)
    engine = Engine(model, tok, max_batch, max_batch, autocast=autocast(dev_type, dt))
    engine.start()
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    worker = Worker(r, engine, tok, name)
    signal.signal(signal.SIGTERM, worker.stop)
    print(f"worker {name}: {model.num_params() / 1e6:.1f}M parameters on {dev}, up to {max_batch} jobs at a time "
          f"from {jobs.stream(queue)} at {jobs.where(r)}", flush=True)
    try:
        worker.run()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
