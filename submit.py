"""Submit generation jobs to the Redis queue worker.py serves, wait for their results and print them.

    python submit.py --prompt="Once upon a time" --max_tokens=40
    python submit.py --prompt="Once upon a time" --repeat=200     # throughput: jobs/s, tokens/s

From Python: jobs.submit(r, queue, jobs.new_job("Once upon a time", max_tokens=40)) then jobs.wait(r, queue, id, 60).
"""
import sys

redis_url = "redis://127.0.0.1:6379/0"  # the Redis server: redis://[:password@]host:port/db (rediss:// for TLS)
queue = "llamaforge"            # the workers' queue (the key prefix they were started with)
prompt = "Once upon a time"     # the prompt text
chat = False                    # send the prompt as one user message through the chat template (for a chat model)
job_id = ""                     # "" = a new id; an id that already has a result returns that result (idempotent)
max_tokens = -1                 # new tokens; -1 = the worker's max_tokens
temperature = 1.0               # sampling temperature; 0 = greedy
top_k = 0                       # sample among the k most likely tokens; 0 = all
top_p = 1.0                     # nucleus sampling: among the most likely tokens that hold this much probability
seed = -1                       # sampling seed (the same seed gives the same text); -1 = none; with repeat: seed + i
stop = ()                       # up to 4 strings that end the text (never part of it), e.g. "('\n\n',)"
timeout = 300.0                 # seconds to wait for the results; 0 = print the job ids and do not wait
repeat = 1                      # submit this many jobs at once, wait for all, print jobs/s and tokens/s
print_json = False              # print each result as a JSON line (text, finish_reason, token counts, worker)
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()
from configurator import configure, require  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import jobs  # noqa: E402
from runtime import check  # noqa: E402


def main():
    require(config, positive=("repeat",), non_negative=("timeout",))
    check(max_tokens >= -1 and seed >= -1, f"max_tokens={max_tokens} and seed={seed} must be >= 0 (or -1: unset)")
    check(repeat == 1 or not job_id, "job_id names one job; leave it empty with repeat > 1")
    jobs.check_name("queue", queue)
    settings = dict(max_tokens=None if max_tokens < 0 else max_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, stop=list(stop))
    content = dict(messages=[{"role": "user", "content": prompt}]) if chat else dict(prompt=prompt)
    todo = [jobs.new_job(**content, job_id=job_id or None, seed=None if seed < 0 else seed + i, **settings)
            for i in range(repeat)]  # every job is checked before the first is sent
    r = jobs.connect(redis_url)
    t0 = time.perf_counter()
    ids = [jobs.submit(r, queue, job) for job in todo]
    if timeout == 0:
        print("\n".join(ids))
        return
    results = []
    for res in jobs.wait_all(r, queue, ids, timeout):
        results.append(res)
        if print_json:
            print(json.dumps(res), flush=True)
        elif repeat == 1:
            print(res["text"])
    seconds = time.perf_counter() - t0
    if repeat > 1:
        tokens = sum(res.get("completion_tokens", 0) for res in results)
        workers = Counter(res.get("worker") for res in results)
        print(f"{repeat} jobs in {seconds:.2f} s: {repeat / seconds:.1f} jobs/s, {tokens / seconds:.0f} new tokens/s "
              f"({tokens / repeat:.1f} per job); by worker: {dict(workers)}",
              file=sys.stderr if print_json else sys.stdout)  # stdout stays JSON lines


if __name__ == "__main__":
    main()
