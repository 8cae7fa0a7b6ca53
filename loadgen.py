"""Load a running serve.py with concurrent clients and report what it sustains.

    python serve.py --checkpoint=out/demo &
    python loadgen.py --url=http://127.0.0.1:8000 --clients=1,8,32 --duration=10

Each level runs `clients` threads for `duration` seconds; each thread sends /v1/completions requests one after
another on its own keep-alive connection (a 429 makes it wait the Retry-After the server asks for). Reported per
level: requests/s, output tokens/s (from each response's usage), p50/p99 latency of the answered requests, and every
status that was not 200. Any failure other than a 429 makes the exit status non-zero.
"""
import sys

url = "http://127.0.0.1:8000"   # the server to load
api_key = ""                    # the server's API key, if it has one; "" = $LLAMAFORGE_API_KEY
model = ""                      # model id to send; "" = the first one /v1/models lists
clients = (1, 8, 32)            # concurrency levels, run one after another
duration = 10.0                 # seconds each level keeps sending new requests
prompt = "Once upon a time"     # every request's prompt
max_tokens = 64                 # new tokens per request (fewer where the model stops by itself)
temperature = 0.8               # sampling temperature; each request gets its own seed, so runs repeat
timeout = 300.0                 # seconds a client waits for one answer
json_out = ""                   # also write the results to this JSON file
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()
from configurator import configure, require  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

import http.client  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from runtime import UsageError, check, check_output, write_text  # noqa: E402


def connect():
    parts = urlsplit(url)
    check(parts.scheme in ("http", "https") and parts.hostname, f"url={url!r} is not an http(s) URL")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), timeout=timeout)


def call(conn, method, path, body=None):
    """(status, parsed JSON or None, headers) of one request on a keep-alive connection."""
    key = api_key or os.environ.get("LLAMAFORGE_API_KEY", "")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw), resp.headers
    except ValueError:
        return resp.status, None, resp.headers


def client(deadline, seeds, name, results):
    """Send requests until the deadline; append (status, seconds, output tokens) for each."""
    conn = connect()
    while time.time() < deadline:
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "seed": next(seeds)}
        t0 = time.perf_counter()
        try:
            status, answer, headers = call(conn, "POST", "/v1/completions", body)
        except (OSError, http.client.HTTPException) as e:  # a dropped connection counts as a failure, then reconnect
            results.append((f"{type(e).__name__}", time.perf_counter() - t0, 0))
            conn.close()
            conn = connect()
            continue
        tokens = answer["usage"]["completion_tokens"] if status == 200 else 0
        results.append((status, time.perf_counter() - t0, tokens))
        if status == 429:  # the queue is full: wait as the server asks, like a polite client
            time.sleep(min(float(headers.get("Retry-After") or 1), max(0.0, deadline - time.time())))
    conn.close()


def percentile(values, q):
    """The q-th percentile by nearest rank (no interpolation: with few samples it is one of them)."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q / 100 * len(values) + 0.5)) - 1))] if values else 0.0


def level(n, seeds, name):
    results, deadline = [], time.time() + duration
    threads = [threading.Thread(target=client, args=(deadline, seeds, name, results)) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [(s, tk) for status, s, tk in results if status == 200]
    others = {}
    for status, _, _ in results:
        if status != 200:
            others[str(status)] = others.get(str(status), 0) + 1
    return {"clients": n, "requests": len(ok), "seconds": round(wall, 2), "requests_per_s": len(ok) / wall,
            "output_tokens_per_s": sum(tk for _, tk in ok) / wall, "p50_s": percentile([s for s, _ in ok], 50),
            "p99_s": percentile([s for s, _ in ok], 99), "not_200": others}


def main():
    require(config, positive=("duration", "max_tokens", "timeout"), non_negative=("temperature",))
    check(clients and all(isinstance(c, int) and c >= 1 for c in clients),
          f"clients={clients!r} must be positive whole numbers, e.g. --clients=1,8,32")
    if json_out:
        check_output(json_out, "json_out")
    conn = connect()
    try:
        status, listing, _ = call(conn, "GET", "/v1/models")
    except OSError as e:
        raise UsageError(f"cannot reach {url} ({e.strerror or e}); start python serve.py first or fix --url")
    check(status == 200, f"{url}/v1/models answered {status} ({listing}); check --url and --api_key")
    name = model or listing["data"][0]["id"]
    seeds = itertools.count()  # next() on it is atomic under the GIL: each request a different seed
    status, answer, _ = call(conn, "POST", "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 4})
    check(status == 200, f"a first request answered {status}: {answer}")  # also warms the server up
    print(f"{url}, model {name}: {max_tokens} new tokens per request, {duration:g} s per level")
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'out tok/s':>9} {'x 1st':>6} {'p50 s':>7} {'p99 s':>7}  other")
    rows = []
    for n in clients:
        r = level(n, seeds, name)
        rows.append(r)
        gain = r["output_tokens_per_s"] / max(rows[0]["output_tokens_per_s"], 1e-9)
        print(f"{n:>7} {r['requests']:>8} {r['requests_per_s']:>7.2f} {r['output_tokens_per_s']:>9.1f} {gain:>6.2f} "
              f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f}  {r['not_200'] or ''}", flush=True)
    out = {"url": url, "model": name, "max_tokens": max_tokens, "duration": duration, "levels": rows}
    print(json.dumps(out))
    if json_out:
        write_text(json_out, json.dumps(out, indent=1))
    failed = {k: v for r in rows for k, v in r["not_200"].items() if k != "429"}
    check(not failed, f"requests failed under load: {failed} (429, a full queue, is the only expected refusal)")


if __name__ == "__main__":
    main()
