"""Measure pretokenize at scale: its peak memory and MB/s as the corpus grows, and its speed side by side with
llama2.c's per-document sp.encode loop (tinystories.py's process_shard) on the same text and tokenizer.

    python bench_data.py --sizes_mb=100,1000,5000 --llama2c_dir=../llama2.c

Each corpus is real text (source, split into paragraphs) repeated until it reaches the size, written as the
docs.jsonl tokenize_data.py download makes. Both sides run as processes of their own, timed from start to exit
(imports, reading, tokenizing, writing), and their peak resident memory is read from the kernel (wait4).
"""
import sys

sizes_mb = (100, 1000)          # corpora to generate and pretokenize, in MB of text
source = "../shared/data/tinystories/TinyStories-validation.hf_first_rows.yuninxia.txt"  # real text, repeated
tokenizer = "../shared/data/llama2_tokenizer/tokenizer.model"  # what both sides encode with (llama2.c's default)
llama2c_dir = ""                # a llama2.c checkout: also time its process_shard on the first corpus
workdir = "bench_data"          # corpora and datasets go here (GBs: pick a disk with room); removed unless keep
num_workers = 0                 # our encoding threads (0 = all cores); llama2.c's loop runs in one process
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

from runtime import UsageError, check  # noqa: E402

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


def run_measured(cmd, cwd, env=None):
    """(seconds, peak RSS MiB) of one process, its memory from the kernel's accounting of that child."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - t0
    err = proc.stderr.read().decode(errors="replace")
    last = (err.strip().splitlines() or ["?"])[-1]
    check(os.waitstatus_to_exitcode(status) == 0, f"{' '.join(cmd[:3])} failed: {last}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


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
    print(f"{nbytes / 1e6:,.0f} MB: {nbytes / 1e6 / seconds:.1f} MB/s, peak RSS {rss:,.0f} MiB, "
          f"{tokens:,} tokens in {shards} shards", flush=True)
    return {"side": "llamaforge pretokenize", "mb": nbytes / 1e6, "seconds": seconds,
            "mb_per_s": nbytes / 1e6 / seconds, "peak_rss_mib": rss, "tokens": tokens, "shards": shards}


def llama2c(mb, nbytes):
    """llama2.c's own process_shard, unmodified, on the same documents as a TinyStories shard ({"story": ...})."""
    need = [f for f in ("tinystories.py", "tokenizer.py") if not os.path.isfile(os.path.join(llama2c_dir, f))]
    if need:
        raise UsageError(f"{llama2c_dir} has no {', '.join(need)}; pass --llama2c_dir=<a llama2.c checkout>")
    run = os.path.abspath(os.path.join(workdir, "llama2c"))
    os.makedirs(run, exist_ok=True)
    for f in glob.glob(os.path.join(llama2c_dir, "*.py")):
        shutil.copy(f, run)
    shutil.copy(tokenizer, os.path.join(run, "tokenizer.model"))  # its vocab_size=0 path: tokenizer.model beside it
    shard = os.path.join(run, "data00.json")
    with open(os.path.join(workdir, f"c{mb}", "docs.jsonl"), encoding="utf-8") as src, open(shard, "w") as f:
        json.dump([{"story": json.loads(line)["text"]} for line in src], f)
    stub = os.path.join(run, "stub")  # tinystories.py imports requests only to download; an empty module will do
    os.makedirs(stub, exist_ok=True)
    open(os.path.join(stub, "requests.py"), "w").close()
    code = f"from tinystories import process_shard; process_shard((0, {shard!r}), 0)"
    env = dict(os.environ, PYTHONPATH=stub)
    seconds, rss = run_measured([sys.executable, "-c", code], run, env)
    return {"side": "llama2.c process_shard (per-document sp.encode)", "mb": nbytes / 1e6, "seconds": seconds,
            "mb_per_s": nbytes / 1e6 / seconds, "peak_rss_mib": rss}


def main():
    print_config(config)
    check(os.path.isfile(source), f"source {source} not found; pass --source=<a text file>")
    check(os.path.isfile(tokenizer), f"tokenizer {tokenizer} not found; pass --tokenizer=<a SentencePiece .model>")
    results = []
    try:
        for k, mb in enumerate(sizes_mb):
            nbytes = write_corpus(os.path.join(workdir, f"c{mb}", "docs.jsonl"), mb)
            results.append(ours(mb, nbytes))
            if llama2c_dir and k == 0:
                results.append(llama2c(mb, nbytes))
            if not keep:
                shutil.rmtree(os.path.join(workdir, f"c{mb}"), ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in results:
        print(f"{r['side']:<48} {r['mb']:>8,.0f} MB {r['seconds']:>8.1f} s {r['mb_per_s']:>7.1f} MB/s "
              f"peak RSS {r['peak_rss_mib']:>7,.0f} MiB")
    base = [r for r in results if r["side"].startswith("llama2.c")]
    if base:
        print(f"ours / llama2.c on {base[0]['mb']:,.0f} MB: {results[0]['mb_per_s'] / base[0]['mb_per_s']:.2f}x")
    with open(out_json, "w") as f:
        json.dump({"config": config, "cpus": os.cpu_count(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
