"""sweep.py: a tiny pretraining grid end to end (train.py subprocesses), its table, plot and cache."""
import json
import os

import pytest

from conftest import REPO, run_script, shared

SHAKESPEARE = shared("tinyshakespeare", "input.txt")


@pytest.mark.skipif(not os.environ.get("LLAMAFORGE_SLOW"), reason="about 12 train.py, evaluate.py and tokenize_data.py "
                    "subprocesses (40 s on 2 quiet cores); set LLAMAFORGE_SLOW=1")
def test_pretrain_grid_writes_its_table_plot_and_runs_each_cell_once(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not found (../shared/data)")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:150_000])
    docs = tmp_path / "docs"
    flags = ["config/sweep_pretrain.py", f"--workdir={tmp_path / 'work'}", f"--docs_dir={docs}", f"--corpus={corpus}",
             "--model=--dim=32 --n_layers=1 --n_heads=2 --n_kv_heads=2 --block_size=32 --batch_size=4",
             "--max_iters=6", "--warmup_iters=1", "--eval_points=2", "--eval_iters=2", "--seeds=(1,)",
             # 1e4: SGD blows up to nan, a result of the grid ("diverged"), not an error
             "--arms=(('sgd', '--optimizer=sgd', 'learning_rate', (0.3, 1e4)), "
             "('muon', '--optimizer=muon --learning_rate=1e-2', 'muon_lr', (0.02,)))",
             "--schedules=(('wsd', '--lr_schedule=wsd --cooldown_frac=0.5 --log_interval=1'),)",
             "--baseline=('llama2.c', '--optimizer=adamw --learning_rate=5e-4')"]
    proc = run_script("sweep.py", *flags, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    md = (docs / "sweep_pretrain.md").read_text()
    rows = {line.split(" | ")[0][2:] + " " + line.split(" | ")[1]: line for line in md.splitlines()
            if line.startswith("| ") and " | " in line}
    assert "diverged" in rows["sgd learning_rate=10000"] and "(best)" in rows["sgd learning_rate=0.3 (best)"]
    assert "muon muon_lr=0.02 (best)" in rows and "llama2.c (baseline) optimizer=adamw learning_rate=5e-4" in rows
    assert "| 768 |" in rows["wsd lr_schedule=wsd cooldown_frac=0.5 log_interval=1"]  # tokens: 6 steps x 4 rows x 32
    runs = json.loads((docs / "sweep_pretrain.json").read_text())["runs"]
    by_name = {r["name"]: r for r in runs}
    assert by_name["sgd_learning_rate10000_s1"]["status"] == "diverged"
    assert all(r["tokens"] == 6 * 4 * 32 for r in runs if r["status"] == "ok")
    # the schedule ran with the best cell's optimizer and value; its lr follows wsd (flat, then down to min_lr)
    best = min((r for r in runs if r["status"] == "ok" and not r["name"].startswith(("sched", "baseline"))),
               key=lambda r: r["val_loss"])
    wsd = by_name["sched_wsd_s1"]
    assert best["flags"].split("--seed")[0] in wsd["flags"]
    lrs = [lr for _, lr in wsd["lrs"]]
    assert lrs[1:4] == pytest.approx([max(lrs)] * 3) and lrs[-1] < lrs[-2] < max(lrs)  # 6 steps: 1 warmup, 3 cooldown
    assert (docs / "sweep_pretrain.png").read_bytes()[:4] == b"\x89PNG"
    # a second call finds every result: nothing is run again, and the table is the same
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "runs").rglob("result.json")}
    assert len(stamps) == len(runs) == 5  # 3 cells, 1 schedule, the baseline
    proc = run_script("sweep.py", *flags, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (docs / "sweep_pretrain.md").read_text().split("-->")[1] == md.split("-->")[1]
