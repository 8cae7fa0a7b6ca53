"""The evidence for choosing an optimizer and a schedule, on your CPU in minutes: grids of train.py runs, each
written as a table (docs_dir/sweep_<grid>.md and .json) and a plot (docs_dir/sweep_<grid>.png).

    nice -n 10 python sweep.py config/sweep_pretrain.py    # 1. pretraining at one token budget: optimizers x
                                                           #    learning rates x seeds, then each schedule with
                                                           #    the best of them, and llama2.c's recipe
    nice -n 10 python sweep.py config/sweep_classify.py    # 2. Financial PhraseBank fine-tuning from one base
    nice -n 10 python sweep.py config/sweep_continual.py   # 3. pretrain on one half of a corpus, continue on the
                                                           #    other: gain on the new half, forgetting on the old

Every run is a train.py (then evaluate.py) subprocess with one thread, `jobs` at a time. A finished run keeps
its result.json in workdir and is not run again: a stopped grid continues where it was, and changing only the
drawing costs nothing. A run that diverges (nan) is a result too ("diverged"), not an error.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

# -----------------------------------------------------------------------------
grid = "pretrain"               # 'pretrain', 'classify' or 'continual'
workdir = "out/sweep"           # datasets and runs; a run already finished here is not run again
docs_dir = "docs"               # where the table (sweep_<grid>.md, .json) and the plot (sweep_<grid>.png) go
jobs = 2                        # train.py processes at once, one thread each
seeds = (1337, 1338)            # every cell of a grid runs once per seed
corpus = "../shared/data/tinyshakespeare/input.txt"  # pretrain, continual: a text file (blank lines end documents)
vocab_size = 512                # SentencePiece vocab trained on the corpus (continual: its old half; classify: the
                                # train split's sentences)
model = "--dim=64 --n_layers=4 --n_heads=4 --n_kv_heads=2 --block_size=128 --batch_size=16"  # train.py flags of
                                # every run: the model and the batch
max_iters = 300                 # steps of each pretraining run (tokens = max_iters x batch_size x block_size)
warmup_iters = 15               # every run's warmup, unless its flags say otherwise
min_lr_ratio = 0.1              # min_lr = min_lr_ratio x learning_rate, unless a run's flags say otherwise
eval_points = 4                 # evaluations per run after the first (the curves in the plot)
eval_iters = 10                 # batches per evaluation (pretrain, continual)
arms = (("adamw", "--optimizer=adamw", "learning_rate", (1e-3, 3e-3, 1e-2)),)  # (name, train.py flags, the key
                                # swept, its values): one arm per optimizer setting
schedules = ()                  # pretrain: (name, flags) pairs, each run with the best arm at its best value
baseline = ("", "")             # pretrain: (name, flags) of the recipe to beat, at the same token budget
base_flags = "--optimizer=adamw --learning_rate=3e-3 --max_iters=300"  # classify, continual: the base model's run
finetune_iters = 200            # classify, continual: steps of each run from the base
finetune_flags = ""             # classify, continual: flags of every run from the base (schedule, warmup, ...)
classify_source = "../shared/data/financial_phrasebank/all-data.csv"  # classify: labelled CSV/JSONL/txt
classify_text_field = "news"    # classify: the column holding the text
# -----------------------------------------------------------------------------
from runtime import UsageError, atomic_file, check, handle_errors, write_text  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
GRIDS = ("pretrain", "classify", "continual")


def tool(script, *args, log=None):
    """One of our scripts in a subprocess with one thread; returns (exit status, seconds). Output goes to log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    t0 = time.time()
    with open(log or os.devnull, "w") as out:
        rc = subprocess.run([sys.executable, os.path.join(REPO, script), *args], env=env, stdout=out,
                            stderr=subprocess.STDOUT, check=False).returncode
    return rc, time.time() - t0


def must(script, *args):
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    log = os.path.join(workdir, "logs", f"{script[:-3]}_{args[0]}_{zlib.crc32(' '.join(args).encode()):08x}.log")
    rc, _ = tool(script, *args, log=log)
    check(rc == 0, f"python {script} {' '.join(args)} failed (exit {rc}); its output is in {log}")


def data_flags(dataset):
    return [f"--data_root={os.path.join(workdir, 'data')}", f"--dataset={dataset}"]


def text_dataset(name, source, tokenizer=""):
    """Pretokenize a text file into workdir/data/name, with its own vocab unless a tokenizer is given."""
    if os.path.exists(os.path.join(workdir, "data", name, "meta.json")):
        return
    must("tokenize_data.py", "download", f"--source={os.path.abspath(source)}", *data_flags(name))
    if not tokenizer:
        must("tokenize_data.py", "train_vocab", *data_flags(name), f"--vocab_size={vocab_size}")
    must("tokenize_data.py", "pretokenize", *data_flags(name), f"--vocab_size={vocab_size}", "--num_workers=1",
         *([f"--tokenizer={tokenizer}"] if tokenizer else []))


def save_json(path, obj, indent=None):
    write_text(path, json.dumps(obj, indent=indent))  # atomic: a stopped grid never leaves a torn result behind


def lr_of(flags):
    """The learning_rate a run's flags end up with (the last one wins, as in train.py)."""
    values = [f.split("=", 1)[1] for f in flags if f.startswith("--learning_rate=")]
    return float(values[-1]) if values else 5e-4


def train(name, flags, iters, extra_eval=None):
    """One train.py run (cached): its final val loss, curve, tokens, time and peak memory, plus extra_eval(run dir)
    merged in. flags come after the grid's defaults, so they win."""
    out_dir = os.path.join(workdir, "runs", grid, name)
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            res = json.load(f)
        if res["status"] == "ok" and extra_eval and not res.get("evaluated"):  # the grid gained an evaluation
            res.setdefault("sampled_val_loss", res["val_loss"])
            res.update(extra_eval(out_dir), evaluated=True)
            save_json(done, res)
        return res
    os.makedirs(out_dir, exist_ok=True)
    defaults = [*model.split(), f"--max_iters={iters}", f"--warmup_iters={warmup_iters}",
                f"--eval_interval={max(1, iters // eval_points)}", f"--eval_iters={eval_iters}", "--log_interval=10",
                "--progress=False", "--overwrite=True", f"--out_dir={out_dir}"]
    flags = [*defaults, f"--min_lr={min_lr_ratio * lr_of([*defaults, *flags]):g}", *flags]
    load0 = os.getloadavg()[0]
    rc, wall = tool("train.py", *flags, log=os.path.join(out_dir, "train.log"))
    recs = []
    if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    evals, steps = [r for r in recs if r["type"] == "eval"], [r for r in recs if r["type"] == "train"]
    res = {"name": name, "flags": " ".join(flags[len(defaults):]), "status": "ok" if rc == 0 else "diverged",
           "val_loss": evals[-1]["val_loss"] if rc == 0 else None, "tokens": steps[-1]["tokens"] if steps else 0,
           "curve": [(r["tokens"], r["val_loss"]) for r in evals], "wall_s": round(wall, 1),
           "train_s": round(sum(r["ms_per_iter"] * (r["iter"] - p["iter"]) / 1000  # evaluations excluded
                                for p, r in zip([{"iter": 0}, *steps], steps)), 1), "load": [load0, os.getloadavg()[0]],
           "peak_rss_mb": round(max((r["peak_mem_gb"] for r in steps), default=0) * 1024, 1),
           "lrs": [(r["tokens"], r["lr"]) for r in steps]}
    res["sampled_val_loss"] = res["val_loss"]  # train.py's last evaluation: eval_iters random batches
    if rc == 0 and extra_eval:
        res.update(extra_eval(out_dir), evaluated=True)
    if rc != 0:
        with open(os.path.join(out_dir, "train.log")) as f:
            last = f.read().strip().splitlines()[-1:]
        check(last and "nan/inf" in last[0], f"train.py failed in {out_dir} (not a divergence): {last}")
    save_json(done, res)
    return res


def run_all(specs):
    """specs: (name, flags, iters, extra_eval) tuples, run `jobs` at a time; their results in order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train, *s) for s in specs]
        out = []
        for s, fut in zip(specs, futures):
            out.append(fut.result())
            r = out[-1]
            print(f"  {s[0]:<34} {r['status']:<8} val loss {r['val_loss'] or float('nan'):.4f}"
                  + "".join(f"  {k} {r[k]:.3f}" for k in ("accuracy", "macro_f1", "old_loss") if k in r)
                  + f"  {r['train_s']:.0f} s", flush=True)
    return out


def arm_specs(arms_, iters, flags_before=(), extra_eval=None):
    return [(f"{slug(name)}_{key}{v:g}_s{seed}", [*flags_before, *flags.split(), f"--{key}={v}", f"--seed={seed}"],
             iters, extra_eval) for name, flags, key, values in arms_ for v in values for seed in seeds]


def slug(name):
    return re.sub(r"[^\w.]+", "-", name).strip("-")  # a folder name


def cells(results, arms_):
    """Group runs by (arm, value): [{arm, key, value, runs, mean}] with mean over seeds (None if any diverged)."""
    out, i = [], 0
    for name, _, key, values in arms_:
        for v in values:
            runs = results[i:i + len(seeds)]
            i += len(seeds)
            ok = all(r["status"] == "ok" for r in runs)
            out.append({"arm": name, "key": key, "value": v, "runs": runs,
                        **{m: (sum(r[m] for r in runs) / len(runs) if ok else None) for m in runs[0]
                           if m in ("val_loss", "accuracy", "macro_f1", "old_loss", "new_loss")}})
    return out


def best(cells_, metric="val_loss", lower=True):
    ok = [c for c in cells_ if c.get(metric) is not None]
    return min(ok, key=lambda c: c[metric] if lower else -c[metric]) if ok else None


def state_mib(arm_flags):
    """The optimizer state of the grid's model under this arm's optimizer, in MiB (fp32): exact, from optim.py's
    registry (the peak RSS column is coarse at this size: allocator caches count too)."""
    import optim
    from model import ModelArgs, Transformer
    opt = next((f.split("=", 1)[1] for f in arm_flags.split() if f.startswith("--optimizer=")), "adamw")
    shape = {f.split("=", 1)[0][2:]: int(f.split("=", 1)[1]) for f in model.split() if f[2:].split("=")[0] in
             ("dim", "n_layers", "n_heads", "n_kv_heads")}
    m = Transformer(ModelArgs(vocab_size=vocab_size, max_seq_len=8, **shape))
    return optim.state_numel(m.named_parameters(), opt) * 4 / 2**20


def measured(c, metric):
    """The mean over seeds in bold, then each seed's value."""
    if c.get(metric) is None:
        return "diverged" if c["runs"] else ""
    each = " / ".join("diverged" if r.get(metric) is None else f"{r[metric]:.3f}" for r in c["runs"])
    return f"**{c[metric]:.3f}** ({each})"


def row(label, hp, c, metrics, arm_flags=None):
    """A table row: label, hyper-parameters, each metric, tokens, train seconds (mean), peak RSS, optimizer state."""
    runs = c["runs"]
    cols = [label, hp, *(measured(c, m) for m in metrics), f"{runs[0]['tokens']:,}",
            f"{sum(r['train_s'] for r in runs) / len(runs):.0f}", f"{max(r['peak_rss_mb'] for r in runs):.0f}"]
    return "| " + " | ".join(cols + ([f"{state_mib(arm_flags):.3f}"] if arm_flags is not None else [])) + " |"


def table(*columns):
    return f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}"


COSTS = ("tokens", "train s (mean)", "peak RSS MB")


def write(tables, results, drawing):
    """docs_dir/sweep_<grid>.md (the tables), .json (every run) and .png (drawing(plt, fig))."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    os.makedirs(docs_dir, exist_ok=True)
    stem = os.path.join(docs_dir, f"sweep_{grid}")
    loads = [x for r in results for x in r["load"]]
    head = (f"<!-- written by python sweep.py config/sweep_{grid}.py; {len(results)} runs; model flags: {model}; "
            f"1 thread per run, {jobs} at a time; 1-min load average {min(loads):.1f}-{max(loads):.1f} on "
            f"{os.cpu_count()} cores -->\n")
    write_text(stem + ".md", head + "\n\n".join(tables) + "\n")
    save_json(stem + ".json", {"grid": grid, "model": model, "seeds": list(seeds), "runs": results}, indent=1)
    fig = drawing(plt)
    fig.tight_layout()
    with atomic_file(stem + ".png") as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    print(f"wrote {stem}.md, {stem}.json, {stem}.png")


def lr_panel(ax, cells_, metric, ylabel):
    for k, name in enumerate(dict.fromkeys(c["arm"] for c in cells_)):
        mine = [c for c in cells_ if c["arm"] == name]
        xs = [c["value"] for c in mine if c.get(metric) is not None]
        ax.plot(xs, [c[metric] for c in mine if c.get(metric) is not None], "o-", color=f"C{k}", label=name)
        for c in mine:
            ax.plot([c["value"]] * len(c["runs"]), [r.get(metric) or math.nan for r in c["runs"]], ".",
                    color=f"C{k}", alpha=0.5)
            if c.get(metric) is None:
                ax.annotate("x", (c["value"], ax.get_ylim()[1]), color=f"C{k}", ha="center", va="top")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate swept (Muon: muon_lr)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# ---- 1. pretraining ----------------------------------------------------------------------------

def full_val(out_dir):
    """The final weights' loss on the whole val split, the same tokens for every run: train.py's evaluations
    sample eval_iters random batches, and that noise would count against the optimizer."""
    js = os.path.join(out_dir, "val.json")
    must("evaluate.py", "loss", f"--checkpoint={out_dir}", *data_flags("text"), f"--json_out={js}")
    with open(js) as f:
        return {"val_loss": json.load(f)["loss"]}


def pretrain():
    text_dataset("text", corpus)
    results = run_all(arm_specs(arms, max_iters, data_flags("text"), full_val))
    grid_cells = cells(results, arms)
    top = best(grid_cells)
    check(top is not None, "every run of the grid diverged: lower the learning rates in arms")
    top_arm = next(a for a in arms if a[0] == top["arm"])
    sched = [(f"sched_{name.replace(' ', '_')}_s{seed}", [*data_flags("text"), *top_arm[1].split(),
              f"--{top['key']}={top['value']}", *flags.split(), f"--seed={seed}"], max_iters, full_val)
             for name, flags in schedules for seed in seeds]
    base = [(f"baseline_s{seed}", [*data_flags("text"), *baseline[1].split(), f"--seed={seed}"], max_iters,
             full_val) for seed in seeds] if baseline[0] else []
    extra = run_all(sched + base)
    sched_cells = [{"arm": name, "runs": extra[i * len(seeds):(i + 1) * len(seeds)]} for i, (name, _) in
                   enumerate(schedules)]
    base_cell = {"arm": baseline[0], "runs": extra[len(sched):]}
    for c in sched_cells + [base_cell]:
        c["val_loss"] = (sum(r["val_loss"] for r in c["runs"]) / len(c["runs"])
                         if c["runs"] and all(r["status"] == "ok" for r in c["runs"]) else None)
    is_best = lambda c, cs: c is best([x for x in cs if x["arm"] == c["arm"]])  # noqa: E731
    loss = "final val loss, whole val split: mean (seeds)"
    t1 = [table("optimizer", "peak lr (cosine)", loss, *COSTS, "optimizer state MiB")]
    t1 += [row(c["arm"], f"{c['key']}={c['value']:g}" + (" (best)" if is_best(c, grid_cells) else ""), c,
               ["val_loss"], next(a[1] for a in arms if a[0] == c["arm"])) for c in grid_cells]
    t1 += [row(f"{baseline[0]} (baseline)", baseline[1].replace("--", ""), base_cell, ["val_loss"], baseline[1])
           ] if base else []
    t2 = [table("schedule", f"with {top['arm']}, {top['key']}={top['value']:g}", loss, *COSTS)]
    t2 += [row(name, flags.replace("--", ""), c, ["val_loss"]) for (name, flags), c in zip(schedules, sched_cells)]
    sched_cells.insert(0, {**top, "arm": "cosine (the grid's)"})  # cosine: the grid's own runs, not run again
    t2.insert(1, row("cosine (the grid's runs)", "", top, ["val_loss"]))

    def drawing(plt):
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.6))
        lr_panel(a1, grid_cells, "val_loss", "final val loss (nats/token)")
        a1.set_title(f"optimizers, {max_iters} steps, cosine")
        curves = [(best([c for c in grid_cells if c["arm"] == a[0]]), a[0]) for a in arms]
        curves += [(base_cell, f"{baseline[0]}")] if base else []
        for k, (c, label) in enumerate(curves):
            if c and c.get("val_loss") is not None:
                xs, ys = zip(*c["runs"][0]["curve"])
                a2.plot([x / 1e3 for x in xs], ys, "-", marker=".", color=f"C{k}", label=f"{label} {c['val_loss']:.3f}")
        a2.set_title(f"val loss ({eval_iters} sampled batches), best lr of each (seed 1)")
        a2.set_xlabel("tokens (thousands)")
        for k, c in enumerate(sched_cells):
            if c["runs"]:
                xs, ys = zip(*c["runs"][0]["lrs"])
                a3.plot([x / 1e3 for x in xs], [y / max(ys) for y in ys], color=f"C{k}", label=f"{c['arm']}: " + (
                    "diverged" if c["val_loss"] is None else f"{c['val_loss']:.3f}"))
        a3.set_title(f"schedules ({top['arm']}): lr / peak, final val loss")
        a3.set_xlabel("tokens (thousands)")
        for ax in (a2, a3):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        return fig
    write(["\n".join(t1), "\n".join(t2)], results + extra, drawing)


# ---- 2. classification fine-tuning ---------------------------------------------------------------

def classify():
    d = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(d, "fpb", "meta.json")):
        split = ["classify", f"--source={os.path.abspath(classify_source)}", f"--text_field={classify_text_field}",
                 "--dataset=fpb", f"--data_root={d}", "--val_fraction=0.2"]
        must("tokenize_data.py", *split, f"--tokenizer={os.path.join(REPO, '../shared/data/stories260K/tok512.model')}")
        text_dataset("fpb_lm", os.path.join(d, "fpb", "train.classify.jsonl"))  # the base learns the train split only
        must("tokenize_data.py", *split, f"--tokenizer={os.path.join(d, 'fpb_lm', f'tok{vocab_size}.model')}")
    [base] = run_all([("base", [*data_flags("fpb_lm"), *base_flags.split()], max_iters, None)])
    ckpt = os.path.join(workdir, "runs", grid, "base", "ckpt.pt")

    def scores(out_dir):
        js = os.path.join(out_dir, "classify.json")
        must("evaluate.py", "classify", f"--checkpoint={out_dir}", *data_flags("fpb"), f"--json_out={js}")
        with open(js) as f:
            r = json.load(f)
        return {k: r[k] for k in ("accuracy", "macro_f1", "majority_label", "majority_accuracy")}
    before = scores(os.path.dirname(ckpt))
    results = run_all(arm_specs(arms, finetune_iters, [*data_flags("fpb"), f"--init_from={ckpt}",
                                                       *finetune_flags.split(), "--eval_iters=4"], scores))
    grid_cells = cells(results, arms)
    t = [table("optimizer", "peak lr (cosine)", "accuracy: mean (seeds)", "macro F1: mean (seeds)", *COSTS,
               "optimizer state MiB"),
         f"| majority class (`{before['majority_label']}`) | | {before['majority_accuracy']:.3f} | | | | | |",
         f"| base LM, no fine-tuning | | {before['accuracy']:.3f} | {before['macro_f1']:.3f} | | | | |"]
    t += [row(c["arm"], f"{c['key']}={c['value']:g}" + (" (best)" if c is best([x for x in grid_cells if x["arm"] ==
          c["arm"]], "macro_f1", False) else ""), c, ["accuracy", "macro_f1"], next(a[1] for a in arms
          if a[0] == c["arm"])) for c in grid_cells]

    def drawing(plt):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        lr_panel(a1, grid_cells, "accuracy", "held-out accuracy")
        lr_panel(a2, grid_cells, "macro_f1", "held-out macro F1")
        for ax, v in ((a1, before["majority_accuracy"]), (a2, before["macro_f1"])):
            ax.axhline(v, color="gray", ls="--", lw=1)
        a1.set_title(f"Financial PhraseBank, {finetune_iters} steps (dashed: majority class)")
        a2.set_title("dashed: the base LM before fine-tuning")
        return fig
    write(["\n".join(t)], [base, *results], drawing)


# ---- 3. continual re-training --------------------------------------------------------------------

def continual():
    d = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(d, "new", "meta.json")):
        with open(corpus, encoding="utf-8") as f:
            text = f.read()
        cut = text.find("\n\n", len(text) // 2) + 2  # at a document boundary near the middle
        os.makedirs(os.path.join(workdir, "halves"), exist_ok=True)
        for half, part in (("old", text[:cut]), ("new", text[cut:])):
            with open(os.path.join(workdir, "halves", f"{half}.txt"), "w", encoding="utf-8") as f:
                f.write(part)
        text_dataset("old", os.path.join(workdir, "halves", "old.txt"))
        text_dataset("new", os.path.join(workdir, "halves", "new.txt"),
                     os.path.join(d, "old", f"tok{vocab_size}.model"))  # the old half's vocab, as a deployed model has

    def losses(out_dir):
        res = {}
        for half in ("old", "new"):
            js = os.path.join(out_dir, f"loss_{half}.json")
            must("evaluate.py", "loss", f"--checkpoint={out_dir}", *data_flags(half), f"--json_out={js}")
            with open(js) as f:
                res[f"{half}_loss"] = json.load(f)["loss"]
        return res
    [base] = run_all([("base", [*data_flags("old"), *base_flags.split()], max_iters, losses)])
    ckpt = os.path.join(workdir, "runs", grid, "base", "ckpt.pt")
    results = run_all(arm_specs(arms, finetune_iters, [*data_flags("new"), f"--init_from={ckpt}",
                                                       *finetune_flags.split()], losses))
    grid_cells = cells(results, arms)
    t = [table("optimizer (flat lr)", "lr", "new-half val loss: mean (seeds)", "old-half val loss: mean (seeds)",
               "forgetting (old-half rise)", *COSTS),
         (f"| base (pretrained on the old half) | {base_flags.replace('--', '')} | {base['new_loss']:.3f} | "
          f"{base['old_loss']:.3f} | | {base['tokens']:,} | {base['train_s']:.0f} | {base['peak_rss_mb']:.0f} |")]
    for c in grid_cells:
        forget = "" if c.get("old_loss") is None else f"{c['old_loss'] - base['old_loss']:+.3f}"
        cols = row(c["arm"], f"{c['key']}={c['value']:g}", c, ["new_loss", "old_loss"]).split(" | ")
        t.append(" | ".join(cols[:4] + [forget] + cols[4:]))

    def drawing(plt):
        fig, ax = plt.subplots(figsize=(6.5, 4.6))
        ax.plot([base["new_loss"]], [base["old_loss"]], "k*", ms=12, label="base (old half only)")
        for k, name in enumerate(dict.fromkeys(c["arm"] for c in grid_cells)):
            mine = [c for c in grid_cells if c["arm"] == name and c.get("new_loss") is not None]
            ax.plot([c["new_loss"] for c in mine], [c["old_loss"] for c in mine], "o-", color=f"C{k}", label=name)
            for c in mine:
                ax.annotate(f"{c['value']:g}", (c["new_loss"], c["old_loss"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("val loss on the new half (lower: learned it)")
        ax.set_ylabel("val loss on the old half (higher: forgot it)")
        ax.set_title(f"continual re-training, {finetune_iters} steps at a flat lr (labels: lr)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig
    write(["\n".join(t)], [base, *results], drawing)


if __name__ == "__main__":
    handle_errors()
    from configurator import configure, require
    config = configure(globals(), sys.argv[1:])
    check(grid in GRIDS, f"grid='{grid}' is not one of {', '.join(GRIDS)}")
    require(config, positive=("jobs", "max_iters", "finetune_iters", "eval_points", "eval_iters", "vocab_size"),
            non_negative=("warmup_iters", "min_lr_ratio"))
    check(seeds and arms, "seeds and arms must each name at least one")
    for arm in arms:
        check(len(arm) == 4 and isinstance(arm[3], (tuple, list)) and arm[3], f"arms entry {arm!r} must be (name, "
              f"flags, key, (values, ...)) as in config/sweep_pretrain.py")
    if not os.path.exists(corpus) and grid != "classify":
        raise UsageError(f"corpus {corpus} not found; pass --corpus=PATH to a text file")
    {"pretrain": pretrain, "classify": classify, "continual": continual}[grid]()
