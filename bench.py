"""Measure training and decoding speed and memory for named model sizes on this machine.

    python bench.py --sizes=tiny                                   # CPU smoke test (what CI runs)
    python bench.py --sizes=15M,110M --optimizers=adamw,sgd --compile=False,True
    python bench.py --sizes=1.3B --memory_cap_gb=24 --activation_checkpointing=True, --optimizer_in_backward=True,
    python bench.py --find_max=True --memory_cap_gb=24 --optimizers=adamw,sgd   # largest size that trains in 24 GiB
    python bench.py --sizes=1.3B --train_runs=False --trace_memory=True          # its memory, traced, on any machine
    python bench.py --sizes=110M --compile=True, --llama2c_dir=../llama2.c       # and llama2.c's train.py, same shape

Training is timed by running train.py itself (a subprocess per setting, on a random-token dataset,
checkpoints off), so the step measured is exactly the step users train with: same autocast, fused
optimizer, compile, grad clipping, loss normalisation. A separate process per setting also means an
out-of-memory in one setting cannot poison the next. train.py logs tokens/s, MFU and peak memory per
log window; the first window (compile, allocator and cuDNN warm-up) is thrown away.
Decoding is timed here, in-process, with model.generate (greedy, random weights).
Sweep keys with True/False values are tuples: --compile=False,True or --compile=True, (trailing comma).
trace_memory runs the same step on fake tensors (no memory, no arithmetic) and reports the peak bytes of live
tensors: what the step needs before the allocator's overheads, so a 24 GB plan can be checked on a laptop.
Prints a table and writes every result to out_json.
"""
import glob
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import weakref

# -----------------------------------------------------------------------------
sizes = "tiny"                      # comma-separated names from SIZES below
optimizers = "adamw"                # comma-separated: adamw, sgd, lion, muon
compile = (False,)                  # torch.compile the model: each value is one setting of the sweep
activation_checkpointing = (False,)  # recompute blocks in backward: a sweep of True/False values
checkpoint_blocks = (0,)            # with activation_checkpointing: recompute only the first N blocks (0 = all)
optimizer_in_backward = (False,)    # runs with True use grad_clip=0 (global-norm clipping cannot be done then)
loss_chunk_size = 0                 # train.py's loss_chunk_size for every run (0 = full logits)
batch_size = 0                      # sequences per step; 0 = the size's default below
seq_len = 0                         # 0 = the size's default context
train_iters = 10                    # timed iterations, after as many warm-up iterations
grad_clip = 1.0                     # as train.py's default (llama2.c clips at 1.0 too)
decode = True                       # also time batch-1 and batch-N greedy decoding
decode_batch = 8                    # N of batch-N decoding
decode_tokens = 128                 # new tokens per decode run (fewer if the context is shorter)
compile_decode = False              # time decoding through a compiled model.decode_step (CUDA graphs on CUDA)
decode_int8 = False                 # decode with int8 weights (quant.to_int8: llama2.c's groups, fp32 scales)
memory_cap_gb = 0.0                 # >0 (CUDA): cap training runs at this many GiB, as train.py does
trace_memory = False                # also trace one training step on fake tensors: its peak of live tensor bytes
train_runs = True                   # run train.py per setting; False: with trace_memory, estimates only (any machine);
                                    # without, decoding only
llama2c_dir = ""                    # a llama2.c checkout: also time its own train.py on each size (same batch, seq,
                                    # dtype, compile) in this call, and report our AdamW tokens/s over its
find_max = False                    # search LADDER for the largest size that trains under memory_cap_gb
device = "auto"                     # 'auto', 'cpu', 'cuda'
dtype = "auto"                      # as train.py: bf16 on CUDA, fp32 on CPU
out_json = "bench.json"              # every result as JSON, written here
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
# 1.3B's width, deeper: 51.4M parameters a layer, so "the largest model that fits" is found to ~0.2B, not to
# the 1.4B gap between 1.3B and 2.7B (where SGD's smaller state shows)
for _layers, _name in ((28, "1.5B"), (32, "1.7B"), (36, "1.9B"), (40, "2.1B"), (44, "2.3B")):
    SIZES[_name] = dict(SIZES["1.3B"], n_layers=_layers)
LADDER = ["110M", "350M", "760M", "1.3B", "1.5B", "1.7B", "1.9B", "2.1B", "2.3B", "2.7B"]  # smallest to largest
REPO = os.path.dirname(os.path.abspath(__file__))

from runtime import handle_errors  # noqa: E402
if __name__ == "__main__":
    handle_errors()
from configurator import configure, print_config, require, script_settings  # noqa: E402
config = configure(globals(), sys.argv[1:])
require(config, ("train_iters", "decode_batch", "decode_tokens"), ("batch_size", "seq_len", "memory_cap_gb"))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import optim  # noqa: E402
from data import write_token_dataset  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from quant import to_int8  # noqa: E402
from runtime import UsageError, check_output, device_and_dtype, peak_flops, write_text  # noqa: E402

# the one device/dtype rule, except that a trace-only call plans a GPU run, so it traces in bf16
dev, _, dt = device_and_dtype(device, "bfloat16" if dtype == "auto" and trace_memory and not train_runs else dtype)
dev = torch.device(dev)
# the optimizer settings the trace builds its optimizers with: train.py's own defaults
TRAIN_DEFAULTS = {k: v for k, (v, _) in script_settings(os.path.join(REPO, "train.py")).items()}


def names(text, allowed, key):
    out = [s.strip() for s in text.split(",") if s.strip()]
    if bad := [n for n in out if n not in allowed]:
        raise UsageError(f"{key}: '{bad[0]}' is not one of {', '.join(allowed)}")
    return out


def model_args(size):
    s = SIZES[size]
    return ModelArgs(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s.get("n_kv_heads"),
                     vocab_size=s["vocab"], multiple_of=s.get("multiple_of", 32), max_seq_len=seq_len or s["seq"])


def make_dataset(root, vocab):
    """Random tokens in the on-disk format (data.py): speed does not depend on what the tokens say."""
    d = os.path.join(root, f"random{vocab}")
    if os.path.exists(os.path.join(d, "meta.json")):
        return d
    rng = np.random.default_rng(0)
    splits = {split: rng.integers(0, vocab, n) for split, n in (("train", 1 << 20), ("val", 1 << 14))}
    tok = {"kind": "sentencepiece", "path": None, "special_tokens": [], "vocab_size": vocab, "bos_id": 1, "eos_id": 2}
    write_token_dataset(d, splits, tok, vocab)
    return d


def run_train(s, tmp):
    """One train.py run of setting s; returns its figures with status 'ok', or status 'oom' / 'error'."""
    arch = SIZES[s["size"]]
    data = make_dataset(tmp, arch["vocab"])
    out = os.path.join(tmp, f"run-{time.time_ns()}")
    args = [f"--data_root={tmp}", f"--dataset={os.path.basename(data)}", f"--out_dir={out}",
            f"--dim={arch['dim']}", f"--n_layers={arch['n_layers']}", f"--n_heads={arch['n_heads']}",
            f"--n_kv_heads={arch.get('n_kv_heads') or 0}", f"--multiple_of={arch.get('multiple_of', 32)}",
            f"--block_size={s['seq_len']}", f"--batch_size={s['batch_size']}", f"--optimizer={s['optimizer']}",
            f"--compile={s['compile']}", f"--activation_checkpointing={s['activation_checkpointing']}",
            f"--checkpoint_blocks={s['checkpoint_blocks']}", f"--optimizer_in_backward={s['optimizer_in_backward']}",
            f"--grad_clip={0.0 if s['optimizer_in_backward'] else grad_clip}", f"--loss_chunk_size={loss_chunk_size}",
            f"--memory_cap_gb={memory_cap_gb}", f"--device={device}", f"--dtype={s['dtype']}",
            # two log windows of train_iters: the first is warm-up; evaluation only at the ends, 1 batch
            f"--max_iters={2 * train_iters}", f"--log_interval={train_iters}", f"--eval_interval={2 * train_iters}",
            "--eval_iters=1", "--warmup_iters=0", "--learning_rate=1e-4", "--write_checkpoints=False",
            "--progress=False"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    if proc.returncode != 0:
        if "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr:
            return {"status": "oom"}
        return {"status": "error", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        timed = [r for r in map(json.loads, f) if r.get("type") == "train"][-1]  # the second window: after warm-up
    return dict(status="ok", tok_per_s=timed["tok_per_s"], mfu=timed["mfu"], ms_per_iter=timed["ms_per_iter"],
                peak_mem_gb=timed["peak_mem_gb"], loss=timed["loss"])


def setting(size, opt, comp=False, ckpt=False, blocks=0, inback=False, seq=0, batch=0):
    arch = SIZES[size]
    return dict(size=size, dtype=dt, optimizer=opt, compile=comp, activation_checkpointing=ckpt,
                checkpoint_blocks=blocks if ckpt else 0, optimizer_in_backward=inback,
                batch_size=batch or batch_size or arch["batch"], seq_len=seq or seq_len or arch["seq"],
                params=meta_model(size).num_params())


def measure(s, tmp):
    """The traced peak (trace_memory) and the train.py run (train_runs) of setting s. status is 'traced' when
    only traced, and 'traced-oom' for a trace over memory_cap_gb, so find_max can search on either."""
    r = dict(s)
    if trace_memory:
        r["traced_gb"] = traced_peak_gb(s)
        r["status"] = "traced" if memory_cap_gb <= 0 or r["traced_gb"] <= memory_cap_gb else "traced-oom"
    if train_runs:
        r.update(run_train(s, tmp))
    return r


def meta_model(size):
    with torch.device("meta"):  # shapes only: no memory, even for billions of parameters
        return Transformer(model_args(size))


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive after each op, and their peak. Run under FakeTensorMode
    no memory is touched and no arithmetic done, so a 2.7B training step traces on a laptop in seconds."""

    def __init__(self):
        super().__init__()
        self.counted = weakref.WeakSet()  # storages already counted (views share their base's storage)
        self.now = self.peak = 0

    def _freed(self, nbytes):
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.counted:
                storage = t.untyped_storage()
                self.counted.add(storage)
                self.now += storage.nbytes()
                weakref.finalize(storage, self._freed, storage.nbytes())  # fires when the last view dies
        self.peak = max(self.peak, self.now)
        return out


def traced_peak_gb(s):
    """Peak GiB of live tensors in train.py's step for this setting, traced on fake tensors (autocast to the
    setting's dtype over fp32 weights, train.py's optimizer as optim.py builds it for CUDA, two steps so the
    optimizer state exists). The eager step's tensors: the allocator's fragmentation and cuBLAS/attention workspaces
    come on top, but a compiled step keeps fewer intermediates (on an H200 its 1.3B peaks were 2.6-3.2 GiB lower)."""
    batch, seq, opt, inback = s["batch_size"], s["seq_len"], s["optimizer"], s["optimizer_in_backward"]
    args = model_args(s["size"])
    args.max_seq_len = seq
    # fused SGD has no fake-tensor kernel: fake mode would run it on real zeros, gigabytes of them. The per-tensor
    # loop allocates like fused SGD but for one tensor's weight-decayed gradient at a time
    fused = optim.use_fused(opt, "cuda", s["dtype"]) and opt != "sgd"
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 needs none; float16's would add no tensors
    with FakeTensorMode(), LiveBytes() as live:
        model = Transformer(args).train()
        model.checkpoint_blocks = (s["checkpoint_blocks"] or args.n_layers) if s["activation_checkpointing"] else 0
        opts = optim.make_optimizers(model.named_parameters(), opt, TRAIN_DEFAULTS, fused=fused, in_backward=inback,
                                     foreach=None if fused else False)
        for _ in range(2):
            x, y = torch.randint(args.vocab_size, (batch, seq)), torch.randint(args.vocab_size, (batch, seq))
            with torch.autocast("cpu", dtype=getattr(torch, s["dtype"]), enabled=s["dtype"] != "float32"):
                _, loss = model(x, y, reduction="sum", loss_chunk=loss_chunk_size)
            (loss / (batch * seq)).backward()
            del loss
            optim.clip_and_step(opts, scaler, model.parameters(), grad_clip, stepped_in_backward=inback)
    return live.peak / 2**30


def run_llama2c(llama2c_dir, size_args, batch, seq, iters, compile, device, dtype, tmp):
    """Time llama2.c's own train.py, unmodified, on the shape of size_args (a SIZES entry), batch x seq, device
    and dtype (resolved: 'cuda'/'cpu', 'bfloat16'/'float32'), on random tokens: the baseline for our tok/s.
    It runs from a copy under tmp, so the user's checkout is never written to. On CPU it trains in fp32 whatever
    dtype says (it autocasts only on CUDA)."""
    need = ("train.py", "model.py", "tinystories.py", "configurator.py", "export.py", "tokenizer.py")  # it loads all
    missing = [f for f in need if not os.path.isfile(os.path.join(llama2c_dir, f))]
    if missing:
        raise UsageError(f"{llama2c_dir} has no {', '.join(missing)}; pass --llama2c_dir=<a llama2.c checkout>")
    run = os.path.join(tmp, f"llama2c-{time.time_ns()}")
    os.makedirs(run)
    for f in glob.glob(os.path.join(llama2c_dir, "*.py")):
        shutil.copy(f, run)
    # tinystories.py reads uint16 shards from data/TinyStories_all_data/*.bin (Llama 2 vocab) or data/tok{N}/*.bin
    # (custom vocab), sorted by name; the first shard is the val split, the rest train
    vocab = size_args.get("vocab", 32000)
    source = "llama2" if vocab == 32000 else "custom"  # its llama2 source asserts vocab 32000; custom takes any
    data = os.path.join(run, "data", "TinyStories_all_data" if source == "llama2" else f"tok{vocab}")
    os.makedirs(data)
    rng = np.random.default_rng(0)
    for shard in ("data00.bin", "data01.bin"):  # val, train; its loader cycles through a shard: 1M tokens will do
        rng.integers(0, vocab, 1 << 20, dtype=np.uint16).tofile(os.path.join(data, shard))
    # its configurator demands each value have the default's type: ints, bools and bare strings here
    cmd = [sys.executable, "train.py", f"--dim={size_args['dim']}", f"--n_layers={size_args['n_layers']}",
           f"--n_heads={size_args['n_heads']}", f"--n_kv_heads={size_args.get('n_kv_heads') or size_args['n_heads']}",
           f"--multiple_of={size_args.get('multiple_of', 32)}", f"--max_seq_len={seq}", f"--batch_size={batch}",
           "--gradient_accumulation_steps=1", f"--vocab_source={source}", f"--vocab_size={vocab}",
           f"--compile={compile}", f"--device={device}", f"--dtype={dtype}", f"--max_iters={2 * iters}",
           # it always evaluates at iter 0 (eval_iters=1: two batches, inside iter 0's time, which we drop) and
           # saves a checkpoint only at a later evaluation, which max_iters never reaches
           f"--eval_interval={2 * iters + 1}", "--eval_iters=1", "--always_save_checkpoint=False", "--out_dir=out",
           "--wandb_log=False", "--decay_lr=False"]  # constant lr: no warm-up schedule to think about
    env = dict(os.environ)  # its folder is sys.path[0], so its model.py wins over ours even with our repo on PYTHONPATH
    if importlib.util.find_spec("requests") is None:
        # tinystories.py imports requests at the top but uses it only to download TinyStories: an empty module will do
        stub = os.path.join(tmp, "no-requests")
        os.makedirs(stub, exist_ok=True)
        open(os.path.join(stub, "requests.py"), "w").close()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [stub, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True)
    # its log lines: "12 | loss 9.1234 | lr 5.000000e-04 | 41.20ms | mfu 3.10%" (mfu -100.00% before iter 5)
    log = re.findall(r"^\d+ \| loss .* \| ([\d.]+)ms \| mfu (-?[\d.]+)%$", proc.stdout, re.M)
    rows = [(float(ms), float(mfu)) for ms, mfu in log]
    if proc.returncode != 0:
        return dict(status="error", error=(proc.stderr.strip().splitlines() or ["?"])[-1], command=" ".join(cmd))
    if len(rows) <= iters:  # it exited cleanly but we could not read its log: its format must have changed
        return dict(status="error", error=f"read {len(rows)} iteration lines of llama2.c's log, "
                                          f"expected {2 * iters + 1}",
                    command=" ".join(cmd))
    # it runs iters 0..max_iters; the last `iters` are timed, after compile, the iter-0 evaluation and warm-up.
    # Mean, not median: total time over tokens, as our train.py's log window reports tok/s. It logs (and so waits
    # for the GPU on loss.item()) every iteration, its default; our train.py syncs once per log window.
    ms = sum(r[0] for r in rows[-iters:]) / iters
    # its MFU: a running average of its 6N + 12*L*dim*T FLOPs per token against an A100's 312 TFLOP/s on any device
    mfu = rows[-1][1] / 100 if rows[-1][1] >= 0 else None
    return dict(status="ok", ms_per_iter=ms, tok_per_s=batch * seq * 1000 / ms, mfu_llama2c=mfu, command=" ".join(cmd))


def compare_llama2c(size, comp, ours, dev, dt, peak, tmp):
    """llama2.c's train.py on size's shape, with our plain AdamW run of the same shape for the ratio."""
    s = setting(size, "adamw", comp)
    r = dict(size=size, compile=comp, batch_size=s["batch_size"], seq_len=s["seq_len"],
             **run_llama2c(llama2c_dir, SIZES[size], s["batch_size"], s["seq_len"], train_iters, comp, dev.type, dt,
                           tmp))
    same = [o for o in ours if (o["size"], o["compile"], o["optimizer"], o["status"]) == (size, comp, "adamw", "ok")
            and not o["activation_checkpointing"] and not o["optimizer_in_backward"]]
    if r["status"] == "ok":
        flops = meta_model(size).flops_per_token(s["seq_len"])
        r["mfu"] = r["tok_per_s"] * flops / peak if peak else None  # against our peak, not its A100 figure
        r["ours_over_llama2c"] = same[0]["tok_per_s"] / r["tok_per_s"] if same else None
    print(f"  llama2.c train.py {size} compile={comp}: {r['status']}", flush=True)
    return r


def time_decode(size, dev, ptdtype, batch, compiled):
    """Greedy decoding tokens/s (all rows together), its results row; one untimed warm-up run, a 16-token prefill."""
    args = model_args(size)
    if compiled:  # fresh compile caches: a new model per size/batch would pile up recompiles until dynamo's
        torch.compiler.reset()  # recompile limit silently sends the step back to eager, and old CUDA graphs hold memory
    torch.manual_seed(0)
    model = Transformer(args).to(dev).eval()
    if decode_int8:  # a quarter of fp32's bytes; the rest fp32 under autocast, as generate.py runs int8
        to_int8(model)
    elif ptdtype != torch.float32:
        model = model.to(ptdtype)  # decoding reads every weight per token: half-width weights, half the bytes
    prompt = torch.randint(args.vocab_size, (batch, 16), device=dev)
    n_new = min(decode_tokens, args.max_seq_len - 16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True) if compiled else None
    with torch.autocast(dev.type, dtype=ptdtype, enabled=decode_int8 and ptdtype != torch.float32):
        model.generate(prompt, n_new, temperature=0, decode_step=step)  # warm-up (and compilation)
        sync()
        t = time.perf_counter()
        model.generate(prompt, n_new, temperature=0, decode_step=step)
        sync()
    tok_s = batch * n_new / (time.perf_counter() - t)
    return dict(size=size, batch=batch, compiled=compiled, int8=decode_int8, tok_per_s=tok_s)


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def find_largest(opt, tmp):
    """Largest LADDER size that trains 1024-token sequences (batch_size of them, default 4) under memory_cap_gb,
    with the first value of each sweep key. Memory grows along LADDER, so the sizes that fit are a prefix of it:
    binary search. With both
    trace_memory and train_runs the search runs on traces (seconds each) and real runs then step up or down from
    the traced answer until one fits and the next does not: usually two runs instead of four."""
    def at(i):
        return setting(LADDER[i], opt, compile[0], activation_checkpointing[0], checkpoint_blocks[0],
                       optimizer_in_backward[0],
                       seq=1024, batch=batch_size or 4)  # one batch for all sizes, so memory grows along LADDER

    def search(fits):  # the largest i with fits(i), or -1
        lo, hi = -1, len(LADDER)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    rows = {}

    def fits(i):
        if i not in rows:
            rows[i] = measure(at(i), tmp)
            print(f"  find_max {opt}: {LADDER[i]} -> {rows[i]['status']}", flush=True)
            if rows[i]["status"] == "error":
                raise UsageError(f"{LADDER[i]} failed for a reason other than memory: {rows[i]['error']}")
        return "oom" not in rows[i]["status"]
    if trace_memory and train_runs:
        traced = {}
        i = max(0, search(lambda i: traced.setdefault(i, traced_peak_gb(at(i))) <= memory_cap_gb))
        if fits(i):
            while i + 1 < len(LADDER) and fits(i + 1):
                i += 1
        else:
            i -= 1
            while i >= 0 and not fits(i):
                i -= 1
        largest = i
    else:
        largest = search(fits)
    return ({"optimizer": opt, "memory_cap_gb": memory_cap_gb, "largest": LADDER[largest] if largest >= 0 else None,
             "params": rows[largest]["params"] if largest >= 0 else 0,
             "by": "train.py runs" if train_runs else "traces"},
            [rows[i] for i in sorted(rows)])


def main():
    check_output(out_json, "out_json")
    size_list = names(sizes, SIZES, "sizes")
    opt_list = names(optimizers, tuple(optim.OPTIMIZERS), "optimizers")
    if not (train_runs or trace_memory or decode):
        raise UsageError("train_runs=False measures nothing unless trace_memory=True or decode=True")
    if find_max and (memory_cap_gb <= 0 or (train_runs and dev.type != "cuda")):
        raise UsageError("find_max=True needs memory_cap_gb > 0 (the cap it searches under) and a CUDA device, "
             "or --train_runs=False --trace_memory=True to search on traced estimates")
    if any(b < 0 for b in checkpoint_blocks):
        raise UsageError(f"checkpoint_blocks={checkpoint_blocks} must all be >= 0 (0 = every block)")
    peak = peak_flops(dev)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    mem_kind = ("torch.cuda.max_memory_allocated" if dev.type == "cuda" else
                "peak RSS growth of the train.py process (resource.ru_maxrss)")
    print_config(config)
    print(f"device: {where}, torch {torch.__version__}, dtype {dt}; MFU against dense bf16 peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'n/a (unknown device or CPU)'}; memory = {mem_kind}"
          + ("; traced = peak live tensor bytes of one bf16 step on fake tensors" if trace_memory else ""))
    results = {"device": where, "torch": torch.__version__, "dtype": dt, "peak_flops": peak, "memory_kind": mem_kind,
               "config": config, "train": [], "llama2c": [], "decode": [], "find_max": []}
    with tempfile.TemporaryDirectory() as tmp:
        if find_max:
            for opt in opt_list:
                found, rows = find_largest(opt, tmp)
                results["find_max"].append(found)
                results["train"] += rows
        elif train_runs or trace_memory:
            for size, opt, comp, ckpt, blocks, inback in itertools.product(
                    size_list, opt_list, compile, activation_checkpointing, checkpoint_blocks, optimizer_in_backward):
                if blocks and not ckpt:
                    continue  # checkpoint_blocks only counts with activation_checkpointing
                r = measure(setting(size, opt, comp, ckpt, blocks, inback), tmp)
                print(f"  {size} {opt} compile={comp} ckpt={ckpt} blocks={blocks} in_backward={inback}: "
                      f"{r['status']}", flush=True)
                results["train"].append(r)
            for size, comp in itertools.product(size_list, compile) if llama2c_dir and train_runs else ():
                results["llama2c"].append(compare_llama2c(size, comp, results["train"], dev, dt, peak, tmp))
    if decode and not find_max and (train_runs or not trace_memory):  # a trace-only call runs nothing real
        for size, batch in itertools.product(size_list, sorted({1, decode_batch})):
            results["decode"].append(time_decode(size, dev, getattr(torch, dt), batch, compile_decode))

    print(f"\n{'size':>5} {'params':>8} {'opt':>5} {'comp':>5} {'ckpt':>5} {'in_bw':>5} {'B x T':>9} "
          f"{'tok/s':>10} {'MFU':>6} {'peak GiB':>8} {'traced':>6}  status")
    for r in results["train"]:
        ckpt = str(r["checkpoint_blocks"] or "all") if r["activation_checkpointing"] else "-"
        print(f"{r['size']:>5} {r['params'] / 1e6:>7.1f}M {r['optimizer']:>5} {str(r['compile']):>5} {ckpt:>5} "
              f"{str(r['optimizer_in_backward']):>5} {r['batch_size']:>3}x{r['seq_len']:<5} "
              f"{fmt(r.get('tok_per_s'), ',.0f'):>10} "
              f"{fmt(r['mfu'] * 100 if r.get('mfu') else None, '.1f'):>6} {fmt(r.get('peak_mem_gb'), '.2f'):>8} "
              f"{fmt(r.get('traced_gb'), '.2f'):>6}  {r['status']}{': ' + r['error'] if r.get('error') else ''}")
    for r in results["llama2c"]:
        print(f"llama2.c train.py {r['size']} compile={r['compile']} {r['batch_size']}x{r['seq_len']}: "
              + (f"{r['tok_per_s']:,.0f} tok/s, MFU {fmt(r['mfu'] * 100 if r['mfu'] else None, '.1f')} (ours/llama2.c: "
                 f"{fmt(r['ours_over_llama2c'], '.2f')}x)" if r["status"] == "ok" else f"{r['status']}: {r['error']}"))
    for r in results["decode"]:
        print(f"decode {r['size']:>5} batch {r['batch']:>3} compiled={r['compiled']} int8={r['int8']}: "
              f"{r['tok_per_s']:,.0f} tok/s")
    for r in results["find_max"]:
        print(f"largest model training under {r['memory_cap_gb']} GiB with {r['optimizer']} (by {r['by']}): "
              f"{r['largest']} ({r['params'] / 1e6:,.0f}M params)")
    write_text(out_json, json.dumps(results, indent=2))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
