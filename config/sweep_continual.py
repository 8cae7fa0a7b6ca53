# Evidence grid 3 (README "Choosing an optimizer and schedule"): continual re-training. Tiny Shakespeare is cut at a
# blank line near its middle; a 0.2M-parameter Llama (the old half's 512-token vocab) pretrains on the old half for
# 200 steps, then continues on the new half for 100 steps at a flat learning rate (no warmup), SGD vs AdamW, four
# learning rates x 2 seeds. evaluate.py loss measures both halves' val splits: the gain on the new half and the
# forgetting (loss rise) on the old one.
#   nice -n 10 python sweep.py config/sweep_continual.py    -> docs/sweep_continual.{md,json,png}
grid = "continual"
workdir = "out/sweep"
corpus = "../shared/data/tinyshakespeare/input.txt"
vocab_size = 512
model = "--dim=64 --n_layers=4 --n_heads=4 --n_kv_heads=2 --block_size=128 --batch_size=16"
max_iters = 200                 # the base, on the old half
warmup_iters = 10
min_lr_ratio = 0.1
eval_iters = 8
base_flags = "--optimizer=adamw --learning_rate=1e-2 --weight_decay=0.1"
finetune_iters = 100
finetune_flags = "--lr_schedule=constant --warmup_iters=0"
arms = (
    ("sgd", "--optimizer=sgd --momentum=0.9 --nesterov=True --weight_decay=0.0", "learning_rate",
     (0.03, 0.1, 0.3, 1.0)),
    ("adamw", "--optimizer=adamw --weight_decay=0.1", "learning_rate", (3e-4, 1e-3, 3e-3, 1e-2)),
)
