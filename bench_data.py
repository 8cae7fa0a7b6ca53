"""Measure pretokenize at scale: its peak memory and MB/s as the corpus grows, and its speed side by side with
llama2.c's own pretokenize (tinystories.py: a process per shard, each shard encoded document by document) on the
same text and tokenizer.

    python bench_data.py --sizes_mb=100,1000,5000 --llama2c_dir=../llama2.c

Each corpus is real text (source, split into paragraphs) repeated until it reaches the size, written as the
docs.jsonl tokenize_data.py download makes. Both sides run as processes of their own, timed from start to exit
(imports, reading, tokenizing, writing); memory is the peak of the whole process tree (parent and workers, PSS).
"""
import sys

sizes_mb = (100, 1000)          # corpora to generate and pretokenize, in MB of text
source = "../shared/data/tinystories/TinyStories-validation.hf_first_rows.yuninxia.txt"  # real text, repeated
tokenizer = "../shared/data/llama2_tokenizer/tokenizer.model"  # what both sides encode with (llama2.c's default)
llama2c_dir = ""                # a llama2.c checkout: also time its process_shard on the first corpus
workdir = "bench_data"          # corpora and datasets go here (GBs: pick a disk with room); removed unless keep
num_workers = 0                 # our worker processes (0 = all cores); llama2.c's pool uses all cores
keep = False                    # keep the corpora and datasets
out_json = "bench_data.json"    # every result as JSON, written here
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()
from configurator import configure, print_config, require  # noqa: E402
config = configure(globals(), sys.argv[1:])
require(config, non_negative=("num_workers",))

import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from runtime import UsageError, check, check_output, write_text  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))


def write_corpus(path, mb):
    """docs.jsonl of about mb MB of text: the source's paragraphs over and over, each a document."""
    with open(source, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    lines = [json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs]
    chunk, written = "".join(lines), 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        while written < mb * 1e6:
            f.write(chunk)
            written += len(chunk.encode())
    return written


def tree_pss_mib(pid):
    """Memory of a process and all its descendants (a pool's workers), as PSS: pages shared after a fork are
    split between the processes sharing them, not counted once per process."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):  # it ended while we looked
            pass
    return total / 1024


def run_measured(cmd, cwd, env=None):
    """(seconds, peak memory in MiB of the process tree, sampled every 100 ms) of one command run to its end."""
    t0, peak = time.time(), 0.0
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        peak = max(peak, tree_pss_mib(proc.pid))
        time.sleep(0.1)  # reading smaps costs CPU: sampling often would slow what it measures
    seconds = time.time() - t0
    last = (proc.stderr.read().decode(errors="replace").strip().splitlines() or ["?"])[-1]
    check(proc.returncode == 0, f"{' '.join(cmd[:3])} failed: {last}")
    return seconds, peak


def ours(mb, nbytes):
    d = os.path.join(workdir, f"c{mb}")
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "tokenize_data.py"), "pretokenize", f"--data_root={workdir}",
           f"--dataset=c{mb}", f"--tokenizer={os.path.abspath(tokenizer)}", f"--num_workers={num_workers}"]
    seconds, rss = run_measured(cmd, REPO, env)
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    shards = sum(len(s["files"]) for s in meta["splits"].values())
    print(f"{nbytes / 1e6:,.0f} MB: {nbytes / 1e6 / seconds:.1f} MB/s, peak memory {rss:,.0f} MiB, "
          f"{tokens:,} tokens in {shards} shards", flush=True)
    return {"side": "llamaforge pretokenize", "mb": nbytes / 1e6, "seconds": seconds,
            "mb_per_s": nbytes / 1e6 / seconds, "peak_mem_mib": rss, "tokens": tokens, "shards": shards}


def llama2c(mb, nbytes):
    """llama2.c's own code, unmodified: its process_shard loop (a shard loaded whole, encoded document by document)
    on the whole corpus in one process, then its pretokenize (a process pool over shard files). The corpus is cut
    into shards of ~44 MB as TinyStories' are ({"story": ...} records), at least one per core so its pool is as
    parallel as ours."""
    need = [f for f in ("tinystories.py", "tokenizer.py") if not os.path.isfile(os.path.join(llama2c_dir, f))]
    if need:
        raise UsageError(f"{llama2c_dir} has no {', '.join(need)}; pass --llama2c_dir=<a llama2.c checkout>")
    run = os.path.abspath(os.path.join(workdir, "llama2c"))
    shards_dir = os.path.join(run, "data", "TinyStories_all_data")  # where its pretokenize looks
    os.makedirs(shards_dir, exist_ok=True)
    for f in glob.glob(os.path.join(llama2c_dir, "*.py")):
        shutil.copy(f, run)
    shutil.copy(tokenizer, os.path.join(run, "tokenizer.model"))  # its vocab_size=0 path: tokenizer.model beside it
    with open(os.path.join(workdir, f"c{mb}", "docs.jsonl"), encoding="utf-8") as src:
        stories = [{"story": json.loads(line)["text"]} for line in src]
    whole = os.path.join(run, "all.json")  # outside the shards folder: one file for the one-process loop
    with open(whole, "w") as f:
        json.dump(stories, f)
    n = max(os.cpu_count(), round(nbytes / 44e6))
    for k in range(n):
        with open(os.path.join(shards_dir, f"data{k:02d}.json"), "w") as f:
            json.dump(stories[k * len(stories) // n:(k + 1) * len(stories) // n], f)
    del stories
    stub = os.path.join(run, "stub")  # tinystories.py imports requests only to download; an empty module will do
    os.makedirs(stub, exist_ok=True)
    open(os.path.join(stub, "requests.py"), "w").close()
    env, out = dict(os.environ, PYTHONPATH=stub), []
    # its loop as the issue names it (one process, document by document), then its whole pretokenize (the pool)
    for side, code in (("llama2.c process_shard loop (1 process)",
                        f"from tinystories import process_shard; process_shard((0, {whole!r}), 0)"),
                       (f"llama2.c pretokenize ({n} shards, its pool)",
                        "from tinystories import pretokenize; pretokenize(0)")):
        seconds, rss = run_measured([sys.executable, "-c", code], run, env)
        out.append({"side": side, "mb": nbytes / 1e6, "seconds": seconds, "mb_per_s": nbytes / 1e6 / seconds,
                    "peak_mem_mib": rss})
    return out


def main():
    print_config(config)
    check(os.path.isfile(source), f"source {source} not found; pass --source=<a text file>")
    check(os.path.isfile(tokenizer), f"tokenizer {tokenizer} not found; pass --tokenizer=<a SentencePiece .model>")
    check_output(out_json, "out_json")
    results = []
    try:
        for k, mb in enumerate(sizes_mb):
            nbytes = write_corpus(os.path.join(workdir, f"c{mb}", "docs.jsonl"), mb)
            results.append(ours(mb, nbytes))
            if llama2c_dir and k == 0:
                results += llama2c(mb, nbytes)
            if not keep:
                shutil.rmtree(os.path.join(workdir, f"c{mb}"), ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in results:
        print(f"{r['side']:<48} {r['mb']:>8,.0f} MB {r['seconds']:>8.1f} s {r['mb_per_s']:>7.1f} MB/s "
              f"peak mem {r['peak_mem_mib']:>7,.0f} MiB")
    for r in results:
        if r["side"].startswith("llama2.c"):
            r["ours_over_this"] = results[0]["mb_per_s"] / r["mb_per_s"]
            print(f"ours / {r['side']} on {r['mb']:,.0f} MB: {r['ours_over_this']:.2f}x")
    write_text(out_json, json.dumps({"config": config, "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
