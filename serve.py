"""Serve a checkpoint over HTTP with OpenAI's API; concurrent requests are decoded together (engine.py).

    python serve.py --checkpoint=out/demo --port=8000
    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
         -d '{"model": "demo", "prompt": "Once upon a time", "max_tokens": 40}'

/v1/{models,completions,chat/completions} follow OpenAI's API as vLLM and llama.cpp implement it; /tokenize,
/detokenize and /tokenizer_info are vLLM's (lm-evaluation-harness uses them); /health is 503 until the model is loaded;
/metrics is Prometheus text.
"""
import os
import sys

checkpoint = "out/ckpt.pt"      # our ckpt.pt (or its run directory), a llama2.c .bin, or a Hugging Face folder
adapter = ""                    # a LoRA run's ckpt.pt to apply on top of --checkpoint (its base)
tokenizer = ""                  # instead of the checkpoint's: a SentencePiece .model, 'gpt2', or a llama2.c .bin
model_name = ""                 # the model id clients send; "" = the checkpoint's run folder (or file) name
host = "127.0.0.1"              # listen address; 0.0.0.0 opens the server to the network (set an api_key then)
port = 8000                     # 0 = any free port (the address is printed)
api_key = ""                    # clients must send 'Authorization: Bearer KEY'; "" = $LLAMAFORGE_API_KEY, unset = open
device = "auto"                 # 'auto', 'cpu', 'cuda', ...
dtype = "auto"                  # 'auto' (bf16 on CUDA where supported, fp32 otherwise), 'float32', 'bfloat16', ...
max_batch = 16                  # requests decoded together (each holds a row of the KV cache); others wait
queue_size = 64                 # requests that may wait for a row; more get 429 with Retry-After
max_tokens = 256                # new tokens when a request sets none (the context's end stops earlier)
add_bos = True                  # start every prompt with BOS unless it does (training documents start with it)
log_level = "warning"           # uvicorn's; 'info' logs every request
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()
from configurator import configure, require  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

import asyncio  # noqa: E402
import hmac  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import uvicorn  # noqa: E402
import prometheus_client as prom  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from chat import chat_ids, render_chat  # noqa: E402
from checkpoint import load_any, tokenizer_for  # noqa: E402
from engine import Engine, Request, end_ids  # noqa: E402
from runtime import UsageError, autocast, check, device_and_dtype  # noqa: E402

S = SimpleNamespace(engine=None, tok=None, name="", context=0, specials={}, error=None)  # filled by load()
KEY = api_key or os.environ.get("LLAMAFORGE_API_KEY", "")
MAX_BODY = 16 << 20  # bytes: a batch of prompts that fill the context is far smaller
NUMBER = (int, float)

prom.disable_created_metrics()  # no *_created series beside every counter: half the text, nothing lost
REGISTRY, BUCKETS = prom.CollectorRegistry(), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
REQUESTS = prom.Counter("llamaforge_requests", "HTTP requests by route, status", ["route", "status"], registry=REGISTRY)
FINISHED = prom.Counter("llamaforge_generations", "generations by finish reason", ["reason"], registry=REGISTRY)
PROMPT_TOKENS = prom.Counter("llamaforge_prompt_tokens", "prompt tokens prefilled", registry=REGISTRY)
OUTPUT_TOKENS = prom.Counter("llamaforge_generation_tokens", "new tokens generated", registry=REGISTRY)
prom.Gauge("llamaforge_queue_depth", "requests waiting for a batch row", registry=REGISTRY).set_function(
    lambda: len(S.engine.waiting) if S.engine else 0)
prom.Gauge("llamaforge_running_requests", "requests in the running batch", registry=REGISTRY).set_function(
    lambda: len(S.engine.active) if S.engine else 0)
LATENCY = prom.Histogram("llamaforge_request_latency_seconds", "submit to done", buckets=BUCKETS, registry=REGISTRY)
FIRST_TOKEN = prom.Histogram("llamaforge_time_to_first_token_seconds", "submit to first token (or end)",
                             buckets=BUCKETS, registry=REGISTRY)


class ApiError(Exception):
    """An OpenAI-shaped error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status, message, kind="invalid_request_error", code="invalid_value", param=None, retry=False):
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.retry = status, kind, code, param, retry

    def response(self):
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status, headers={"Retry-After": "1"} if self.retry else None)


def route(path, handler, methods=("GET",), key=True, ready=True):
    """A route that checks the API key and that the model is loaded, and turns errors into OpenAI-shaped answers."""
    async def endpoint(request):
        try:
            sent = request.headers.get("authorization", "").encode()
            if key and KEY and not hmac.compare_digest(sent, f"Bearer {KEY}".encode()):
                raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               "authentication_error", "invalid_api_key")
            if ready and S.engine is None:
                raise ApiError(503, "the model is still loading; retry shortly", "service_unavailable",
                               "model_loading", retry=True)
            response = await handler(request)
        except ApiError as e:
            response = e.response()
        except UsageError as e:  # the library's word for a request it cannot run (prompt too long, bad roles, ...)
            response = ApiError(400, str(e)).response()
        REQUESTS.labels(path, str(response.status_code)).inc()
        return response
    return Route(path, endpoint, methods=list(methods))


# ---- reading requests -----------------------------------------------------------------------------

async def read_body(request):
    raw = bytearray()
    async for chunk in request.stream():  # chunk by chunk: a client cannot make us hold a body of any size
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError is one
        raise ApiError(400, f"the request body is not JSON ({e})", code="invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def get(body, key, kinds, default, ok=lambda v: True, want="valid"):
    """body[key] if it has one of the types kinds and passes ok; default if absent or null; else a 400."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) != (bool in kinds) or not isinstance(v, kinds) or not ok(v):
        raise ApiError(400, f"'{key}' must be {want}, not {json.dumps(v)[:60]}", param=key)
    return v


def sampling(body, chat=False):
    """(Request settings, stream, include_usage) as every generation route reads them, each checked: a bad value
    is a 400, never a crash."""
    name = get(body, "model", (str,), S.name, want="a string")
    if name != S.name:
        raise ApiError(400, f"model '{name}' is not served here; this server serves '{S.name}'", code="model_not_found",
                       param="model")
    for key, only in (("n", 1), ("best_of", 1), ("presence_penalty", 0), ("frequency_penalty", 0)):
        if body.get(key) not in (None, only):  # n > 1: send the request n times, with other seeds
            raise ApiError(400, f"'{key}' must be {only} (or absent): other values are not supported",
                           code="unsupported_value", param=key)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    top_k = get(body, "top_k", (int,), -1, lambda v: v >= -1, "-1 or 0 (off), or a positive integer")
    stream = get(body, "stream", (bool,), False, want="true or false")
    options = get(body, "stream_options", (dict,), {}, want="an object")
    if options and not stream:
        raise ApiError(400, "'stream_options' needs 'stream': true", param="stream_options")
    return dict(max_new_tokens=get(body, limit, (int,), max_tokens, lambda v: v >= 0, "an integer >= 0"),
                temperature=get(body, "temperature", NUMBER, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
                top_p=get(body, "top_p", NUMBER, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                top_k=top_k if top_k > 0 else None, stop=stop,
                seed=get(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")), \
        stream, get(options, "include_usage", (bool,), False, want="true or false")


def prompt_list(body):
    """OpenAI's four prompt shapes: a string, strings, a list of token ids, lists of token ids."""
    p = body.get("prompt")
    ids = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa
    if isinstance(p, str) or (p and ids(p)):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or ids(x) for x in p):
        return p
    raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                   param="prompt")


def with_bos(ids):
    """(ids that start with BOS when add_bos asks for it, how many tokens were added in front)"""
    added = int(add_bos and (not ids or ids[0] != S.tok.bos_id))
    return [S.tok.bos_id] * added + list(ids), added


# ---- running requests -----------------------------------------------------------------------------

def observe(r):
    """Metrics of a finished generation; runs in the engine's thread (prometheus_client is thread-safe)."""
    FINISHED.labels(r.finish_reason).inc()
    PROMPT_TOKENS.inc(len(r.ids))
    OUTPUT_TOKENS.inc(len(r.tokens))
    LATENCY.observe(r.t_done - r.t_submit)
    FIRST_TOKEN.observe((r.t_first or r.t_done) - r.t_submit)


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


def head(kind):
    return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": S.name}


def usage(reqs):
    p, c = sum(len(r.ids) for r in reqs), sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def answer(request, reqs, kind, stream, include_usage, chunk, first, final):
    """Queue every request or none (429), then stream server-sent events (first chunks, chunk(i, text, finish) per
    piece of text and per finish, the usage chunk if asked, [DONE]) or wait and return final(). A client that hangs
    up cancels its requests: Starlette stops the stream's generator; a waiting handler looks 4 times a second."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()  # (index, text); text None: that request is done

    def post(item):  # from the engine's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutting down): nobody waits any more
            pass
    for i, r in enumerate(reqs):
        S.engine.check(r)
        r.on_done = lambda r, i=i: (observe(r), post((i, None)))
        r.on_text = (lambda t, i=i: post((i, t))) if stream else None
    for k, r in enumerate(reqs):
        if not S.engine.submit(r):
            for queued in reqs[:k]:
                queued.cancelled = True
            raise ApiError(429, f"the server is busy: {queue_size} requests already wait; retry", "rate_limit_error",
                           "queue_full", retry=True)
    failed = lambda r: {"error": {"message": f"generation failed: {r.error}", "type": "server_error",  # noqa: E731
                                  "param": None, "code": "generation_failed"}}
    top, extra = head(kind), {"usage": None} if include_usage else {}

    async def chunks():
        try:
            for c in first:
                yield sse({**top, "choices": [c], **extra})
            left = len(reqs)
            while left:
                i, text = await events.get()
                left -= text is None
                done = text is None and reqs[i].finish_reason
                yield sse(failed(reqs[i]) if done == "error" else {**top, "choices": [chunk(i, text, done or None)],
                                                                    **extra})
            if include_usage:
                yield sse({**top, "choices": [], "usage": usage(reqs)})
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancelled = r.cancelled or r.finish_reason is None
    if stream:
        return StreamingResponse(chunks(), media_type="text/event-stream")
    left, look = len(reqs), 0.0
    while left:
        if time.monotonic() > look:  # 4 times a second, even while tokens flow: a hang-up frees its rows early
            look = time.monotonic() + 0.25  # (the first look also resumes reading the socket, to see the hang-up)
            if await request.is_disconnected():
                for r in reqs:
                    r.cancelled = True
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        try:
            left -= (await asyncio.wait_for(events.get(), 0.25))[1] is None
        except asyncio.TimeoutError:
            pass
    bad = [r for r in reqs if r.finish_reason == "error"]
    return JSONResponse(failed(bad[0]), 500) if bad else JSONResponse({**top, **final(), "usage": usage(reqs)})


def completion_logprobs(r, added, echo):
    """OpenAI's legacy logprobs object; with echo the prompt's own tokens come first (the first one has none)."""
    ids = r.ids + r.tokens
    rows = [(j, None, None) if j == 0 else (j, *r.prompt_lps[j - 1]) for j in range(added, len(r.ids))] if echo else []
    rows += [(len(r.ids) + k, lp, top) for k, (lp, top) in enumerate(r.token_logprobs)]
    piece = lambda j, t: S.tok.token_bytes(ids[j - 1] if j else None, t).decode("utf-8", "replace")  # noqa: E731
    tokens = [piece(j, ids[j]) for j, _, _ in rows]  # the text each token adds after the one before it
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [None if top is None else {piece(j, t): v for t, v in top} for j, _, top in rows],
            "text_offset": list(itertools.accumulate([0] + [len(t) for t in tokens]))[:-1]}


# ---- routes ---------------------------------------------------------------------------------------

async def completions(request):
    body = await read_body(request)
    settings, stream, include_usage = sampling(body)
    echo = get(body, "echo", (bool,), False, want="true or false")
    n = get(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
    if stream and n is not None:
        raise ApiError(400, "logprobs are not streamed; ask for them without stream", param="logprobs")
    prompts = prompt_list(body)
    encoded = [with_bos(S.tok.encode(p) if isinstance(p, str) else p) for p in prompts]
    texts = [p if isinstance(p, str) else S.tok.decode(p) for p in prompts] if echo else [""] * len(prompts)
    reqs = [Request(ids, stop_ids=end_ids(S.tok), logprobs=n, prompt_logprobs=echo and n is not None, **settings)
            for ids, _ in encoded]

    def chunk(i, text, finish):
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
    return await answer(request, reqs, "text_completion", stream, include_usage, chunk,
                        [chunk(i, t, None) for i, t in enumerate(texts) if t], lambda: {"choices": [
                            {"index": i, "text": texts[i] + r.text, "finish_reason": r.finish_reason, "logprobs":
                             completion_logprobs(r, encoded[i][1], echo) if n is not None else None}
                            for i, r in enumerate(reqs)]})


def message_text(m):
    """A message's content: a string, or OpenAI's list of parts of which only text ones are understood."""
    content = m.get("content") if isinstance(m, dict) else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ApiError(400, "each message needs a role and a string content (or a list of text parts)",
                       param="messages")
    return content


async def chat_completions(request):
    body = await read_body(request)
    settings, stream, include_usage = sampling(body, chat=True)
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    messages = [{"role": "system" if m.get("role") == "developer" else m.get("role"), "content": message_text(m)}
                for m in messages]
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "chat log-probs are not supported; /v1/completions returns them (logprobs, echo)",
                       code="unsupported_value", param="logprobs")
    ids = render_chat(S.tok, messages, add_generation_prompt=True)[0]
    r = Request(ids, stop_ids=[chat_ids(S.tok)[2], *end_ids(S.tok)], **settings)

    def chunk(i, text, finish):
        return {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}
    return await answer(request, [r], "chat.completion.chunk" if stream else "chat.completion", stream,
                        include_usage, chunk, [{**chunk(0, None, None), "delta": {"role": "assistant", "content": ""}}],
                        lambda: {"choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                              "finish_reason": r.finish_reason, "logprobs": None}]})


async def models(request):
    return JSONResponse({"object": "list", "data": [{"id": S.name, "object": "model", "created": int(STARTED),
                                                     "owned_by": "llamaforge", "max_model_len": S.context}]})


async def health(request):  # 503 until the model is loaded (route's check)
    return JSONResponse({"status": "ok", "model": S.name})


async def metrics(request):
    return Response(prom.generate_latest(REGISTRY), media_type=prom.CONTENT_TYPE_LATEST)


def encode_with_specials(text):
    """Like the tokenizer, but BOS's and EOS's own strings ('<s>', '</s>', '<|endoftext|>') become their ids, as
    Hugging Face tokenizers (and so vLLM's /tokenize) do: lm-evaluation-harness finds the EOS id this way."""
    pattern = "(" + "|".join(map(re.escape, S.specials)) + ")"
    return [i for part in re.split(pattern, text) if part
            for i in ([S.specials[part]] if part in S.specials else S.tok.encode(part))]


async def tokenize(request):
    body = await read_body(request)
    special = get(body, "add_special_tokens", (bool,), True, want="true or false")
    ids = encode_with_specials(get(body, "prompt", (str,), "", want="a string"))
    ids = with_bos(ids)[0] if special else ids
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": S.context})


async def detokenize(request):
    ids = (await read_body(request)).get("tokens")
    if not (isinstance(ids, list) and all(isinstance(t, int) and 0 <= t < S.tok.vocab_size for t in ids)):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {S.tok.vocab_size})", param="tokens")
    return JSONResponse({"prompt": S.tok.decode(ids)})


async def tokenizer_info(request):
    names = {i: s for s, i in S.specials.items()}
    return JSONResponse({"tokenizer_class": S.tok.kind, "bos_token": names[S.tok.bos_id],
                         "eos_token": names[S.tok.eos_id], "pad_token": None, "vocab_size": S.tok.vocab_size,
                         "model_max_length": S.context, "add_bos_token": add_bos})


async def http_error(request, exc):  # an unknown route or method
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind, None).response()


async def server_error(request, exc):  # a bug: the client gets JSON, the log gets the traceback
    return ApiError(500, f"internal error ({type(exc).__name__}: {exc})", "server_error", None).response()


app = Starlette(routes=[
    route("/v1/models", models), route("/v1/completions", completions, ("POST",)),
    route("/v1/chat/completions", chat_completions, ("POST",)), route("/health", health, key=False),
    route("/metrics", metrics, key=False, ready=False), route("/tokenize", tokenize, ("POST",)),
    route("/detokenize", detokenize, ("POST",)), route("/tokenizer_info", tokenizer_info)],
    exception_handlers={HTTPException: http_error, Exception: server_error})
STARTED = time.time()


def special_name(tok, i):  # the string of BOS or EOS; a llama2.c tokenizer.bin has fixed ids
    return tok.backend.id_to_piece(i) if tok.kind == "sentencepiece" else tok.backend.decode_single_token_bytes(
        i).decode() if tok.kind == "tiktoken" else {1: "<s>", 2: "</s>"}.get(i, f"<{i}>")


def load(server):
    """Load the model while the port already answers (503 until then); a failure stops the server."""
    try:
        dev, dev_type, dt = device_and_dtype(device, dtype)
        model, ckpt = load_any(checkpoint, adapter, dev)
        tok = tokenizer_for(ckpt, tokenizer, model.args.vocab_size)
        path = os.path.abspath(checkpoint).rstrip("/").removesuffix("/ckpt.pt")  # a run folder's name, or the file's
        S.name = model_name or os.path.splitext(os.path.basename(path))[0]
        S.tok, S.context = tok, model.args.max_seq_len
        S.specials = {special_name(tok, i): i for i in (tok.bos_id, tok.eos_id)}
        engine = Engine(model, tok, max_batch, queue_size, autocast=autocast(dev_type, dt))
        engine.start()
        S.engine = engine  # last: routes answer once this is set
        print(f"ready: model '{S.name}' ({model.num_params() / 1e6:.1f}M parameters, context {S.context}) on {dev}",
              flush=True)
    except BaseException as e:
        S.error = e
        server.should_exit = True


def main():
    require(config, positive=("max_batch", "max_tokens"), non_negative=("queue_size", "port"))
    check(port < 65536, f"port={port} must be below 65536")
    device_and_dtype(device, dtype)  # a bad device stops here, before the port opens
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on such sockets (else ~40 ms delayed ACKs, Nagle)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host")
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    threading.Thread(target=load, args=(server,), name="load", daemon=True).start()
    print(f"listening on http://{host}:{sock.getsockname()[1]} (loading {checkpoint}; /health says when ready)",
          flush=True)
    server.run(sockets=[sock])
    if S.engine is not None:
        S.engine.close()
    if S.error is not None:
        raise S.error


if __name__ == "__main__":
    main()
