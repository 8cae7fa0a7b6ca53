"""Measure training and decoding speed and memory for named model sizes on this machine.

    python bench.py --sizes=tiny                                   # CPU smoke test (what CI runs)
    python bench.py --sizes=15M,110M --optimizers=adamw,sgd --compile=False,True
    python bench.py --sizes=1.3B --memory_cap_gb=24 --activation_checkpointing=True, --optimizer_in_backward=True,
    python bench.py --find_max=True --memory_cap_gb=24 --optimizers=adamw,sgd   # largest ladder size that trains in 24 GiB

Training is timed by running train.py itself (a subprocess per setting, on a random-token dataset,
checkpoints off), so the step measured is exactly the step users train with: same autocast, fused
optimizer, compile, grad clipping, loss normalisation. A separate process per setting also means an
out-of-memory in one setting cannot poison the next. train.py logs tokens/s, MFU and peak memory per
log window; the first window (compile, allocator and cuDNN warm-up) is thrown away.
Decoding is timed here, in-process, with model.generate (greedy, random weights).
Sweep keys with True/False values are tuples: --compile=False,True or --compile=True, (trailing comma).
Prints a table and writes every result to out_json.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

# -----------------------------------------------------------------------------
sizes = "tiny"                      # comma-separated names from SIZES below
optimizers = "adamw"                # comma-separated: adamw, sgd
compile = (False,)                  # torch.compile the model: each value is one setting of the sweep
activation_checkpointing = (False,)
optimizer_in_backward = (False,)    # runs with True use grad_clip=0 (global-norm clipping cannot be done then)
loss_chunk_size = 0                 # train.py's loss_chunk_size for every run (0 = full logits)
batch_size = 0                      # sequences per step; 0 = the size's default below
seq_len = 0                         # 0 = the size's default context
train_iters = 10                    # timed iterations, after as many warm-up iterations
grad_clip = 1.0                     # as train.py's default (llama2.c clips at 1.0 too)
decode = True                       # also time batch-1 and batch-N greedy decoding
decode_batch = 8                    # N of batch-N decoding
decode_tokens = 128                 # new tokens per decode run (fewer if the context is shorter)
compile_decode = False              # time decoding through model.compiled_decode_step (CUDA graphs on CUDA)
memory_cap_gb = 0.0                 # >0 (CUDA): cap training runs at this many GiB, as train.py does
find_max = False                    # binary-search LADDER for the largest size that trains under memory_cap_gb
device = "auto"                     # 'auto', 'cpu', 'cuda'
dtype = "auto"                      # as train.py: bf16 on CUDA, fp32 on CPU
out_json = "bench.json"
# -----------------------------------------------------------------------------
# name: architecture plus the default batch and context. Vocab 32000 is Llama 2's SentencePiece vocab;
# 15M/42M/110M are llama2.c's stories models; embeddings are tied, as in llama2.c.
SIZES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, seq=64, batch=4),
    "15M": dict(dim=288, n_layers=6, n_heads=6, vocab=32000, seq=256, batch=32),
    "42M": dict(dim=512, n_layers=8, n_heads=8, vocab=32000, seq=1024, batch=16),
    "110M": dict(dim=768, n_layers=12, n_heads=12, vocab=32000, seq=1024, batch=16),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, vocab=32000, seq=1024, batch=8, multiple_of=256),
    "760M": dict(dim=1536, n_layers=24, n_heads=16, vocab=32000, seq=1024, batch=8, multiple_of=256),
    "1.3B": dict(dim=2048, n_layers=24, n_heads=16, vocab=32000, seq=1024, batch=4, multiple_of=256),
    "2.7B": dict(dim=2560, n_layers=32, n_heads=32, vocab=32000, seq=1024, batch=4, multiple_of=256),
}
LADDER = ["110M", "350M", "760M", "1.3B", "2.7B"]  # find_max searches these, smallest to largest
REPO = os.path.dirname(os.path.abspath(__file__))

from configurator import configure, print_config  # noqa: E402
config = configure(globals(), sys.argv[1:])
import numpy as np  # noqa: E402
import torch  # noqa: E402

from model import ModelArgs, Transformer, peak_flops  # noqa: E402


def fail(msg):
    raise SystemExit(f"error: {msg}")


def names(text, allowed, key):
    out = [s.strip() for s in text.split(",") if s.strip()]
    for n in out:
        if n not in allowed:
            fail(f"{key}: '{n}' is not one of {', '.join(allowed)}")
    return out


def model_args(size):
    s = SIZES[size]
    return ModelArgs(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s.get("n_kv_heads"),
                     vocab_size=s["vocab"], multiple_of=s.get("multiple_of", 32), max_seq_len=seq_len or s["seq"])


def make_dataset(root, vocab):
    """Random tokens in tokenize_data.py's on-disk format: speed does not depend on what the tokens say."""
    d = os.path.join(root, f"random{vocab}")
    if os.path.exists(os.path.join(d, "meta.json")):
        return d
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for split, n in (("train", 1 << 20), ("val", 1 << 14)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(os.path.join(d, f"{split}.bin"))
    meta = {"tokenizer": {"kind": "sentencepiece", "path": None, "special_tokens": [], "vocab_size": vocab, "bos_id": 1, "eos_id": 2},
            "vocab_size": vocab, "dtype": "uint16", "bos_id": 1, "eos_id": 2,
            "splits": {"train": {"file": "train.bin", "documents": 1, "tokens": 1 << 20},
                       "val": {"file": "val.bin", "documents": 1, "tokens": 1 << 14}}}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return d


def run_train(size, opt, comp, ckpt, inback, tmp, batch=0, seq=0):
    """One train.py run; returns a result dict with status 'ok', 'oom' or 'error'."""
    s = SIZES[size]
    seq, batch = seq or seq_len or s["seq"], batch or batch_size or s["batch"]
    data = make_dataset(tmp, s["vocab"])
    out = os.path.join(tmp, f"run-{size}-{opt}-{comp}-{ckpt}-{inback}-{time.time_ns()}")
    args = [f"--data_root={tmp}", f"--dataset={os.path.basename(data)}", f"--out_dir={out}",
            f"--dim={s['dim']}", f"--n_layers={s['n_layers']}", f"--n_heads={s['n_heads']}",
            f"--n_kv_heads={s.get('n_kv_heads') or 0}", f"--multiple_of={s.get('multiple_of', 32)}",
            f"--block_size={seq}", f"--batch_size={batch}", f"--optimizer={opt}", f"--compile={comp}",
            f"--activation_checkpointing={ckpt}", f"--optimizer_in_backward={inback}",
            f"--grad_clip={0.0 if inback else grad_clip}", f"--loss_chunk_size={loss_chunk_size}",
            f"--memory_cap_gb={memory_cap_gb}", f"--device={device}", f"--dtype={dtype}",
            # two log windows of train_iters: the first is warm-up; evaluation only at the ends, 1 batch
            f"--max_iters={2 * train_iters}", f"--log_interval={train_iters}", f"--eval_interval={2 * train_iters}",
            "--eval_iters=1", "--warmup_iters=0", "--learning_rate=1e-4", "--write_checkpoints=False", "--progress=False"]
    result = dict(size=size, optimizer=opt, compile=comp, activation_checkpointing=ckpt, optimizer_in_backward=inback,
                  batch_size=batch, seq_len=seq, params=param_count(model_args(size)))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    if proc.returncode != 0:
        oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        result["status"] = "oom" if oom else "error"
        if not oom:
            result["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return result
    with open(os.path.join(out, "metrics.jsonl")) as f:
        windows = [r for r in map(json.loads, f) if r.get("type") == "train"]
    timed = windows[-1]  # the second window: after warm-up
    result.update(status="ok", tok_per_s=timed["tok_per_s"], mfu=timed["mfu"], ms_per_iter=timed["ms_per_iter"],
                  peak_mem_gb=timed["peak_mem_gb"], loss=timed["loss"])
    return result


def param_count(args):
    with torch.device("meta"):  # shapes only: no memory, even for billions of parameters
        return Transformer(args).num_params()


def time_decode(size, dev, ptdtype, batch, compiled):
    """Greedy decoding tokens/s (all rows together) after one untimed warm-up run; includes a 16-token prefill."""
    args = model_args(size)
    torch.manual_seed(0)
    model = Transformer(args).to(dev).eval()
    if ptdtype != torch.float32:
        model = model.to(ptdtype)  # decoding reads every weight per token: half-width weights, half the bytes
    prompt = torch.randint(args.vocab_size, (batch, 16), device=dev)
    n_new = min(decode_tokens, args.max_seq_len - 16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model.generate(prompt, n_new, temperature=0, compile_decode=compiled)  # warm-up (and compilation)
    sync()
    t = time.perf_counter()
    model.generate(prompt, n_new, temperature=0, compile_decode=compiled)
    sync()
    return batch * n_new / (time.perf_counter() - t)


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main():
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = dtype if dtype != "auto" else ("bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    size_list = names(sizes, SIZES, "sizes")
    opt_list = names(optimizers, ("adamw", "sgd"), "optimizers")
    if find_max and (dev.type != "cuda" or memory_cap_gb <= 0):
        fail("find_max=True needs a CUDA device and memory_cap_gb > 0 (the cap it searches under)")
    peak = peak_flops(dev)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    mem_kind = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS growth of the train.py process (resource.ru_maxrss)"
    print_config(config)
    print(f"device: {where}, torch {torch.__version__}, dtype {dt}; MFU against dense bf16 peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'n/a (unknown device or CPU)'}; memory = {mem_kind}")
    results = {"device": where, "torch": torch.__version__, "dtype": dt, "peak_flops": peak, "memory_kind": mem_kind,
               "config": config, "train": [], "decode": [], "find_max": []}
    with tempfile.TemporaryDirectory() as tmp:
        if find_max:
            for opt in opt_list:  # memory grows with size, so the sizes that fit are a prefix of LADDER
                lo, hi, tried = -1, len(LADDER), []
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    r = run_train(LADDER[mid], opt, compile[0], activation_checkpointing[0], optimizer_in_backward[0], tmp, seq=1024)
                    tried.append(r)
                    print(f"  find_max {opt}: {LADDER[mid]} -> {r['status']}", flush=True)
                    lo, hi = (mid, hi) if r["status"] == "ok" else (lo, mid)
                    if r["status"] == "error":
                        fail(f"{LADDER[mid]} failed for a reason other than memory: {r['error']}")
                results["find_max"].append({"optimizer": opt, "memory_cap_gb": memory_cap_gb,
                                            "largest": LADDER[lo] if lo >= 0 else None, "runs": tried})
                results["train"] += tried
        else:
            for size, opt, comp, ckpt, inback in itertools.product(size_list, opt_list, compile, activation_checkpointing, optimizer_in_backward):
                r = run_train(size, opt, comp, ckpt, inback, tmp)
                print(f"  {size} {opt} compile={comp} ckpt={ckpt} in_backward={inback}: {r['status']}", flush=True)
                results["train"].append(r)
    if decode and not find_max:
        for size in size_list:
            for batch in (1, decode_batch):
                tok_s = time_decode(size, dev, getattr(torch, dt), batch, compile_decode)
                results["decode"].append({"size": size, "batch": batch, "compiled": compile_decode, "tok_per_s": tok_s})

    print(f"\n{'size':>5} {'params':>8} {'opt':>5} {'comp':>5} {'ckpt':>5} {'in_bw':>5} {'B x T':>9} "
          f"{'tok/s':>10} {'MFU':>6} {'peak GiB':>8}  status")
    for r in results["train"]:
        print(f"{r['size']:>5} {r['params'] / 1e6:>7.1f}M {r['optimizer']:>5} {str(r['compile']):>5} "
              f"{str(r['activation_checkpointing']):>5} {str(r['optimizer_in_backward']):>5} "
              f"{r['batch_size']:>3}x{r['seq_len']:<5} {fmt(r.get('tok_per_s'), ',.0f'):>10} "
              f"{fmt(r['mfu'] * 100 if r.get('mfu') else None, '.1f'):>6} {fmt(r.get('peak_mem_gb'), '.2f'):>8}  "
              f"{r['status']}{': ' + r['error'] if r.get('error') else ''}")
    for r in results["decode"]:
        print(f"decode {r['size']:>5} batch {r['batch']:>3} compiled={r['compiled']}: {r['tok_per_s']:,.0f} tok/s")
    for r in results["find_max"]:
        print(f"largest model training under {r['memory_cap_gb']} GiB with {r['optimizer']}: {r['largest']}")
    with open(out_json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
