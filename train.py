"""Train a Llama 2 model on pretokenized data.

    python train.py config/demo.py                      # single process (CPU or one GPU)
    python train.py config/demo.py --batch_size=16      # any setting can be overridden with --key=value
    torchrun --standalone --nproc_per_node=2 train.py config/demo.py   # DDP

Settings are the globals below; a config file and --key=value flags override them (configurator.py).
"""
import gc
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                 # checkpoints (ckpt.pt) and the metrics log (metrics.jsonl) go here
init_from = "scratch"           # 'scratch', 'resume' (from out_dir/ckpt.pt), or a checkpoint path to fine-tune from
eval_interval = 200             # evaluate and checkpoint every this many iterations
eval_iters = 20                 # validation batches per evaluation (a fixed set, the same every time)
eval_only = False               # evaluate once and exit
sample_prompts = ()             # prompts completed after each evaluation and logged as "sample" lines, e.g. ("Once upon a time",)
sample_max_new_tokens = 64      # length of each of those samples
sample_temperature = 0.8        # 0 = greedy
log_interval = 10               # read the loss from the device (a sync) only every this many iterations
progress = True                 # tqdm progress bar; off for plain log lines
seed = 1337
# data
data_root = "data"              # where datasets live: data_root/dataset/{train,val}.bin + meta.json
dataset = "demo"
batch_size = 16                 # sequences per micro-batch
block_size = 256                # sequence length trained on (also the model's context, max_seq_len)
gradient_accumulation_steps = 1 # micro-batches per optimizer step (total across DDP ranks)
# model
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 0                  # 0 = same as n_heads; fewer gives grouped-query attention
multiple_of = 32
hidden_dim = 0                  # 0 = Llama's 8/3*dim rule rounded to multiple_of
dropout = 0.0
tie_embeddings = True
norm_eps = 1e-5
rope_theta = 10000.0
# optimizer
optimizer = "adamw"             # 'adamw' or 'sgd' (momentum; half AdamW's state memory)
learning_rate = 5e-4            # peak learning rate
weight_decay = 0.1              # applied to matrices and embeddings only, never to norms or biases
beta1 = 0.9                     # AdamW
beta2 = 0.95                    # AdamW
momentum = 0.9                  # SGD
nesterov = True                 # SGD
grad_clip = 1.0                 # clip the global grad norm to this; 0 disables
# learning-rate schedule
lr_schedule = "cosine"          # 'cosine' (warmup then cosine to min_lr), 'constant' (warmup then flat), 'onecycle'
max_iters = 2000
warmup_iters = 100
lr_decay_iters = 0              # cosine reaches min_lr here; 0 = max_iters
min_lr = 5e-5
# system
device = "auto"                 # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                  # 'auto' (bf16 on CUDA where supported, else fp16 with loss scaling; fp32 on CPU), 'float32', 'bfloat16', 'float16'
compile = False                 # torch.compile the model (slow first step, faster after)
# memory savers (bench.py measures them; BENCHMARKS.md has the arithmetic)
activation_checkpointing = False  # recompute each block in backward: ~1/3 more compute, activations of one block instead of all
checkpoint_blocks = 0            # with activation_checkpointing: recompute only the first N blocks (0 = all); the rest
                                 # keep their activations, so where memory allows a partial N trains faster than all
optimizer_in_backward = False   # step each parameter from a hook as soon as its gradient is ready and free it, so no full set of
                                # gradients is ever held; needs grad_clip=0, gradient_accumulation_steps=1, no DDP, no float16
loss_chunk_size = 0             # >0: vocab head + loss over this many tokens at a time, recomputed in backward: no (B,T,V) logits
memory_cap_gb = 0.0             # >0 on CUDA: cap this process at this many GiB of GPU memory (emulates e.g. a 24 GB card)
write_checkpoints = True        # False: never write ckpt.pt (benchmarks and smoke runs)
# LoRA (lora.py): train low-rank adapters on a frozen base given by init_from; ckpt.pt then holds adapters only
lora_rank = 0                   # rank r of each adapter; 0 = off (train every weight)
lora_alpha = 16.0               # adapter output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0              # dropout on the adapter's input
lora_targets = ("wq", "wk", "wv", "wo")  # linear layers to adapt (by name); "w1", "w2", "w3" add the FFN
# -----------------------------------------------------------------------------
from configurator import configure, print_config  # noqa: E402
config = configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from chat import IGNORE_INDEX  # noqa: E402
from checkpoint import build_model, clean_state_dict, load_checkpoint, save_checkpoint  # noqa: E402
from lora import add_lora, apply_adapter, base_fingerprint, lora_state_dict, memory_report, read_adapter  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tokenize_data import check_token_ids, load_meta, open_sft, open_split, sft_batch  # noqa: E402
from tokenizer import load_tokenizer, tokenizer_mismatch  # noqa: E402


def fail(msg):
    raise SystemExit(f"error: {msg}")


# ---- checks that need no data: fail before any work --------------------------------------------
if optimizer not in ("adamw", "sgd"):
    fail(f"optimizer='{optimizer}' is not one of 'adamw', 'sgd'")
if lr_schedule not in ("cosine", "constant", "onecycle"):
    fail(f"lr_schedule='{lr_schedule}' is not one of 'cosine', 'constant', 'onecycle'")
for key in ("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters", "log_interval"):
    if globals()[key] < 1:
        fail(f"{key}={globals()[key]} must be >= 1")
if checkpoint_blocks < 0 or (checkpoint_blocks and not activation_checkpointing):
    fail(f"checkpoint_blocks={checkpoint_blocks} needs activation_checkpointing=True and a value >= 0 (0 = every block); "
         f"add --activation_checkpointing=True")
if optimizer_in_backward:  # each parameter is stepped the moment its own gradient is complete, so nothing may need them all
    if grad_clip > 0:
        fail(f"optimizer_in_backward=True cannot clip the global grad norm (grad_clip={grad_clip}): no step holds every gradient; set --grad_clip=0")
    if gradient_accumulation_steps > 1:
        fail(f"optimizer_in_backward=True steps after every backward, so gradient_accumulation_steps={gradient_accumulation_steps} "
             f"cannot accumulate; set --gradient_accumulation_steps=1 (raise batch_size instead)")
    if int(os.environ.get("RANK", -1)) != -1:
        fail("optimizer_in_backward=True would step on each rank's local gradient before DDP averages it; run without torchrun")

# ---- distributed setup: torchrun sets RANK/WORLD_SIZE; a plain run is a world of one ------------
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    if backend == "nccl":  # else every rank's collectives (all_gather_object, barrier) land on cuda:0
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the {world_size} DDP processes")
    gradient_accumulation_steps //= world_size  # keep tokens per optimizer step independent of the world size
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
if ddp and device.startswith("cuda"):
    device = f"cuda:{local_rank}"
device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
if device_type == "cuda" and not torch.cuda.is_available():
    fail(f"device='{device}' but no CUDA GPU is visible; use --device=cpu")
if dtype == "auto":
    dtype = "float32" if device_type != "cuda" else ("bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16")
if dtype not in ("float32", "bfloat16", "float16"):
    fail(f"dtype='{dtype}' is not one of 'auto', 'float32', 'bfloat16', 'float16'")
ptdtype = getattr(torch, dtype)
if optimizer_in_backward and dtype == "float16":
    fail("optimizer_in_backward=True cannot use float16 loss scaling (it checks every gradient for inf before stepping); use --dtype=bfloat16")
if memory_cap_gb > 0:
    if device_type != "cuda":
        fail(f"memory_cap_gb={memory_cap_gb} needs a CUDA device (device is '{device}'); drop it")
    # the caching allocator raises OutOfMemoryError past this fraction, as a smaller card would
    cap_index = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gb * 2**30 / torch.cuda.get_device_properties(cap_index).total_memory), cap_index)
# autocast keeps master weights in fp32 and runs matmuls in bf16/fp16
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: ~free speed for fp32 parts
torch.backends.cudnn.allow_tf32 = True

# ---- data -------------------------------------------------------------------------------------
data_dir = os.path.join(data_root, dataset)
meta = load_meta(data_dir)
train_data, val_data = open_split(data_dir, "train"), open_split(data_dir, "val")
for split in ("train", "val"):
    check_token_ids(data_dir, split, meta["vocab_size"])
split_files = {"train": (train_data.filename, train_data.dtype), "val": (val_data.filename, val_data.dtype)}
# Checkpoints carry the tokenizer itself (a SentencePiece model is a few hundred KB), not only its path,
# so they decode on another machine; loading it here also checks the file still matches the data.
tokenizer_record = meta["tokenizer"]
if tokenizer_record.get("kind") == "sentencepiece" and tokenizer_record.get("path"):
    tokenizer_record = load_tokenizer(tokenizer_record).to_meta(embed=True)
# SFT data (tokenize_data.py sft/classify) is whole examples with a loss mask, sampled one example per
# row; pretraining data is a flat token stream, sampled as random windows
sft = meta.get("format") == "sft"
sft_data = {s: open_sft(data_dir, s) for s in ("train", "val")} if sft else {}
split_sizes = {s: len(sft_data[s][2]) - 1 if sft else len(d) - block_size for s, d in (("train", train_data), ("val", val_data))}
if sft and master:
    for s, (_, mask, offs) in sft_data.items():
        cut = np.minimum(offs[1:], offs[:-1] + block_size + 1)
        trained = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # answer tokens left after truncation
        print(f"SFT {s}: {split_sizes[s]:,} examples, padded per batch; {int((cut < offs[1:]).sum()):,} longer than "
              f"block_size+1={block_size + 1} tokens are truncated, {int((trained[cut] == trained[offs[:-1]]).sum()):,} of them lose every answer token")
for split, arr in (("train", train_data), ("val", val_data)):
    if len(arr) < block_size + 1 and not sft:
        fail(f"{data_dir}/{split}.bin holds {len(arr)} tokens, fewer than block_size+1={block_size + 1}; "
             f"lower block_size or add data")


def get_batch(split, positions):
    """Input/target pairs starting at the given token positions; pinned + async copy on CUDA so the
    host-to-device transfer overlaps the GPU's work on the previous step."""
    if sft:  # positions are example indices; prompt and padding targets are IGNORE_INDEX
        x, y = map(torch.from_numpy, sft_batch(*sft_data[split], positions, block_size, meta["eos_id"] or 0))
    else:
        data = np.memmap(*split_files[split], mode="r")  # a fresh memmap per batch: a long-lived one leaks memory
        x = torch.from_numpy(np.stack([data[i:i + block_size] for i in positions]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in positions]).astype(np.int64))
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# The training sampler has its own generator so its state can be saved and restored exactly.
sampler = torch.Generator().manual_seed(seed + 1000 * rank)


def sample_positions(split_len, n, generator):
    """n random starts in [0, split_len): window starts, or example indices for SFT data."""
    return torch.randint(split_len, (n,), generator=generator).tolist()


# A fixed set of evaluation batches, drawn once: successive evaluations are directly comparable.
_eval_gen = torch.Generator().manual_seed(seed)
eval_positions = {s: [sample_positions(split_sizes[s], batch_size, _eval_gen) for _ in range(eval_iters)]
                  for s in ("train", "val")}

# ---- model ------------------------------------------------------------------------------------
def peak_rss():
    """Peak resident memory of this process in bytes (0 where the resource module is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


rss_before_model = peak_rss()
iter_num, best_val_loss, tokens_seen, resume_ckpt = 0, float("inf"), 0, None
if init_from == "scratch":
    model_args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or None,
                           vocab_size=meta["vocab_size"], hidden_dim=hidden_dim or None, multiple_of=multiple_of,
                           norm_eps=norm_eps, max_seq_len=block_size, dropout=dropout,
                           tie_embeddings=tie_embeddings, rope_theta=rope_theta)
    model = Transformer(model_args)
else:
    # 'resume' continues a run in out_dir exactly; a path starts a new run from its weights
    ckpt_path = os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else init_from
    if init_from == "resume" and not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but {ckpt_path} does not exist; train with init_from='scratch' first or fix out_dir")
    # a LoRA run's ckpt.pt holds adapters (+ optimizer etc.) only; its weights come from the base it names
    resume_ckpt = read_adapter(ckpt_path) if init_from == "resume" and lora_rank else load_checkpoint(ckpt_path)
    base_ckpt = load_checkpoint(resume_ckpt["base_checkpoint"]) if "adapter" in resume_ckpt else resume_ckpt
    base_path = os.path.abspath(resume_ckpt.get("base_checkpoint") or ckpt_path)
    ckpt_tok = base_ckpt.get("tokenizer")
    diff = ckpt_tok is not None and tokenizer_mismatch(ckpt_tok, meta["tokenizer"])
    if diff:  # kind, vocab size, chat specials and the vocab file's content hash must all agree
        fail(f"tokenizer mismatch: checkpoint {ckpt_path} and {data_dir} differ in {diff}; "
             f"pretokenize the data with --tokenizer={ckpt_tok.get('path') or ckpt_tok.get('kind')}")
    base_ckpt["model_args"]["dropout"] = dropout  # dropout is a training choice, not architecture
    model = build_model(base_ckpt)
    del base_ckpt
    model_args = model.args
    if block_size > model_args.max_seq_len:
        fail(f"block_size={block_size} exceeds the checkpoint's context {model_args.max_seq_len}; lower block_size")
    if model_args.vocab_size < meta["vocab_size"]:
        fail(f"{data_dir} has vocab {meta['vocab_size']} but the checkpoint's model has {model_args.vocab_size}; "
             f"use data tokenized with the checkpoint's tokenizer")
    if init_from == "resume":
        iter_num, best_val_loss = resume_ckpt["iter_num"], resume_ckpt["best_val_loss"]
        tokens_seen = resume_ckpt.get("tokens_seen", 0)
if lora_rank:
    if init_from == "scratch":
        fail("lora_rank > 0 adapts a pretrained model; set init_from to its checkpoint (or lora_rank=0)")
    lora_info = {"lora": {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(lora_targets)},
                 "base_checkpoint": base_path, "base_fingerprint": base_fingerprint(model)}
    if "adapter" in resume_ckpt:
        apply_adapter(model, resume_ckpt, f"adapter {ckpt_path}")
    else:
        add_lora(model, lora_targets, lora_rank, lora_alpha, lora_dropout)  # freezes the base
model.to(device)

# ---- optimizer: weight decay on matrices and embeddings only; norms (1-D) are left alone ---------
params = [p for p in model.parameters() if p.requires_grad]
decay = [p for p in params if p.dim() >= 2]
no_decay = [p for p in params if p.dim() < 2]
groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups):
    # fused: one kernel for all parameters instead of a loop of small ones (CUDA only)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
    # not fused under float16: fused SGD creates its momentum buffers even on a step the scaler skips for
    # inf/nan gradients, leaving them uninitialised memory that later steps then use as momentum
    return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=nesterov and momentum > 0,
                           fused=device_type == "cuda" and dtype != "float16")


def step_in_backward(o):
    def hook(p):  # autograd calls this once p.grad holds this backward's full gradient
        o.step()
        o.zero_grad(set_to_none=True)  # free it now: only the gradients still being computed are alive
    return hook


if optimizer_in_backward:
    # one small optimizer per parameter tensor, same math as one optimizer over all of them
    opt = None
    opts = [make_optimizer([{**g, "params": [p]}]) for g in groups for p in g["params"]]
    for o in opts:
        o.param_groups[0]["params"][0].register_post_accumulate_grad_hook(step_in_backward(o))
else:
    opt = make_optimizer(groups)
    opts = [opt]
# fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
if lora_rank and master:
    print(memory_report(model, optimizer))
if init_from == "resume":
    opt_states = resume_ckpt["optimizer"] if optimizer_in_backward else [resume_ckpt["optimizer"]]
    if not isinstance(opt_states, list) or len(opt_states) != len(opts):
        fail(f"{ckpt_path} holds optimizer state saved with a different optimizer_in_backward setting; resume with the same setting")
    for o, state in zip(opts, opt_states):
        o.load_state_dict(state)
    if resume_ckpt.get("scaler") and scaler.is_enabled():  # empty when saved by a bf16/fp32 run
        scaler.load_state_dict(resume_ckpt["scaler"])
    states = resume_ckpt.get("sampler", [])
    if rank < len(states):
        sampler.set_state(states[rank])
    rng = resume_ckpt.get("rng", {})
    if rank < len(rng.get("cpu", [])):
        torch.set_rng_state(rng["cpu"][rank])
    if device_type == "cuda" and rank < len(rng.get("cuda", [])):
        torch.cuda.set_rng_state(rng["cuda"][rank], device)
del resume_ckpt  # free the host copy of the weights

raw_model = model
raw_model.checkpoint_blocks = (checkpoint_blocks or raw_model.args.n_layers) if activation_checkpointing else 0
if compile and optimizer_in_backward:
    # one graph per block: a whole-model graph hands back every gradient at once when its backward ends, so
    # the hooks would step only once all gradients exist and this mode's memory saving would be lost
    for block in raw_model.layers:
        block.compile()
elif compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def get_lr(it):
    warmup = warmup_iters if lr_schedule != "onecycle" else (warmup_iters or max(1, int(0.3 * max_iters)))
    if lr_schedule == "onecycle":
        # one cycle: ramp up from learning_rate/25 to the peak, then cosine all the way to min_lr at max_iters
        if it < warmup:
            return learning_rate / 25 + (learning_rate - learning_rate / 25) * it / warmup
        ratio = min(1.0, (it - warmup) / max(1, max_iters - warmup))
        return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
    if it < warmup:
        return learning_rate * (it + 1) / (warmup + 1)
    if lr_schedule == "constant":
        return learning_rate
    decay_iters = lr_decay_iters or max_iters
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def evaluate():
    """Loss, perplexity and next-token accuracy on the fixed evaluation batches of each split."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        loss_sum, correct, count = 0.0, 0, 0
        for positions in eval_positions[split]:
            x, y = get_batch(split, positions)
            with autocast:
                logits, loss = raw_model(x, y, ignore_index=IGNORE_INDEX, reduction="sum")
            valid = y != IGNORE_INDEX
            loss_sum += loss.item()
            correct += ((logits.argmax(-1) == y) & valid).sum().item()
            count += valid.sum().item()
        count = max(count, 1)
        out[f"{split}_loss"] = loss_sum / count
        out[f"{split}_ppl"] = math.exp(min(out[f"{split}_loss"], 50.0))
        out[f"{split}_acc"] = correct / count
    model.train()
    return out


def gather(obj):
    """The list of obj from every rank (a list of one without DDP)."""
    if not ddp:
        return [obj]
    objs = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


def save(sampler_state):
    """Everything needed to continue this run exactly: weights, optimizer, position, RNG and sampler."""
    rng_cpu = gather(torch.get_rng_state())
    rng_cuda = gather(torch.cuda.get_rng_state(device)) if device_type == "cuda" else []
    samplers = gather(sampler_state)
    if not master:
        return
    # a LoRA run saves its adapters only (a small file); the frozen base stays in base_checkpoint
    weights = {"adapter": lora_state_dict(raw_model), **lora_info} if lora_rank else {"model": clean_state_dict(raw_model.state_dict())}
    ckpt = {**weights, "model_args": model_args.to_dict(),
            "optimizer": [o.state_dict() for o in opts] if optimizer_in_backward else opt.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "tokens_seen": tokens_seen, "config": config,
            "tokenizer": meta["tokenizer"] if lora_rank else tokenizer_record,  # an adapter's base carries the model
            "dataset": data_dir,
            "rng": {"cpu": rng_cpu, "cuda": rng_cuda}, "sampler": samplers}
    if write_checkpoints:
        save_checkpoint(ckpt, os.path.join(out_dir, "ckpt.pt"))


def sample_texts():
    """Complete each of sample_prompts. A generator seeded afresh each time makes them repeatable and
    comparable across evaluations, and leaves the global RNG and the data sampler alone: exact resume stays exact."""
    tok, gen, out = load_tokenizer(tokenizer_record), torch.Generator(device=device).manual_seed(seed), []
    raw_model.eval()
    for prompt in sample_prompts:
        ids = tok.encode(prompt, bos=True)[-(block_size - 1):]  # leave room for at least one new token
        with autocast:
            y = raw_model.generate(torch.tensor([ids], device=device), sample_max_new_tokens, temperature=sample_temperature,
                                   eos_id=tok.eos_id, generator=gen)[0].tolist()
        new = y[len(ids):]
        new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
        out.append((prompt, tok.decode(ids + new)[len(tok.decode(ids)):]))  # decode whole: keeps the first space
    raw_model.train()
    return out


def peak_memory():
    """Bytes: on CUDA the allocator's peak of live tensors (no sync); elsewhere the growth of the process's
    peak resident memory since just before the model was built (a coarser number: allocator caches count too)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return max(0, peak_rss() - rss_before_model)


def log_metrics(record):
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---- SIGINT/SIGTERM: finish the current step, save, exit cleanly -----------------------------
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

# ---- the loop ---------------------------------------------------------------------------------
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
metrics_path = os.path.join(out_dir, "metrics.jsonl")
if master:
    os.makedirs(out_dir, exist_ok=True)
    print("config:")
    print_config(config)
    print(f"device {device}, dtype {dtype}, {world_size} process(es); model {raw_model.num_params() / 1e6:.2f}M params; "
          f"{tokens_per_iter:,} tokens per iteration; train {len(train_data):,} tokens, val {len(val_data):,} tokens")
    if init_from == "resume" and os.path.exists(metrics_path):
        # drop log lines past the checkpoint: they will be produced again, identically
        with open(metrics_path) as f:
            kept = [ln for ln in f if json.loads(ln).get("iter", 0) <= iter_num]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    elif init_from != "resume" and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a new run starts a new log

bar = None
if progress and master:
    from tqdm import tqdm
    bar = tqdm(total=max_iters, initial=iter_num, dynamic_ncols=True, disable=None)
say = bar.write if bar is not None else print
start_iter, t_log, loss_acc, n_acc = iter_num, time.time(), torch.zeros((), device=device), 0
model.train()
while True:
    lr = get_lr(iter_num)
    for group in (g for o in opts for g in o.param_groups):
        group["lr"] = lr
    sampler_state = sampler.get_state()  # before drawing this iteration's batches: what a resume must restore

    if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and not (iter_num == start_iter and init_from == "resume" and iter_num > 0):
        t_eval = time.time()
        metrics = evaluate()
        t_log += time.time() - t_eval  # keep evaluation out of the tokens/s figure
        if master:
            say(f"iter {iter_num}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
                f"val ppl {metrics['val_ppl']:.2f}, val acc {metrics['val_acc']:.3f}")
            log_metrics({"type": "eval", "iter": iter_num, "tokens": tokens_seen, **metrics})
            for prompt, text in sample_texts() if sample_prompts else []:
                say(f"sample: {prompt!r} -> {text!r}")
                log_metrics({"type": "sample", "iter": iter_num, "tokens": tokens_seen, "prompt": prompt, "text": text})
        if eval_only:
            break
        best_val_loss = min(best_val_loss, metrics["val_loss"])
        if iter_num > start_iter or init_from != "resume":
            save(sampler_state)
    if iter_num >= max_iters:  # (a stop signal is handled after the step below, where it saves)
        break

    # one optimizer step over gradient_accumulation_steps micro-batches
    batches = [get_batch("train", sample_positions(split_sizes["train"], batch_size, sampler))
               for _ in range(gradient_accumulation_steps)]
    # Normalise by the number of target tokens in the whole step (all micro-batches, all ranks), not
    # per micro-batch: with masked targets (fine-tuning) micro-batches hold different numbers of
    # answer tokens, and averaging their means would over-weight the short ones.
    n_targets = sum((y != IGNORE_INDEX).sum() for _, y in batches)
    if ddp:
        dist.all_reduce(n_targets)  # stays on the device: no host sync
    scale = world_size / n_targets.clamp(min=1)  # DDP averages gradients over ranks; undo that here
    for micro, (x, y) in enumerate(batches):
        if ddp:  # all-reduce gradients only on the last micro-batch
            model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with autocast:
            _, loss = model(x, y, ignore_index=IGNORE_INDEX, reduction="sum", loss_chunk=loss_chunk_size)
            loss = loss * scale
        scaler.scale(loss).backward()
        loss_acc += loss.detach()  # this rank's share, scaled to a mean: the loss logged is rank 0's estimate
    if grad_clip > 0:
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    else:
        grad_norm = torch.zeros(())
    if not optimizer_in_backward:  # otherwise the hooks have already stepped every parameter
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    iter_num += 1
    tokens_seen += tokens_per_iter
    n_acc += 1

    if ddp:  # every rank must stop on the same iteration
        flag = torch.tensor(float(stop_requested), device=device)
        dist.all_reduce(flag)
        stop_requested = flag.item() > 0
    if iter_num % log_interval == 0 or stop_requested or iter_num == max_iters:
        train_loss = loss_acc.item() / n_acc  # the only host-device sync of the loop
        dt = time.time() - t_log
        tok_s = n_acc * tokens_per_iter / dt
        mfu = raw_model.estimate_mfu(tok_s / world_size, block_size, device)
        if master:
            log_metrics({"type": "train", "iter": iter_num, "tokens": tokens_seen, "loss": train_loss, "lr": lr,
                         "grad_norm": float(grad_norm), "tok_per_s": tok_s, "mfu": mfu, "ms_per_iter": 1000 * dt / n_acc,
                         "peak_mem_gb": peak_memory() / 2**30})
            msg = f"loss {train_loss:.4f} lr {lr:.2e} gnorm {float(grad_norm):.2f} {tok_s:,.0f} tok/s" + (f" mfu {100 * mfu:.1f}%" if mfu else "")
            if bar is not None:
                bar.set_postfix_str(msg)
            else:
                print(f"iter {iter_num}: {msg}")
        t_log, loss_acc, n_acc = time.time(), torch.zeros((), device=device), 0
        if device_type == "cuda":  # peak_mem_gb is per log window: the next one must not inherit compile/eval peaks
            torch.cuda.reset_peak_memory_stats(device)
    if bar is not None:
        bar.update(1)
    if stop_requested:
        save(sampler.get_state())
        if master:
            say(f"stopped by signal at iter {iter_num}; checkpoint saved to {out_dir}/ckpt.pt; "
                f"continue with --init_from=resume")
        break

if bar is not None:
    bar.close()
if ddp:
    # Tear down in order: wait for every rank (the master may still be writing the checkpoint), then
    # drop the DDP wrapper, whose reducer holds the process group; left for interpreter finalization,
    # gloo's threads free tensors after Python is gone and the process aborts ("terminate called ...").
    dist.barrier()
    del model
    gc.collect()
    dist.destroy_process_group()
