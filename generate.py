"""Sample text from a trained model, streaming tokens as they are produced.

    python generate.py --checkpoint=out/ckpt.pt --prompt="Once upon a time" --temperature=0.8 --top_k=200
"""
import contextlib
import json
import os
import sys

checkpoint = "out/ckpt.pt"      # our ckpt.pt (or its run directory), a llama2.c .bin, or a Hugging Face folder
prompt = ""                     # text to continue; empty starts from BOS alone
prompt_file = ""                # read the prompt from this file instead
num_samples = 1                 # independent samples to draw
max_new_tokens = 256            # stop after this many new tokens (or at end of sequence, or the context's end)
temperature = 0.8               # 0 = greedy (argmax); higher = more random
top_k = 200                     # sample only from the k most likely tokens; 0 disables
top_p = 1.0                     # nucleus sampling: the smallest set of tokens with this much probability; 1.0 disables
seed = 1337                     # seeds sampling (greedy ignores it)
device = "auto"                 # 'auto', 'cpu', 'cuda', ...
dtype = "auto"                  # 'auto' (bf16 on CUDA where supported, fp32 otherwise), 'float32', 'bfloat16', ...
tokenizer = ""                  # instead of the checkpoint's: a SentencePiece .model, 'gpt2', or a llama2.c .bin
stream = True                   # print tokens as they come
chat = False                    # wrap --prompt in the chat template (chat.py) and stop at <|end_of_turn|>
interactive = False             # chat turn by turn, a user message per stdin line; old turns drop out of a full context
adapter = ""                    # a LoRA run's ckpt.pt to apply on top of --checkpoint (its base); see lora.py
compile = False                 # compile the per-token decode step: on a CPU ahead of time into run.c's loops, fp32 or
                                # int8, once per model shape and thread count, kept in compile_cache and loaded in ms
                                # after; on CUDA, CUDA graphs
compile_cache = ""              # CPU compiles' folder; "" = $LLAMAFORGE_CACHE, else $XDG_CACHE_HOME/llamaforge or
                                # ~/.cache/llamaforge (a compile removes decode-*.pt2 there unused for 30 days)
fast = True                     # fp32 on a CPU without compile: decode.py's eager step (packed weights)
weights = "auto"                # 'auto' as stored (a llama2.c version-2 .bin stays int8), 'int8' (quantize), 'fp32'
threads = 0                     # CPU threads for torch; 0 = torch's default (one per core)
quick_start = True              # with --compile=True on a CPU, keep the weights as the compiled step reads them (a copy
                                # the model's size, in compile_cache) so a later run of this model and these settings
                                # starts in ~0.1 s, without importing torch; sampling then draws from numpy (quick.py)
# -----------------------------------------------------------------------------
from runtime import handle_errors, huge_pages  # noqa: E402
handle_errors()
huge_pages()
from configurator import configure  # noqa: E402
explicit = set()  # the settings this command line gives: chat fits an unset reply length to the context
configure(globals(), sys.argv[1:], explicit)
# -----------------------------------------------------------------------------
import quick  # noqa: E402 (imports no torch)
from compile_cache import cache_dir  # noqa: E402
from runtime import GREEDY_BELOW, UsageError, check  # noqa: E402

# this script's own settings, checked before anything loads (torch's import alone takes 1.3 s)
check(temperature >= 0, f"temperature={temperature} is negative; use 0 for greedy or a positive value")
check(top_k >= 0, f"top_k={top_k} must be >= 0 (0 disables it)")
check(0 < top_p <= 1, f"top_p={top_p} must be in (0, 1] (1.0 disables it)")
check(num_samples >= 1 and max_new_tokens >= 1,
      f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must both be >= 1")
check(threads >= 0, f"threads={threads} must be >= 0 (0 = torch's default)")

# the quick start (quick.py): what it covers; the checkpoint's files as the loader reads them (a run folder: its
# ckpt.pt, not the logs beside it)
QUICK = compile and quick_start and not (chat or interactive) and quick.available()
FOLDER = compile_cache or cache_dir()
MODEL = {"weights": weights, "threads": threads, "device": device, "dtype": dtype}  # and the files, by what they hold
run_ckpt = os.path.join(checkpoint, "ckpt.pt")
FILES = [run_ckpt if checkpoint and os.path.isfile(run_ckpt) else checkpoint, adapter, tokenizer]
KEY = quick.fingerprint(MODEL, FILES) if QUICK else None
NO_SHIM = os.environ.pop("LLAMAFORGE_NO_SHIM", None)  # set by this script, starting itself again (below)
# what this run asks for: a record of the same under another key is an older version of it (removed on a new save)
SOURCE = json.dumps([[os.path.realpath(p) if p and os.path.exists(p) else p for p in FILES], MODEL])


def read_prompt():
    if not prompt_file:
        return prompt
    try:
        with open(prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read prompt_file '{prompt_file}' ({e.strerror}); check the path")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt_file '{prompt_file}' is not UTF-8 text (byte {e.start}); save it as UTF-8")


def prompt_ids(tok, context):
    ids = tok.encode(read_prompt(), bos=True)
    check(len(ids) < context, f"prompt is {len(ids)} tokens but the model's context is {context}; shorten the "
          f"prompt to leave room for new tokens")
    return ids


def sample_each(tok, ids, run_one):
    """Print num_samples continuations of ids, run_one(on_text) making one and returning its new ids."""
    for i in range(num_samples):
        if stream:
            sys.stdout.write(tok.decode(ids))
        new = run_one(write if stream else None)
        # not streamed: the whole sequence decoded at once (the streamed pieces add up to the same text)
        sys.stdout.write("" if stream else tok.decode(ids + new))
        sys.stdout.write("\n" + ("---------------\n" if i < num_samples - 1 else ""))
        sys.stdout.flush()


def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def threads_note():
    if threads > (os.cpu_count() or threads):  # a note, not an error: more threads than cores only slow it
        print(f"note: threads={threads} is more than the {os.cpu_count()} cores here; decoding will be slower",
              file=sys.stderr)


def from_record():
    """(record, its runner, the tokenizer) of this run's record (quick.py), None when there is none; raises
    quick.Unavailable when it does not run here."""
    record = quick.load(FOLDER, KEY)
    if record is None:
        return None
    from tokenizer import load_tokenizer, make_tokenizer
    tok = make_tokenizer(tokenizer) if tokenizer else load_tokenizer(record["tokenizer"])
    return record, quick.Runner(FOLDER, KEY, record, shim="" if NO_SHIM else None), tok


def generate_from(record, runner, tok, notes=True):
    """Every sample through quick.py's loop, without torch: the record's compiled step token by token, numpy's
    sampling. notes: print what the usual path prints on stderr before decoding (the run that wrote it has)."""
    if notes:
        threads_note()
        if record["note"]:
            print(record["note"], file=sys.stderr, flush=True)
    ids, greedy = prompt_ids(tok, record["context"]), temperature < GREEDY_BELOW
    if not greedy:  # numpy's BLAS thread pool, never used here, competes with the step's threads: unset, one thread
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # (256 sampled tokens at 2 threads: 707 -> 644 ms)
        import numpy as np
    rng = None if greedy else np.random.default_rng(seed)
    sample_each(tok, ids, lambda on_text: quick.generate(
        runner, tok, ids, max_new_tokens, record["context"], 0 if greedy else temperature, top_k, top_p, rng,
        set(record["stop_ids"]), on_text))


if __name__ == "__main__" and QUICK:
    try:
        ready = from_record()
    except quick.ShimFailed:  # torch no longer loads in this process: the command afresh, without the shim
        os.environ["LLAMAFORGE_NO_SHIM"] = "1"
        os.execv(sys.executable, sys.orig_argv)
    except quick.Unavailable:  # the usual path then says why, once it has written the record again
        ready = None
    if ready:
        generate_from(*ready)
        # its shim gone or damaged: built and checked again (1-2 s, once), where the record can say so after
        if ready[0].get("shim") and not ready[1].shim and not NO_SHIM and os.access(FOLDER, os.W_OK):
            sys.stdout.flush()
            print("note: the quick start's shim (compile cache) was missing or damaged; building it again",
                  file=sys.stderr, flush=True)
            import quick_shim
            if not quick_shim.adopt(FOLDER, KEY, ready[1], again=True):  # it cannot be: the record forgets it,
                with contextlib.suppress(OSError, ValueError):  # so later runs do not try again
                    quick.set_shim(FOLDER, KEY, None)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # nothing to tear down but the runner's memory

import gc  # noqa: E402

# the ~170,000 objects the imports below make all live to the end: no collections while they are made, and main()
# freezes them before turning the collector back on, so none walks them again (the 2-token command 0.15 s shorter
# for the first, 2.60 -> 2.45 s over 10 alternations; 0.1 s for the freeze, both on 2 cores)
gc.disable()
import torch  # noqa: E402

from checkpoint import load_any, read_adapter, tokenizer_for  # noqa: E402
from decode import CompiledDecoder, FastDecoder  # noqa: E402
from engine import Engine, Request, end_ids  # noqa: E402
from lora import merge_lora  # noqa: E402
from quant import is_int8, weight_bytes  # noqa: E402
import quick_shim  # noqa: E402
from runtime import autocast, device_and_dtype  # noqa: E402


def main():
    global QUICK
    gc.freeze()  # the imports' objects (see there), then collections again for what the run makes
    gc.enable()
    if threads:
        torch.set_num_threads(threads)
        threads_note()
    dev, dev_type, dt = device_and_dtype(device, dtype)
    ctx = autocast(dev_type, dt)
    model, ckpt = load_any(checkpoint, adapter, dev, weights)
    tok = tokenizer_for(ckpt, tokenizer, model.args.vocab_size)
    int8 = is_int8(model)
    note = ""
    if int8:
        actual, fp32 = weight_bytes(model)
        note = f"int8 weights: {actual / 2**20:.1f} MiB ({fp32 / 2**20:.1f} MiB in fp32)"
        print(note, file=sys.stderr, flush=True)
    # compiled at the call site, once: the model stays plain eager code
    step = None
    if compile and dev_type == "cpu" and dt == "float32":
        step = CompiledDecoder(merge_lora(model) if adapter and not int8 else model, folder=compile_cache)
    elif compile:
        step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
    elif fast and dev_type == "cpu" and dt == "float32" and not int8:
        step = FastDecoder(merge_lora(model) if adapter else model)  # the fast step runs plain weights, no hooks
    if isinstance(step, CompiledDecoder) and not step.cached:
        print(step.notice(), file=sys.stderr, flush=True)
    elif compile and not isinstance(step, CompiledDecoder):
        print("compiling the decode step (a minute or more on CUDA; cached on disk after) ...", file=sys.stderr,
              flush=True)

    if QUICK and isinstance(step, CompiledDecoder):  # leave the record, then decode as every later run will
        try:
            package, inputs, caches = step.ensure()
            info = {"tokenizer": None if tokenizer else ckpt.get("tokenizer"), "stop_ids": end_ids(tok),
                    "vocab": model.args.vocab_size, "context": model.args.max_seq_len, "note": note}
            # checkpoint "" with an adapter: the base the adapter names, read now, checked at each quick start
            base = [read_adapter(adapter).get("base_checkpoint") or ""] if adapter and not checkpoint else []
            quick.save(FOLDER, KEY, package, inputs, caches, info, SOURCE, watch=base)
        except OSError as e:
            print(f"note: no quick start for later runs ({e.strerror or e} writing to {FOLDER})", file=sys.stderr)
        else:
            del model, ckpt, step, inputs  # the runner reads its own copy: one copy of the weights at a time
            gc.collect()
            try:
                ready = from_record()
            except quick.Unavailable as e:
                print(f"note: the quick start does not run here ({e}); decoding as usual", file=sys.stderr)
                quick.forget(FOLDER, KEY)
                ready = None
            if ready:
                generate_from(*ready, notes=False)
                quick_shim.adopt(FOLDER, KEY, ready[1])  # later runs without libtorch, where it gives these logits
                return
            QUICK = False
            return main()  # the model loaded again, decoded as usual

    gen = torch.Generator(device=dev).manual_seed(seed)
    engine = Engine(model, tok, max_batch=1, decode_step=step)  # one engine for every sample: its cache is reused
    if chat or interactive:
        return chat_main(engine, gen, ctx)
    ids = prompt_ids(tok, model.args.max_seq_len)

    def run_one(on_text):
        req = Request(ids, max_new_tokens, temperature, top_k or None, top_p, generator=gen, stop_ids=end_ids(tok),
                      on_text=on_text)
        with ctx:
            engine.run([req])
        return req.completion_ids()
    sample_each(tok, ids, run_one)


def chat_reply(engine, history, gen, ctx):
    """Generate the assistant's next answer to history (a list of messages) up to <|end_of_turn|>,
    streaming it; returns its text. The oldest user/assistant pairs are dropped (from history itself)
    while the rendered conversation plus max_new_tokens would overflow the context."""
    from chat import chat_ids, render_chat
    model, tok = engine.model, engine.tok
    eot = chat_ids(tok)[2]
    # unless set, a reply may take a quarter of the context: the default 256 would leave a 128-token model no
    # room for any earlier turn, and every new message would start the conversation over
    context = model.args.max_seq_len
    reply = max_new_tokens if "max_new_tokens" in explicit else min(max_new_tokens, max(16, context // 4))
    ids = render_chat(tok, history, add_generation_prompt=True)[0]
    while len(ids) + reply > model.args.max_seq_len and len(history) > 1:
        del history[:2]
        ids = render_chat(tok, history, add_generation_prompt=True)[0]
        print(f"(dropped the oldest turn to fit the {model.args.max_seq_len}-token context)", file=sys.stderr)
    check(len(ids) < model.args.max_seq_len,
          f"the message is {len(ids)} tokens but the model's context is {model.args.max_seq_len}; shorten it")
    req = Request(ids, reply, temperature, top_k or None, top_p, generator=gen, stop_ids=[eot, *end_ids(tok)],
                  on_text=write if stream else None)  # streams the answer only, not the rendered prompt
    with ctx:
        engine.run([req])
    answer = tok.decode(req.completion_ids())
    sys.stdout.write(("" if stream else answer) + "\n")
    sys.stdout.flush()
    return answer


def chat_main(engine, gen, ctx):
    if not interactive:
        text = read_prompt()
        for i in range(num_samples):
            chat_reply(engine, [{"role": "user", "content": text}], gen, ctx)
            if i < num_samples - 1:
                sys.stdout.write("---------------\n")
        return
    history = []
    while True:  # one user message per line; EOF (Ctrl-D) ends the chat
        sys.stderr.write("> ")  # the input marker, on stderr: stdout holds the conversation's answers only
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            sys.stderr.write("\n")
            return
        if line.strip():
            history.append({"role": "user", "content": line.strip()})
            history.append({"role": "assistant", "content": chat_reply(engine, history, gen, ctx)})


if __name__ == "__main__":
    main()
    # done: skip the interpreter's teardown of torch's ~170,000 objects and the model (0.12-0.14 s, a tenth of a short
    # command's time; measured). Only when nothing here started inductor, whose exit handlers stop its compile workers
    sys.stdout.flush()
    sys.stderr.flush()
    if "torch._inductor" not in sys.modules:
        os._exit(0)
