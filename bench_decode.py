"""Batch-1 greedy decoding on a CPU, side by side with llama2.c's run.c (and runq.c) on the same exported file.

    python bench_decode.py --llama2c=../llama2.c --tokenizer=tokenizer.bin          # random 15M-shaped model
    python bench_decode.py --llama2c=../llama2.c --tokenizer=tokenizer.bin --checkpoint=out/ckpt.pt --threads=1,2,4

run.c and runq.c are compiled from the checkout the user points to (gcc -Ofast -fopenmp -march=native, as
llama2.c's `make runomp`), into a temporary folder. The model (a checkpoint, or random weights of llama2.c's
stories15M shape: dim 288, 6 layers, vocab 32000) is exported once to a legacy fp32 file (run.c) and a version-2
Q8_0 file (runq.c). Ours decodes the files as generate.py loads them: the fp32 file, and the v2 file read as
int8 without dequantizing. Each round runs every contender once per thread count, in turn (run.c then ours on
the same file, runq.c then ours, each pair back to back), every one on the same first N cores (N = the thread
count, pinned: a 1-thread pair never lands on two cores loaded differently), so load from other processes falls
on all of them alike; the median of the rounds is reported, and the median of the rounds' ratios (each pair's
own). Tokens/s is counted as run.c counts it: the tokens after the first, over the time since the first. Ours:
generate.py's own decode loops, greedy sampling included: engine.Engine with the model's eager decode_step (eager)
and decode.FastDecoder (fast), and for generate.py --compile=True on fp32 (compiled) and int8 (int8) weights,
quick.py's loop over the compiled step (decode.CompiledDecoder's package, compiled before the timing once per
thread count, run from a quick-start record in a fresh process, on quick_shim.cpp where the record adopts it, as
generate.py runs it). Then the whole `generate.py --compile=True` command is timed (a fresh process: loading,
decoding max_tokens tokens, printing them) from its quick-start record, against the same command making two (its
start-up), against the command without the record (--quick_start=False: importing torch, loading the file and the
package) and against run.c's and runq.c's whole commands, with the peak RSS of each, and the
seconds a fresh Python takes to import torch. Prints a table and writes every result to out_json.
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
rounds = 5                 # every contender runs once per round; the median is reported
command = True             # also time the whole generate.py command and its start-up
out_json = "bench_decode.json"  # every result as JSON, written here
# -----------------------------------------------------------------------------
from runtime import handle_errors, huge_pages  # noqa: E402
handle_errors()
huge_pages()
from configurator import configure, print_config  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
import torch  # noqa: E402

import quick  # noqa: E402
import quick_shim  # noqa: E402
from checkpoint import build_model, load_checkpoint  # noqa: E402
from decode import CompiledDecoder, FastDecoder  # noqa: E402
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
        with torch.no_grad():  # a random tied model's BOS row predicts BOS itself, and run.c stops at once
            model.tok_embeddings.weight[1].zero_()
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    paths = {"fp32": os.path.join(tmp, "model.bin"), "q8": os.path.join(tmp, "model_q8.bin")}
    write_llama2c(state, model.args, paths["fp32"])
    write_llama2c(state, model.args, paths["q8"], version=2)
    return paths, model.args


# a small parent that runs the command and reports its peak RSS: a child's ru_maxrss counts the memory of the
# process that forked it (Linux charges the parent's pages at exec), so this big Python process cannot fork it
SPAWN = ("import os, subprocess, sys, time; t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:]); "
         "_, status, usage = os.wait4(p.pid, 0); "
         "print(f'\\n{time.perf_counter() - t} {usage.ru_maxrss}', file=sys.stderr); "
         "sys.exit(os.waitstatus_to_exitcode(status))")


def measured(cmd, env=None):
    """(stdout, stderr, wall seconds, peak RSS in MiB; at least the ~10 MiB of the small Python parent)."""
    proc = subprocess.run([sys.executable, "-c", SPAWN, *cmd], capture_output=True, text=True, env=env)
    err, _, last = proc.stderr.rstrip().rpartition("\n")
    if proc.returncode:
        raise UsageError(f"{os.path.basename(cmd[0])} failed: {err.strip()[-200:]}")
    wall, rss = last.split()
    return proc.stdout, err, float(wall), int(rss) / 1024


def run_c(binary, path, n_threads, n):
    """(tok/s as run.c counts it, the whole command's seconds, its peak RSS in MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(n_threads))
    _, err, wall, rss = measured([binary, path, "-z", tokenizer, "-t", "0", "-n", str(n)], env)
    found = re.search(r"achieved tok/s: ([0-9.]+)", err)
    if not found:
        raise UsageError(f"{binary} printed no tok/s: {err.strip()[-200:]}")
    return float(found.group(1)), wall, rss


class Timed:
    """Wraps a decode step: the time from the first step's start (and end) to the last step's end, and the step
    count. A step the engine calls by ids (decode.CompiledDecoder.decode_ids) is wrapped as that."""

    def __init__(self, step):
        self.first, self.first_end, self.last, self.calls = None, None, None, 0
        self.call = self.timed(step)  # made once: the wrapper runs every token
        if hasattr(step, "decode_ids"):
            self.decode_ids = self.timed(step.decode_ids)

    def timed(self, fn):
        def call(*args):
            if self.first is None:
                self.first = time.perf_counter()
            out = fn(*args)
            self.calls, self.last = self.calls + 1, time.perf_counter()
            self.first_end = self.first_end or self.last
            return out
        return call

    def __call__(self, token, pos):
        return self.call(token, pos)


def run_ours(model, tok, step, n_threads, n):
    """generate.py's loop: an Engine over the model and a decode step; BOS, then n - 1 decode steps."""
    torch.set_num_threads(n_threads)
    step = Timed(step)
    engine = Engine(model, tok, max_batch=1, decode_step=step)
    engine.run([Request([1], n, temperature=0.0)])
    # decode_step never runs for the token the prefill gives: calls steps after it, from the first step's start
    return step.calls / (step.last - step.first)


QUICK_LOOP = """
import sys, time, quick, tokenizer
folder, key, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
runner, ends = quick.Runner(folder, key, quick.load(folder, key)), []
step = runner.step
def timed(token, pos):
    best = step(token, pos)
    ends.append(time.perf_counter())
    return best
runner.step = timed
quick.generate(runner, tokenizer.make_tokenizer(path), [1], n, n + 1, 0, None, None, None, ())
print((len(ends) - 1) / (ends[-1] - ends[0]))
"""


def run_quick(folder, key, n):
    """generate.py --compile=True's loop as a later run of it has it: a fresh process without torch, the record's
    runner (on the shim when the record has one: quick_shim.py), quick.generate greedy from BOS, n tokens."""
    out = subprocess.run([sys.executable, "-c", QUICK_LOOP, folder, key, tokenizer, str(n)], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode:
        raise UsageError(f"the quick loop failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(out.stdout)


def run_command(path, n_threads, n, cache, quick_start=True):
    """(seconds, peak RSS in MiB) of the whole generate.py command, compiled step (cached in `cache`)."""
    cmd = [sys.executable, os.path.join(REPO, "generate.py"), f"--checkpoint={path}", f"--tokenizer={tokenizer}",
           "--temperature=0", f"--max_new_tokens={n}", f"--threads={n_threads}", "--stream=False", "--compile=True",
           f"--compile_cache={cache}", f"--quick_start={quick_start}"]
    return measured(cmd)[2:]


def torch_import():
    """Seconds a fresh Python takes to import torch: the floor under any PyTorch command's start-up."""
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pin(n):
    """Run this process and the ones it starts on the first n cores it may use (all of them when fewer)."""
    if ALLOWED:
        os.sched_setaffinity(0, ALLOWED[:n])


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
        # as generate.py loads them: from the exported files; one model per kind of step (each packs its own way)
        models = {kind: build_model(load_checkpoint(paths["fp32"])) for kind in ("fast", "compiled")}
        models["int8"] = build_model(load_checkpoint(paths["q8"], int8=True))  # read as stored, never dequantized
        tok = Llama2cTokenizer(tokenizer)
        check(tok.vocab_size >= args.vocab_size, f"{tokenizer} has {tok.vocab_size} tokens but the model "
              f"{args.vocab_size}; pass the tokenizer the model was trained with")
        steps, shims = {}, {}
        cache = os.path.join(tmp, "cache")  # the commands' compile cache: the packages, their records
        for t in counts:  # a compiled step is compiled for torch's thread count: one per count, compiled here
            torch.set_num_threads(t)
            steps["eager", t], steps["fast", t] = models["fast"].decode_step, FastDecoder(models["fast"])
            for kind in ("compiled", "int8"):
                step = CompiledDecoder(models[kind])
                if not step.cached:
                    print(f"{kind}: {step.notice()}", flush=True)
                package, inputs, caches = step.ensure()
                quick.save(tmp, f"{kind}-{t}", package, inputs, caches,
                           {"vocab": args.vocab_size, "context": args.max_seq_len})
                runner = quick.Runner(tmp, f"{kind}-{t}", quick.load(tmp, f"{kind}-{t}"))  # on libtorch, here
                shims[kind, t] = quick_shim.adopt(tmp, f"{kind}-{t}", runner)  # as generate.py adopts it
                os.makedirs(cache, exist_ok=True)
                shutil.copy(package, cache)
        names = ("run.c", "runq.c", "eager", "fast", "compiled", "int8")
        runs = {(name, t): [] for t in counts for name in names}
        c_memory, c_wall = {}, {}
        for _ in range(rounds):
            for t in counts:
                pin(t)
                for name in ("run.c", "compiled", "runq.c", "int8", "eager", "fast"):
                    if name in ("run.c", "runq.c"):
                        tps, wall, c_memory[name] = run_c(binaries[name[:-2]],
                                                          paths["q8" if name == "runq.c" else "fp32"], t, n)
                        c_wall.setdefault((name, t), []).append(wall)
                    elif name in ("compiled", "int8"):
                        tps = run_quick(tmp, f"{name}-{t}", n)
                    else:
                        tps = run_ours(models["fast" if name == "eager" else name], tok, steps[name, t], t, n)
                    runs[name, t].append(tps)
        results = {"config": config, "load": os.getloadavg(), "decode": [], "command": [], "c_peak_rss_mib": c_memory,
                   "shim": {f"{k}-{t}": v for (k, t), v in shims.items()}}
        print(f"\nbatch-1 greedy decode, tok/s, {n} tokens, median of {rounds} rounds (load average "
              f"{os.getloadavg()[0]:.1f}); compiled and int8: generate.py --compile=True on fp32 and int8 weights, "
              f"{'on quick_shim.cpp' if all(shims.values()) else 'on libtorch where the shim was not adopted'}")
        print(f"{'threads':>7}" + "".join(f"{k:>9}" for k in names) + f"{'compiled/run.c':>15}{'int8/runq.c':>12}"
              f"   (ratios: the median of the rounds' own)")
        for t in counts:
            med = {name: statistics.median(runs[name, t]) for name in names}
            ratio = {f"{a}/{b}": statistics.median(x / y for x, y in zip(runs[a, t], runs[b, t]))
                     for a, b in (("compiled", "run.c"), ("int8", "runq.c"))}
            results["decode"].append(dict(threads=t, **med, ratios=ratio,
                                          runs={k: v for (k, c), v in runs.items() if c == t}))
            print(f"{t:>7}" + "".join(f"{med[k]:>9.1f}" for k in names) +
                  f"{ratio['compiled/run.c']:>14.2f}x{ratio['int8/runq.c']:>11.2f}x")
        if command:
            pin(len(ALLOWED))
            floor = statistics.median(torch_import() for _ in range(rounds))
            results["torch_import_seconds"] = floor
            for t in counts:
                pin(t)
                for kind, path, c in (("fp32", paths["fp32"], "run.c"), ("int8", paths["q8"], "runq.c")):
                    run_command(path, t, 2, cache)  # the first run leaves the record the others start from
                    whole = [run_command(path, t, n, cache) for _ in range(rounds)]
                    one = statistics.median(run_command(path, t, 2, cache)[0] for _ in range(rounds))
                    usual = [run_command(path, t, n, cache, quick_start=False) for _ in range(rounds)]
                    sec, rss = statistics.median(w for w, _ in whole), max(r for _, r in whole)
                    usual_sec, usual_rss = statistics.median(w for w, _ in usual), max(r for _, r in usual)
                    c_sec = statistics.median(c_wall[c, t])
                    results["command"].append(dict(threads=t, weights=kind, tokens=n, seconds=sec,
                                                   startup_seconds=one, peak_rss_mib=rss, usual_seconds=usual_sec,
                                                   usual_peak_rss_mib=usual_rss, c_seconds=c_sec))
                    print(f"generate.py --compile=True, {kind}, {t} thread(s), {n} tokens: {sec:.2f} s ({c} "
                          f"{c_sec:.2f} s), {one:.2f} s of it start-up (the same command making 2 tokens: "
                          f"{100 * one / sec:.0f}%), peak RSS {rss:.0f} MiB; without the quick start "
                          f"{usual_sec:.2f} s, {usual_rss:.0f} MiB")
            print(f"importing torch alone: {floor:.2f} s (python -c 'import torch', median of {rounds})")
            print("run.c / runq.c peak RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in c_memory.items()))
    write_text(out_json, json.dumps(results, indent=1))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
