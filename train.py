"""Train a Llama 2 model on pretokenized data.

    python train.py config/demo.py                      # single process (CPU or one GPU)
    python train.py config/demo.py --batch_size=16      # any setting can be overridden with --key=value
    torchrun --standalone --nproc_per_node=2 train.py config/demo.py   # DDP

Settings are the globals below; a config file and --key=value flags override them (configurator.py).
"""
import os
import sys
import time

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                 # checkpoints (ckpt.pt) and the metrics log (metrics.jsonl) go here
init_from = "scratch"           # 'scratch', 'resume' (from out_dir/ckpt.pt), or a checkpoint path to fine-tune from
overwrite = False               # a scratch run may replace an existing out_dir/ckpt.pt (else it stops and says so)
eval_interval = 200             # evaluate and checkpoint every this many iterations
eval_iters = 20                 # validation batches per evaluation (a fixed set, the same every time)
eval_only = False               # evaluate once and exit
sample_prompts = ()             # prompts completed after each evaluation, logged as "sample" lines
sample_max_new_tokens = 64      # length of each of those samples
sample_temperature = 0.8        # 0 = greedy
log_interval = 10               # read the loss from the device (a sync) only every this many iterations
nonfinite = "stop"              # a nan/inf loss: 'stop' (error; the last good checkpoint is kept) or 'skip' the step
                                # (checks every step: one host-device sync per step)
stop_at_iter = 0                # >0: stop after this iteration as a stop signal would (save, exit); resume later
progress = True                 # tqdm progress bar; off for plain log lines
seed = 1337                     # seeds init, dropout, the data sampler and the evaluation batches
# data
data_root = "data"              # where datasets live: data_root/dataset/{train,val}.bin + meta.json
dataset = "demo"                # the dataset folder under data_root
batch_size = 16                 # sequences per micro-batch
block_size = 256                # sequence length trained on (also the model's context, max_seq_len)
gradient_accumulation_steps = 1 # micro-batches per optimizer step on each process (DDP multiplies the tokens)
# model
dim = 288                       # model width (embedding size)
n_layers = 6                    # transformer blocks
n_heads = 6                     # attention heads
n_kv_heads = 0                  # 0 = same as n_heads; fewer gives grouped-query attention
multiple_of = 32                # SwiGLU hidden size is rounded up to a multiple of this
hidden_dim = 0                  # 0 = Llama's 8/3*dim rule rounded to multiple_of
dropout = 0.0                   # dropout on embeddings, attention and residual branches
tie_embeddings = True           # share the token embedding with the output head (llama2.c does)
norm_eps = 1e-5                 # RMSNorm epsilon
rope_theta = 10000.0            # rotary embedding base
# optimizer
optimizer = "adamw"             # 'adamw', 'sgd' (momentum), 'lion' (sign updates), 'muon' (AdamW off the blocks)
learning_rate = 5e-4            # peak learning rate
weight_decay = 0.1              # applied to matrices and embeddings only, never to norms or biases
beta1 = 0.9                     # AdamW, Lion (and the AdamW part of Muon)
beta2 = 0.95                    # AdamW, Lion (Lion's paper uses 0.99)
momentum = 0.9                  # SGD
nesterov = True                 # SGD
muon_lr = 0.02                  # Muon: peak lr of the block matrices (learning_rate: its AdamW part's peak)
muon_momentum = 0.95            # Muon
muon_adjust_lr_fn = "original"  # Muon: 'original' (Keller Jordan's) or 'match_rms_adamw' (AdamW-sized)
grad_clip = 1.0                 # clip the global grad norm to this; 0 disables
# learning-rate schedule
lr_schedule = "cosine"          # 'cosine' (warmup, cosine to min_lr), 'constant' (warmup, flat), 'onecycle', 'wsd'
max_iters = 2000                # optimizer steps of the whole run
warmup_iters = 100              # linear warmup steps
lr_decay_iters = 0              # cosine reaches min_lr here; 0 = max_iters
min_lr = 5e-5                   # floor of the cosine, one-cycle and wsd schedules
cooldown_frac = 0.2             # wsd: the last fraction of the run, decaying to min_lr
cooldown_shape = "1-sqrt"       # wsd: 'linear' or '1-sqrt' (Hägele et al. 2024)
# system
device = "auto"                 # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"                  # 'auto' (bf16 on CUDA where supported, else fp16 with loss scaling; fp32 on CPU),
                                # 'float32', 'bfloat16', 'float16'
compile = False                 # torch.compile the model (slow first step, faster after)
# memory savers (bench.py measures them; BENCHMARKS.md has the arithmetic)
activation_checkpointing = False  # recompute each block in backward: ~1/3 more compute, one block's activations kept
checkpoint_blocks = 0            # with activation_checkpointing: recompute only the first N blocks (0 = all); the rest
                                 # keep their activations, so where memory allows a partial N trains faster than all
optimizer_in_backward = False   # step each parameter from a hook as soon as its gradient is ready and free it, so no
                                # full set of gradients is ever held; needs grad_clip=0, gradient_accumulation_steps=1,
                                # no DDP, no float16
loss_chunk_size = 0             # >0: vocab head + loss over this many tokens at a time, recomputed in backward: no
                                # (B,T,V) logits
memory_cap_gb = 0.0             # >0 on CUDA: cap this process at this many GiB of GPU memory (emulates a 24 GB card)
tensorboard = False             # also log the metrics to TensorBoard event files in out_dir/tensorboard
wandb_project = ""              # also log them to Weights & Biases under this project ("" = off; WANDB_MODE=offline
                                # logs without an account)
write_checkpoints = True        # False: never write ckpt.pt (benchmarks and smoke runs)
# LoRA (lora.py): train low-rank adapters on a frozen base given by init_from; ckpt.pt then holds adapters only
lora_rank = 0                   # rank r of each adapter; 0 = off (train every weight)
lora_alpha = 16.0               # adapter output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0              # dropout on the adapter's input
lora_targets = ("wq", "wk", "wv", "wo")  # linear layers to adapt (by name); "w1", "w2", "w3" add the FFN
dpo_beta = 0.1                  # DPO (preference data, dpo.py): how far the policy may move from the reference
dpo_loss = "sigmoid"            # 'sigmoid' (DPO) or 'ipo' (squared, on per-token log-probs)
dpo_label_smoothing = 0.0       # sigmoid loss: the fraction of pairs taken to be mislabelled (conservative DPO)
dpo_sft_weight = 0.0            # + this x the chosen answers' next-token loss (counters the fall of both log-probs)
qat = ""                        # quantization-aware training for an export format: 'q8_0', 'q4_0', 'llama2c_q8'
qat_start_iter = 0              # fake-quantize from this iteration on (train in float first, then adapt)
qat_activations = False         # also round each matmul's input as the format's C runtime does (runq.c, ggml)
# -----------------------------------------------------------------------------
from runtime import handle_errors  # noqa: E402
handle_errors()  # from here on, bad input ends the run with one line "error: ..." (runtime.py)
from configurator import configure, print_config  # noqa: E402
explicit = set()  # the keys this command line sets: a resumed run takes the others from its checkpoint
config = configure(globals(), sys.argv[1:], explicit)
# -----------------------------------------------------------------------------
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import dpo  # noqa: E402
import optim  # noqa: E402
from checkpoint import (MetricsLog, clean_state_dict, load_for_training, restore_training, resume_config,  # noqa: E402
                        save_checkpoint)
from configurator import require  # noqa: E402
from data import Batches, check_token_ids  # noqa: E402
from engine import complete, predict_labels  # noqa: E402
from lora import LINEARS, add_lora, apply_adapter, base_fingerprint, lora_state_dict, memory_report  # noqa: E402
from model import IGNORE_INDEX, ModelArgs, Transformer, evaluate_batches  # noqa: E402
from quant import check_qat, qat as fake_quantization  # noqa: E402
from runtime import (FolderLock, MemoryMeter, StopSignals, UsageError, any_rank, autocast as autocast_for,  # noqa
                     before_hard_exit, cap_gpu_memory, check, device_and_dtype, distributed_world, gather,
                     init_distributed, mfu, teardown_distributed)
from tokenizer import embedded, load_tokenizer  # noqa: E402

ddp, rank, local_rank, world_size = distributed_world()
master = rank == 0
notes = []
if init_from == "resume":  # the run it continues: what this command line does not set comes from its checkpoint
    config, notes = resume_config(os.path.join(out_dir, "ckpt.pt"), config, explicit)
    globals().update(config)
if warmup_iters > max_iters:
    notes.append(f"warning: warmup_iters={warmup_iters} is past max_iters={max_iters}: the run never reaches its "
                 f"peak learning rate")

# ---- checks that need no data: fail before any work --------------------------------------------
optim.check_settings(optimizer, config)
dpo.check_settings(config)
optim.check_schedule(lr_schedule, cooldown_frac, cooldown_shape)
require(config, positive=("batch_size", "block_size", "gradient_accumulation_steps", "max_iters", "eval_interval",
                          "eval_iters", "log_interval", "sample_max_new_tokens"),
        non_negative=("warmup_iters", "lr_decay_iters", "min_lr", "grad_clip", "loss_chunk_size", "memory_cap_gb",
                      "lora_rank", "stop_at_iter", "sample_temperature"), fraction=("dropout", "lora_dropout"))
check(nonfinite in ("stop", "skip"), f"nonfinite='{nonfinite}' is not one of 'stop', 'skip'")
check_qat(qat, qat_start_iter, lora_rank)
check(not set(lora_targets) - set(LINEARS), f"lora_targets={lora_targets}: {sorted(set(lora_targets) - set(LINEARS))} "
      f"match no linear layer; use names among {', '.join(LINEARS)}")
check(all(isinstance(p, str) for p in sample_prompts), f"sample_prompts={sample_prompts!r} must be a tuple of strings")
check(checkpoint_blocks >= 0 and (activation_checkpointing or not checkpoint_blocks),
      f"checkpoint_blocks={checkpoint_blocks} needs activation_checkpointing=True and a value >= 0 (0 = every block); "
      f"add --activation_checkpointing=True")

# ---- device, precision, processes --------------------------------------------------------------
device, device_type, dtype = device_and_dtype(device, dtype)
if optimizer_in_backward:
    optim.check_in_backward(grad_clip, gradient_accumulation_steps, ddp, dtype)
    check(nonfinite == "stop", "nonfinite='skip' cannot undo a step optimizer_in_backward=True has already taken; "
                               "use --nonfinite=stop")
if ddp:
    init_distributed(device_type)
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
# one run per out_dir: a second train.py stops here; temp files a killed save left behind are removed
lock = FolderLock(out_dir, "train.py run") if master else None
ckpt_file = os.path.join(out_dir, "ckpt.pt")
check(init_from == "resume" or overwrite or not write_checkpoints or not os.path.exists(ckpt_file),
      f"{ckpt_file} exists; continue it with --init_from=resume, or replace it with --overwrite=True (or use another "
      f"out_dir)")
if memory_cap_gb > 0:
    check(device_type == "cuda", f"memory_cap_gb={memory_cap_gb} needs a CUDA device (device is '{device}'); drop it")
    cap_gpu_memory(device, memory_cap_gb)
autocast = autocast_for(device_type, dtype)  # matmuls in bf16/fp16 over fp32 master weights
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+: ~free speed for fp32 parts
torch.backends.cudnn.allow_tf32 = True

# ---- data -------------------------------------------------------------------------------------
data_dir = os.path.join(data_root, dataset)
batches = (dpo.PreferenceBatches if dpo.is_preference(data_dir) else Batches)(data_dir, block_size)
meta = batches.meta
for split in ("train", "val"):
    check_token_ids(data_dir, split, meta["vocab_size"])
# Checkpoints carry the tokenizer itself (a SentencePiece model is a few hundred KB), not only its path,
# so they decode on another machine; loading it here also checks the file still matches the data.
tokenizer_record = embedded(meta["tokenizer"])
notes += batches.sft_notes()
# a classifier's log shows the accuracy that matters, its label accuracy: the constrained prediction evaluate.py
# makes (the answer-token accuracy of val_acc counts easy tokens such as <|end_of_turn|> too)
label_examples = batches.classify_examples("val", eval_iters * batch_size)

# The training sampler has its own generator so its state can be saved and restored exactly; the
# evaluation batches are drawn once, so successive evaluations are directly comparable.
sampler = torch.Generator().manual_seed(seed + 1000 * rank)
_eval_gen = torch.Generator().manual_seed(seed)
eval_positions = {s: [torch.randint(batches.size(s), (batch_size,), generator=_eval_gen).tolist()
                      for _ in range(eval_iters)] for s in ("train", "val")}

# ---- model ------------------------------------------------------------------------------------
memory = MemoryMeter(device)  # peak memory from here: the model, its gradients and optimizer, activations
iter_num, best_val_loss, tokens_seen, resume_ckpt = 0, float("inf"), 0, None
if init_from == "scratch":
    try:  # 0 means "derive it" for these two; the model's own checks (heads that divide dim, ...) run here
        model_args = ModelArgs.from_dict({**config, "n_kv_heads": n_kv_heads or None, "hidden_dim": hidden_dim or None,
                                          "vocab_size": meta["vocab_size"], "max_seq_len": block_size})
    except ValueError as e:
        raise UsageError(str(e))
    model = Transformer(model_args)
else:  # 'resume' continues a run in out_dir exactly; a path starts a new run from its weights
    ckpt_path = ckpt_file if init_from == "resume" else init_from
    model, resume_ckpt, base_path = load_for_training(ckpt_path, init_from == "resume", lora_rank, meta["tokenizer"],
                                                      data_dir, dropout)
    model_args = model.args
    if init_from != "resume":  # a new run from these weights: their architecture wins, visibly, and is saved
        arch = {k: v for k, v in model_args.to_dict().items() if k in config and k != "dropout"}
        notes += [f"note: {k}={config[k]!r} ignored: the architecture comes from {ckpt_path} ({k}={v!r})"
                  for k, v in arch.items() if k in explicit and config[k] != v]
        config.update(arch)
    check(block_size <= model_args.max_seq_len, f"block_size={block_size} exceeds the checkpoint's context "
                                                f"{model_args.max_seq_len}; lower block_size")
    check(model_args.vocab_size >= meta["vocab_size"], f"{data_dir} has vocab {meta['vocab_size']} but the "
          f"checkpoint's model has {model_args.vocab_size}; use data tokenized with the checkpoint's tokenizer")
    if init_from == "resume":
        iter_num, best_val_loss = resume_ckpt["iter_num"], resume_ckpt["best_val_loss"]
        tokens_seen = resume_ckpt.get("tokens_seen", 0)  # absent from checkpoints older than the field
if lora_rank:
    check(init_from != "scratch", "lora_rank > 0 adapts a pretrained model; set init_from to its checkpoint "
                                  "(or lora_rank=0)")
    lora_info = {"lora": dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=list(lora_targets)),
                 "base_checkpoint": base_path, "base_fingerprint": base_fingerprint(model)}
    if "adapter" in resume_ckpt:
        apply_adapter(model, resume_ckpt, f"adapter {ckpt_path}")
    else:
        add_lora(model, lora_targets, lora_rank, lora_alpha, lora_dropout)  # freezes the base
model.to(device)
pref = dpo.objective(batches, model, config, resume_ckpt, device)  # None unless the data is preference pairs

# ---- optimizer --------------------------------------------------------------------------------
opts = optim.make_optimizers(model.named_parameters(), optimizer, config,
                             optim.use_fused(optimizer, device_type, dtype), in_backward=optimizer_in_backward)
# fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
if lora_rank and master:
    print(memory_report(model, optimizer))
resume_window, resume_evaluated = None, False
if init_from == "resume":
    restore_training(resume_ckpt, ckpt_path, opts, scaler, sampler, rank, device)
    resume_evaluated = resume_ckpt.get("evaluated", True)  # older checkpoints were only saved after evaluating
    windows = resume_ckpt.get("log_window") or []
    resume_window = windows[rank] if rank < len(windows) else None
del resume_ckpt  # free the host copy of the weights

raw_model = model
raw_model.checkpoint_blocks = (checkpoint_blocks or raw_model.args.n_layers) if activation_checkpointing else 0
if compile and master:  # compiling happens at the first step, silently: say what the wait is
    print(f"compiling the model at the first step ({'minutes on a CPU' if device_type == 'cpu' else 'a minute'})")
if compile and optimizer_in_backward:
    # one graph per block: a whole-model graph hands back every gradient at once when its backward ends, so
    # the hooks would step only once all gradients exist and this mode's memory saving would be lost
    for block in raw_model.layers:
        block.compile()
elif compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


@torch.no_grad()
def evaluate():
    """Loss, perplexity and next-token accuracy on the fixed evaluation batches of each split (and a classifier's
    label accuracy on the first eval_iters * batch_size val texts)."""
    out = {}
    model.eval()
    with autocast:
        for split in ("train", "val"):
            scores = (pref.evaluate if pref else evaluate_batches)(raw_model, (batches.get(split, p, device)
                                                                             for p in eval_positions[split]))
            out.update({f"{split}_{k}": v for k, v in scores.items()})
        if label_examples:
            guesses = predict_labels(raw_model, load_tokenizer(tokenizer_record), [t for t, _ in label_examples],
                                     meta["labels"])
            out["val_label_acc"] = sum(g == lab for g, (_, lab) in zip(guesses, label_examples)) / len(label_examples)
    model.train()
    return out


def check_finite():
    """Never continue from, or save, a nan/inf loss or weights: the last good checkpoint stays as it was."""
    ok = torch.isfinite(loss_acc) & torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all()
    kept = f", so {ckpt_file} keeps the last good state" if os.path.exists(ckpt_file) else ""
    check(not any_rank(~ok), f"the loss or the weights became nan/inf by iter {iter_num}; stopped without saving"
                             f"{kept}: lower learning_rate, raise warmup_iters or set grad_clip, then "
                             f"--init_from=resume (or train with --nonfinite=skip)")


def save(sampler_state, evaluated):
    """Everything needed to continue this run exactly: weights, optimizer, position, RNG, sampler, the log
    window in progress, and whether this iteration's evaluation is done."""
    check_finite()
    rng_cpu = gather(torch.get_rng_state())
    rng_cuda = gather(torch.cuda.get_rng_state(device)) if device_type == "cuda" else []
    samplers, window = gather(sampler_state), gather((loss_acc.item(), n_acc))
    if not master or not write_checkpoints:
        return
    # a LoRA run saves its adapters only (a small file); the frozen base stays in base_checkpoint
    weights = ({"adapter": lora_state_dict(raw_model), **lora_info} if lora_rank else
               {"model": clean_state_dict(raw_model.state_dict())})
    save_checkpoint({**weights, "model_args": model_args.to_dict(), "optimizer": [o.state_dict() for o in opts],
                     "scaler": scaler.state_dict(), "iter_num": iter_num, "best_val_loss": best_val_loss,
                     "tokens_seen": tokens_seen, "config": config,
                     "tokenizer": meta["tokenizer"] if lora_rank else tokenizer_record,  # an adapter's base carries it
                     "dataset": data_dir, "rng": {"cpu": rng_cpu, "cuda": rng_cuda}, "sampler": samplers,
                     "log_window": window, "evaluated": evaluated, **(pref.state() if pref else {})}, ckpt_file)


def sample_texts():
    """Complete each of sample_prompts. A generator seeded afresh each time makes them repeatable and comparable
    across evaluations, and leaves the global RNG and the data sampler alone: exact resume stays exact."""
    tok, gen = load_tokenizer(tokenizer_record), torch.Generator(device=device).manual_seed(seed)
    raw_model.eval()
    with autocast:
        out = [(p, complete(raw_model, tok, p, sample_max_new_tokens, sample_temperature, generator=gen))
               for p in sample_prompts]
    raw_model.train()
    return out


signals = StopSignals()  # SIGINT/SIGTERM: finish the step, save, exit cleanly
# ---- the loop ---------------------------------------------------------------------------------
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size * (2 if pref else 1)  # DPO: 2 rows
if master:
    os.makedirs(out_dir, exist_ok=True)
    print("config:")
    print_config(config)
    print(f"device {device}, dtype {dtype}, {world_size} process(es); model {raw_model.num_params() / 1e6:.2f}M "
          f"params; {tokens_per_iter:,} tokens per iteration; train {len(batches.tokens['train']):,} tokens, "
          f"val {len(batches.tokens['val']):,} tokens")
    for line in notes:
        print(line)
metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), iter_num if init_from == "resume" else None, master,
                     os.path.join(out_dir, "tensorboard") if tensorboard else "", wandb_project, config)

bar = None
if progress and master:
    from tqdm import tqdm
    bar = tqdm(total=max_iters, initial=iter_num, dynamic_ncols=True, disable=None)  # None: off without a terminal
    bar = None if bar.disable else bar
say = bar.write if bar is not None else (lambda line: print(line, flush=True))
start_iter, t_log, loss_acc, n_acc, skipped = iter_num, time.time(), torch.zeros((), device=device), 0, 0
log_iter = iter_num  # where the log window began: timings are per iteration of the window
if resume_window:  # the log window the run was in when it saved: the next train line averages all of it
    loss_acc, n_acc = torch.tensor(resume_window[0], device=device), resume_window[1]
model.train()
while True:
    lr = optim.lr_at(iter_num, lr_schedule, learning_rate, min_lr, warmup_iters, max_iters, lr_decay_iters,
                     cooldown_frac, cooldown_shape)
    optim.set_lr(opts, lr)
    sampler_state = sampler.get_state()  # before drawing this iteration's batches: what a resume must restore
    fake_quantization(raw_model, qat, qat_activations, on=iter_num >= qat_start_iter)

    resumed_here = iter_num == start_iter and resume_evaluated  # this iteration's evaluation happened before the save
    if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and not resumed_here:
        t_eval = time.time()
        scores = evaluate()
        t_log += time.time() - t_eval  # keep evaluation out of the tokens/s figure
        if master:
            acc = (f"val label acc {scores['val_label_acc']:.3f}" if "val_label_acc" in scores else
                   dpo.eval_text(scores) if pref else
                   f"val {'answer token ' if batches.sft else ''}acc {scores['val_acc']:.3f}")
            say(f"iter {iter_num}: train loss {scores['train_loss']:.4f}, val loss {scores['val_loss']:.4f}, "
                f"val ppl {scores['val_ppl']:.2f}, {acc}")
            metrics.write({"type": "eval", "iter": iter_num, "tokens": tokens_seen, **scores})
            for prompt, text in sample_texts() if sample_prompts else []:
                say(f"sample: {prompt!r} -> {text!r}")
                metrics.write({"type": "sample", "iter": iter_num, "tokens": tokens_seen, "prompt": prompt,
                               "text": text})
        if eval_only:
            break
        best_val_loss = min(best_val_loss, scores["val_loss"])
        if iter_num > start_iter or init_from != "resume" or not resume_evaluated:
            save(sampler_state, evaluated=True)
    if iter_num >= max_iters:  # (a stop signal is handled after the step below, where it saves)
        break

    # one optimizer step over gradient_accumulation_steps micro-batches
    micro_batches = [batches.get("train", torch.randint(batches.size("train"), (batch_size,), generator=sampler)
                                 .tolist(), device) for _ in range(gradient_accumulation_steps)]
    # Normalise by the number of target tokens in the whole step (all micro-batches, all ranks), not
    # per micro-batch: with masked targets (fine-tuning) micro-batches hold different numbers of
    # answer tokens, and averaging their means would over-weight the short ones.
    n_targets = sum(pref.pairs(y) if pref else (y != IGNORE_INDEX).sum() for _, y in micro_batches)  # DPO: pairs
    if ddp:
        dist.all_reduce(n_targets)  # stays on the device: no host sync
    scale = world_size / n_targets.clamp(min=1)  # DDP averages gradients over ranks; undo that here
    step_loss = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(micro_batches):
        if ddp:  # all-reduce gradients only on the last micro-batch
            model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with autocast:
            loss = (pref.loss(model, x, y, loss_chunk_size) if pref else
                    model(x, y, reduction="sum", loss_chunk=loss_chunk_size)[1])
            loss = loss * scale
        scaler.scale(loss).backward()
        step_loss += loss.detach()  # this rank's share, scaled to a mean: the loss logged is rank 0's estimate
    grad_norm, skip = optim.clip_and_step(opts, scaler, raw_model.parameters(), grad_clip,
                                          step_loss if nonfinite == "skip" else None, optimizer_in_backward)
    skipped += skip
    if not skip:
        loss_acc += step_loss
    iter_num += 1
    tokens_seen += tokens_per_iter
    n_acc += not skip

    signalled = signals.requested
    stop_requested = any_rank(signalled or iter_num == stop_at_iter)  # every rank stops on the same iteration
    if iter_num % log_interval == 0 or iter_num == max_iters:
        check_finite()  # the loop's one host-device sync, with the .item() below
        train_loss = loss_acc.item() / n_acc if n_acc else None  # None: every step of the window was skipped
        dt, steps = time.time() - t_log, max(1, iter_num - log_iter)
        tok_s = steps * tokens_per_iter / dt
        step_mfu = mfu(raw_model.flops_per_token(block_size), tok_s / world_size, device)
        dpo_stats = pref.log_window() if pref else {}  # rewards, margin, accuracy, log-probs over the window
        if master:
            metrics.write({"type": "train", "iter": iter_num, "tokens": tokens_seen, "loss": train_loss, "lr": lr,
                           "grad_norm": float(grad_norm), "tok_per_s": tok_s, "mfu": step_mfu,
                           "ms_per_iter": 1000 * dt / steps, "peak_mem_gb": memory.peak() / 2**30,
                           **dpo_stats, **({"skipped": skipped} if nonfinite == "skip" else {})})
            msg = (f"loss {train_loss or float('nan'):.4f} lr {lr:.2e} gnorm {float(grad_norm):.2f} {tok_s:,.0f} tok/s"
                   + dpo.progress_text(dpo_stats) + (f" mfu {100 * step_mfu:.1f}%" if step_mfu else ""))
            if bar is not None:
                bar.set_postfix_str(msg)
            else:
                print(f"iter {iter_num}: {msg}", flush=True)
        t_log, log_iter, loss_acc, n_acc = time.time(), iter_num, torch.zeros((), device=device), 0
        memory.reset()  # peak_mem_gb is per log window: the next one must not inherit compile/eval peaks
    if bar is not None:
        bar.update(1)
    if stop_requested:
        save(sampler.get_state(), evaluated=False)
        if master:
            say(f"stopped {'by signal' if signalled else 'as stop_at_iter says'} at iter {iter_num}; checkpoint saved "
                f"to {ckpt_file}; continue with --init_from=resume")
        break

if bar is not None:
    bar.close()
metrics.close()
if ddp:
    del model  # the DDP wrapper's reducer holds the process group (see teardown_distributed)
    teardown_distributed()
    # all saved: skip finalization, where gloo threads touching Python once aborted a finished run (CI, SIGABRT)
    before_hard_exit()
    os._exit(0)
