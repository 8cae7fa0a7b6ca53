"""The Redis job queue between clients (submit.py, or submit() and wait() from Python) and worker.py.

A job is one generation, a JSON object {"id", "prompt" or "messages", "max_tokens", "temperature", "top_p",
"top_k", "seed", "stop"} added to the stream <queue>:jobs. Workers read it through the consumer group
<queue>:workers and run it on engine.py; then one Lua script (atomic in Redis) stores the result as the only
entry of the stream <queue>:result:<id> (kept ttl seconds), acknowledges the job and deletes it from <queue>:jobs.
So a job is acknowledged only once its result is stored, and a job that runs twice (submitted twice, or taken
over from a worker that was only slow) still stores one result. A client waits with XREAD BLOCK on the result
stream: no polling, any number of clients may wait for one id, and a result that is already there returns at once.
A job held by a dead worker is taken over by a live one after an idle timeout (XAUTOCLAIM; live workers renew
their jobs); a job delivered too often, or one that can never run (malformed, a prompt longer than the context),
goes to <queue>:dead with its error, and its client gets the error as the result.

Needs Redis >= 6.2 (XAUTOCLAIM) and redis-py. Imports no torch: a client needs only this file, runtime and redis.
"""
import json
import re
import time
import uuid
from contextlib import contextmanager

from runtime import UsageError

FIELDS = ("id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
NAME = re.compile(r"[A-Za-z0-9._:{}-]{1,128}")  # queue names and job ids: safe inside a key, readable in redis-cli
NUMBER = (int, float)
BLOCK_MS = 1000  # longest single blocking read: well under the socket timeout, so a dead server shows up as an error

# store the result unless one exists, dead-letter if asked, acknowledge, delete: all or nothing
FINISH = """
local stored = 0
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XADD', KEYS[2], '*', 'result', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  stored = 1
end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[3], '*', 'job', ARGV[6], 'error', ARGV[7], 'entry', ARGV[2])
end
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return stored
"""

FORGET = """
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    gone = gone + 1
  end
end
return gone
"""


# ---- names ------------------------------------------------------------------------------------------

def check_name(what, name):
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise UsageError(f"{what}={name!r} must be 1 to 128 letters, digits or . _ : - {{ }}")
    return name


def stream(queue):
    return f"{queue}:jobs"


def group(queue):
    return f"{queue}:workers"


def dead_stream(queue):
    return f"{queue}:dead"


def errors_hash(queue):  # the last error of a job left for a retry, by stream entry: what its dead letter will say
    return f"{queue}:errors"


def result_key(queue, job_id):
    return f"{queue}:result:{job_id}"


# ---- connecting ---------------------------------------------------------------------------------------

def connect(url):
    """A client for url (redis://[:password@]host:port/db, rediss:// for TLS, unix://path). Nothing is sent yet.
    Its own retries are one immediate reconnect (a pooled connection the server closed); longer outages are the
    caller's to wait out, so that a worker can say it is waiting."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    if not isinstance(url, str) or not url:
        raise UsageError("the Redis URL is empty; pass --redis_url=redis://HOST:PORT/DB")
    try:
        return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10,
                                    retry=Retry(NoBackoff(), 1), health_check_interval=30)
    except ValueError as e:  # a scheme it does not know, a db that is not a number
        raise UsageError(f"redis_url={url!r} is not a Redis URL ({e}); write redis://HOST:PORT/DB")


def where(r):
    """host:port/db of a client, without its password (for messages)."""
    kw = r.connection_pool.connection_kwargs
    return kw["path"] if "path" in kw else f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


@contextmanager
def reaching(r):
    """Redis errors as one-line UsageErrors, for clients (a worker tells outages from mistakes itself)."""
    import redis
    try:
        yield
    except redis.AuthenticationError as e:
        raise UsageError(f"Redis at {where(r)} refused the credentials ({e}); put them in the URL: "
                         f"redis://USER:PASSWORD@HOST:PORT/DB")
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise UsageError(f"cannot reach Redis at {where(r)} ({e}); start redis-server or fix the URL")
    except redis.ResponseError as e:
        raise UsageError(f"Redis at {where(r)} answered: {e}")


# ---- the job schema ---------------------------------------------------------------------------------------

def _field(job, key, kinds, default, ok, want):
    v = job.get(key)
    if v is None:
        return default
    if isinstance(v, bool) != (bool in kinds) or not isinstance(v, kinds) or not ok(v):
        raise UsageError(f"'{key}' must be {want}, not {json.dumps(v)[:60]}")
    return v


def _is_ids(x):
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def check_job(job):
    """The job with every field present (None: the worker's default), or a UsageError naming the first bad one."""
    if not isinstance(job, dict):
        raise UsageError(f"a job must be a JSON object, not {type(job).__name__}")
    unknown = sorted(set(job) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown field(s) {unknown}; a job has {', '.join(FIELDS)}")
    check_name("'id'", job.get("id"))
    prompt, messages = job.get("prompt"), job.get("messages")
    if (prompt is None) == (messages is None):
        raise UsageError("a job needs exactly one of 'prompt' (text or token ids) and 'messages' (a chat)")
    if prompt is not None and not (isinstance(prompt, str) or _is_ids(prompt)):
        raise UsageError(f"'prompt' must be a string or a non-empty list of token ids, not {json.dumps(prompt)[:60]}")
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise UsageError("'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"}")
    stop = job.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise UsageError("'stop' must be a string or a list of at most 4 non-empty strings")
    return {"id": job["id"], **({"prompt": prompt} if prompt is not None else {"messages": messages}),
            "max_tokens": _field(job, "max_tokens", (int,), None, lambda v: v >= 0, "an integer >= 0"),
            "temperature": _field(job, "temperature", NUMBER, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
            "top_p": _field(job, "top_p", NUMBER, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            "top_k": _field(job, "top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
            "seed": _field(job, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
            "stop": stop}


def parse_job(text):
    """A job as a worker reads it off the stream: JSON text, checked by check_job."""
    if not isinstance(text, str):
        raise UsageError("the stream entry has no 'job' field holding the job's JSON")
    try:
        job = json.loads(text)
    except ValueError as e:
        raise UsageError(f"the job is not JSON ({e})")
    return check_job(job)


def job_id_of(text):
    """The id of a job that may be malformed, if it has a usable one: where its client waits for the error."""
    try:
        job = json.loads(text)
        return check_name("id", job.get("id"))
    except (TypeError, ValueError, AttributeError, UsageError):
        return None


def new_job(prompt=None, messages=None, job_id=None, **settings):
    """A checked job: prompt (text or token ids) or messages, settings as in FIELDS; a fresh id unless given."""
    job = {"id": job_id or uuid.uuid4().hex, **({"prompt": prompt} if messages is None else {"messages": messages})}
    return check_job({**job, **settings})


# ---- clients: submit, wait --------------------------------------------------------------------------------

def submit(r, queue, job):
    """Queue a job (checked here, so a mistake is the caller's error, not a dead letter); returns its id. A job
    whose id already has a result is not queued again: waiting for it returns that result."""
    job = check_job(job)
    with reaching(r):
        if not r.exists(result_key(queue, job["id"])):
            r.xadd(stream(queue), {"job": json.dumps(job)})
    return job["id"]


def result(r, queue, job_id):
    """The stored result of a job (a dict), or None if there is none yet (or it expired)."""
    with reaching(r):
        return stored_result(r, queue, job_id)


def wait(r, queue, job_id, timeout):
    """A job's result once it is stored. UsageError if the job failed (its error) or after timeout seconds."""
    return next(wait_all(r, queue, [job_id], timeout))


def wait_all(r, queue, job_ids, timeout):
    """Yields each job's result in order as it is stored, all within timeout seconds; UsageError as in wait()."""
    deadline = time.monotonic() + timeout
    for n, job_id in enumerate(job_ids):
        key = result_key(queue, job_id)
        while True:
            left = deadline - time.monotonic()
            with reaching(r):  # from 0: an entry already there is returned at once, else the first one to arrive
                got = r.xread({key: "0-0"}, count=1, block=max(1, min(BLOCK_MS, int(left * 1000))))
            if got:
                res = json.loads(got[0][1][0][1]["result"])
                if res.get("error"):
                    raise UsageError(f"job {job_id} failed: {res['error']}")
                yield res
                break
            if left <= 0:
                done = f" ({n} of {len(job_ids)} done)" if len(job_ids) > 1 else ""
                raise UsageError(f"no result for job {job_id}{done} after {timeout:g} s; is a worker.py running on "
                                 f"queue '{queue}' at {where(r)}? (the job stays queued; submitting its id again is "
                                 f"safe)")


# ---- workers: take, renew, reclaim, finish -------------------------------------------------------------------

def ensure_group(r, queue):
    """The consumer group, created at the stream's start: jobs queued before any worker existed are delivered."""
    import redis
    try:
        r.xgroup_create(stream(queue), group(queue), id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def take(r, queue, consumer, count, block_ms=None):
    """Up to count new jobs for this consumer [(entry id, fields)], waiting up to block_ms for one if given."""
    got = r.xreadgroup(group(queue), consumer, {stream(queue): ">"}, count=count, block=block_ms)
    return got[0][1] if got else []


def renew(r, queue, consumer, entry_ids):
    """Reset the idle time of jobs this consumer is running, so no live worker takes them over (JUSTID: the
    delivery count stays)."""
    if entry_ids:
        r.xclaim(stream(queue), group(queue), consumer, 0, list(entry_ids), justid=True)


def reclaim(r, queue, consumer, idle_s, start="0-0", count=16):
    """Take over jobs no worker has renewed for idle_s seconds: (cursor for the next call, [(entry id, fields,
    times delivered, counting this one)])."""
    cursor, claimed, _ = r.xautoclaim(stream(queue), group(queue), consumer, int(idle_s * 1000), start, count=count)
    out = []
    for entry_id, fields in claimed:
        pending = r.xpending_range(stream(queue), group(queue), entry_id, entry_id, 1)
        out.append((entry_id, fields, pending[0]["times_delivered"] if pending else 1))
    return cursor, out


def stored_result(r, queue, job_id):
    """result() for workers: Redis errors as redis-py raises them (an outage is waited out, not reported)."""
    entries = r.xrange(result_key(queue, job_id), count=1)
    return json.loads(entries[0][1]["result"]) if entries else None


def forget_idle_consumers(r, queue, idle_s):
    """Drop consumers that hold no jobs and have not read for idle_s seconds (workers that died or left): their
    names would otherwise stay in the group forever. Atomic, so a consumer that took a job meanwhile is kept (deleting
    a consumer drops its pending jobs); a live one that is dropped comes back at its next read. Returns how many."""
    return r.register_script(FORGET)(keys=[stream(queue)], args=[group(queue), int(idle_s * 1000)])


def record_error(r, queue, entry_id, error):
    """Note why a job failed; it stays pending, so it is retried after the idle timeout, and dead-lettered with
    this error once it has been delivered too often."""
    r.hset(errors_hash(queue), entry_id, error)


def last_error(r, queue, entry_id):
    return r.hget(errors_hash(queue), entry_id)


def finish(r, queue, entry_id, job_id=None, res=None, ttl=86400, dead=None):
    """In one atomic step: store res (a dict) as job_id's result unless it has one, add dead (the job's raw text,
    the error) to the dead-letter stream if given, acknowledge and delete the entry. True if res was stored."""
    key = result_key(queue, job_id) if job_id else result_key(queue, "-")
    job_text, error = dead or ("", "")
    return bool(r.register_script(FINISH)(
        keys=[stream(queue), key, dead_stream(queue), errors_hash(queue)],
        args=[group(queue), entry_id, json.dumps(res) if res is not None and job_id else "", int(ttl),
              "1" if dead else "0", job_text or "", error]))


def dead_letters(r, queue, count=100):
    """The newest dead-lettered jobs: [{"entry", "job" (its raw text), "error"}], newest first."""
    with reaching(r):
        return [fields for _, fields in r.xrevrange(dead_stream(queue), count=count)]
