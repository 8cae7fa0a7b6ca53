# Evidence grid 1 (README "Choosing an optimizer and schedule"): pretraining a 0.23M-parameter Llama on Tiny
# Shakespeare (its own 512-token vocab) at one token budget, 200 steps x 16 x 128 = 409,600 tokens (about one
# epoch). Each optimizer at three or four peak learning rates x 2 seeds (cosine, 5% warmup, min_lr = lr/10), scored
# on the whole val split; then every schedule with the best of them; then llama2.c's default recipe at the same
# budget, the baseline to beat.
#   nice -n 10 python sweep.py config/sweep_pretrain.py    -> docs/sweep_pretrain.{md,json,png}
grid = "pretrain"
workdir = "out/sweep"
corpus = "../shared/data/tinyshakespeare/input.txt"
vocab_size = 512
model = "--dim=64 --n_layers=4 --n_heads=4 --n_kv_heads=2 --block_size=128 --batch_size=16"
max_iters = 200
warmup_iters = 10
eval_iters = 8
min_lr_ratio = 0.1
arms = (
    ("sgd", "--optimizer=sgd --momentum=0.9 --nesterov=True --weight_decay=0.0", "learning_rate",
     (0.03, 0.1, 0.3, 1.0)),
    ("adamw", "--optimizer=adamw --weight_decay=0.1", "learning_rate", (1e-3, 3e-3, 1e-2, 3e-2)),
    # Lion: lr 3-10x below AdamW's and weight decay 3-10x above, so that lr x weight_decay stays alike
    ("lion", "--optimizer=lion --beta2=0.99 --weight_decay=0.5", "learning_rate", (3e-4, 1e-3, 3e-3, 1e-2)),
    # Muon: muon_lr is swept; learning_rate is the AdamW part's (embeddings, norms, head)
    ("muon", "--optimizer=muon --learning_rate=1e-2 --muon_adjust_lr_fn=original", "muon_lr", (0.01, 0.03, 0.1)),
)
schedules = (  # cosine is the grid above
    ("constant", "--lr_schedule=constant"),
    ("onecycle", "--lr_schedule=onecycle --warmup_iters=0"),  # 30% ramp from lr/25, then cosine
    ("wsd linear", "--lr_schedule=wsd --cooldown_frac=0.2 --cooldown_shape=linear"),
    ("wsd 1-sqrt", "--lr_schedule=wsd --cooldown_frac=0.2 --cooldown_shape=1-sqrt"),
)
# llama2.c's train.py defaults: AdamW 5e-4, betas 0.9/0.95, weight decay 0.1, grad clip 1.0, cosine to min_lr 0
# after a warmup of 1% of the run (1000 of 100,000 iterations: 2 of our 200)
baseline = ("llama2.c default", "--optimizer=adamw --learning_rate=5e-4 --beta1=0.9 --beta2=0.95 --weight_decay=0.1 "
            "--grad_clip=1.0 --lr_schedule=cosine --min_lr=0.0 --warmup_iters=2")
