"""Batch-1 greedy decoding on a CPU, side by side with llama2.c's run.c (and runq.c) on the same exported file.

    python bench_decode.py --llama2c=../llama2.c --tokenizer=tokenizer.bin          # random 15M-shaped model
    python bench_decode.py --llama2c=../llama2.c --tokenizer=tokenizer.bin --checkpoint=out/ckpt.pt --threads=1,2,4

run.c and runq.c are compiled from the checkout the user points to (gcc -Ofast -fopenmp -march=native, as
llama2.c's `make runomp`), into a temporary folder. The model (a checkpoint, or random weights of llama2.c's
stories15M shape: dim 288, 6 layers, vocab 32000) is exported once to a legacy fp32 file (run.c) and a version-2
Q8_0 file (runq.c); ours decodes the fp32 file as generate.py loads it. Each round runs every contender once per
thread count, in turn, so load from other processes falls on all of them alike; the median of the rounds is
reported. Tokens/s is counted as run.c counts it: the tokens after the first, over the time since the first.
Ours: generate.py's own decode loop (engine.Engine, greedy sampling included) with decode.FastDecoder (fast) and
with the model's eager decode_step (eager). Then the whole `generate.py` command is timed (a fresh process,
loading the file, decoding max_tokens tokens, printing them) against the same command making one token: its
start-up. Prints a table and writes every result to out_json.
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# -----------------------------------------------------------------------------
llama2c = ""               # a llama2.c checkout (run.c, runq.c): compiled here; required
tokenizer = ""             # llama2.c tokenizer.bin covering the model's vocab (Llama 2's for the 15M shape); required
checkpoint = ""            # the model to decode; "" = random weights of the stories15M shape
threads = (1, 2)           # thread counts: --threads=1,2,4 or --threads=1 (OMP_NUM_THREADS for run.c; torch's)
max_tokens = 256           # tokens per decode (run.c's -n); at most the model's context
rounds = 3                 # every contender runs once per round; the median is reported
command = True             # also time the whole generate.py command and its start-up
out_json = "bench_decode.json"  # every result as JSON, written here
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()
from configurator import configure, print_config  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
import torch  # noqa: E402

from checkpoint import build_model, load_checkpoint  # noqa: E402
from decode import FastDecoder  # noqa: E402
from engine import Engine, Request  # noqa: E402
from formats import write_llama2c  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from runtime import UsageError, check, check_output, write_text  # noqa: E402
from tokenizer import Llama2cTokenizer  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
SHAPE_15M = dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256)


def build(tmp):
    """run and runq compiled from the checkout, as llama2.c's Makefile's runomp target compiles run."""
    missing = [f for f in ("run.c", "runq.c") if not os.path.isfile(os.path.join(llama2c, f))]
    check(llama2c and not missing, f"llama2c={llama2c!r} has no {', '.join(missing) or 'run.c'}; pass "
          f"--llama2c=<a llama2.c checkout>")
    check(shutil.which("gcc") is not None, "gcc is not on PATH; install a C compiler to build run.c")
    out = {}
    for name in ("run", "runq"):
        cmd = ["gcc", "-Ofast", "-fopenmp", "-march=native", os.path.join(llama2c, name + ".c"), "-lm", "-o",
               os.path.join(tmp, name)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        check(proc.returncode == 0, f"compiling {name}.c failed: {proc.stderr.strip().splitlines()[-1:]}")
        out[name] = os.path.join(tmp, name)
    return out


def model_files(tmp):
    if checkpoint:
        model = build_model(load_checkpoint(checkpoint))
    else:
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**SHAPE_15M))
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    paths = {"fp32": os.path.join(tmp, "model.bin"), "q8": os.path.join(tmp, "model_q8.bin")}
    write_llama2c(state, model.args, paths["fp32"])
    write_llama2c(state, model.args, paths["q8"], version=2)
    return paths, model.args


def run_c(binary, path, n_threads, n):
    env = dict(os.environ, OMP_NUM_THREADS=str(n_threads))
    proc = subprocess.run([binary, path, "-z", tokenizer, "-t", "0", "-n", str(n)], capture_output=True,
                          text=True, env=env)
    found = re.search(r"achieved tok/s: ([0-9.]+)", proc.stderr)
    if proc.returncode or not found:
        raise UsageError(f"{binary} failed: {proc.stderr.strip()[-200:]}")
    return float(found.group(1))


class Timed:
    """Wraps a decode step: the time from the first step's start to the last step's end, and the step count."""

    def __init__(self, step):
        self.step, self.first, self.last, self.calls = step, None, None, 0

    def __call__(self, token, pos):
        if self.first is None:
            self.first = time.perf_counter()
        out = self.step(token, pos)
        self.calls, self.last = self.calls + 1, time.perf_counter()
        return out


def run_ours(model, tok, kind, n_threads, n):
    """generate.py's loop: an Engine over the model, the step fast or eager; BOS, then n - 1 decode steps."""
    torch.set_num_threads(n_threads)
    step = Timed(FastDecoder(model) if kind == "fast" else model.decode_step)
    engine = Engine(model, tok, max_batch=1, decode_step=step)
    req = Request([1], n, temperature=0.0)
    engine.run([req])
    # decode_step never runs for the token the prefill gives: calls steps after it, from the first step's start
    return step.calls / (step.last - step.first)


def run_command(path, n_threads, n):
    cmd = [sys.executable, os.path.join(REPO, "generate.py"), f"--checkpoint={path}", f"--tokenizer={tokenizer}",
           "--temperature=0", f"--max_new_tokens={n}", f"--threads={n_threads}", "--stream=False"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise UsageError(f"generate.py failed: {proc.stderr.strip()[-200:]}")
    return time.perf_counter() - start


def main():
    print_config(config)
    counts = list(threads)
    check(counts and all(isinstance(t, int) and t >= 1 for t in counts),
          f"threads={threads!r} must list counts >= 1, e.g. --threads=1,2 or --threads=1")
    check_output(out_json, "out_json")
    check(tokenizer and os.path.isfile(tokenizer), f"tokenizer={tokenizer!r} is not a file; pass a llama2.c "
          f"tokenizer.bin covering the model's vocab (Llama 2's tokenizer.bin for the 15M shape)")
    with tempfile.TemporaryDirectory() as tmp:
        binaries = build(tmp)
        paths, args = model_files(tmp)
        n = min(max_tokens, args.max_seq_len)
        model = build_model(load_checkpoint(paths["fp32"]))  # as generate.py loads it: from the exported file
        tok = Llama2cTokenizer(tokenizer)
        check(tok.vocab_size >= args.vocab_size, f"{tokenizer} has {tok.vocab_size} tokens but the model "
              f"{args.vocab_size}; pass the tokenizer the model was trained with")
        runs = {(name, t): [] for t in counts for name in ("run.c", "runq.c", "eager", "fast")}
        for _ in range(rounds):
            for t in counts:
                runs["run.c", t].append(run_c(binaries["run"], paths["fp32"], t, n))
                runs["runq.c", t].append(run_c(binaries["runq"], paths["q8"], t, n))
                runs["eager", t].append(run_ours(model, tok, "eager", t, n))
                runs["fast", t].append(run_ours(model, tok, "fast", t, n))
        results = {"config": config, "load": os.getloadavg(), "decode": [], "command": []}
        print(f"\nbatch-1 greedy decode, {n} tokens, median of {rounds} rounds (load average {os.getloadavg()[0]:.1f})")
        print(f"{'threads':>7} {'run.c':>8} {'runq.c':>8} {'eager':>8} {'fast':>8} {'fast/run.c':>10}  tok/s")
        for t in counts:
            med = {name: statistics.median(runs[name, t]) for name in ("run.c", "runq.c", "eager", "fast")}
            results["decode"].append(dict(threads=t, **med, runs={k: v for (k, c), v in runs.items() if c == t}))
            print(f"{t:>7} {med['run.c']:>8.1f} {med['runq.c']:>8.1f} {med['eager']:>8.1f} {med['fast']:>8.1f} "
                  f"{med['fast'] / med['run.c']:>9.2f}x")
        if command:
            for t in counts:
                whole = statistics.median(run_command(paths["fp32"], t, n) for _ in range(rounds))
                one = statistics.median(run_command(paths["fp32"], t, 1) for _ in range(rounds))
                results["command"].append(dict(threads=t, tokens=n, seconds=whole, startup_seconds=one))
                print(f"generate.py, {t} thread(s): {whole:.2f} s for {n} tokens, {one:.2f} s of it start-up "
                      f"(the same command making 1 token): {100 * one / whole:.0f}%")
    write_text(out_json, json.dumps(results, indent=1))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
