# Our default recipe for a 0.2M-parameter model (dim 64, 4 layers), from evidence grid 1 (README "Choosing an
# optimizer and schedule", config/sweep_pretrain.py): Muon on the block matrices at muon_lr 0.03 (AdamW at 1e-2 on
# embeddings and norms), warmup-stable-decay with a 20% 1-sqrt cooldown. At the same 409,600 tokens of Tiny
# Shakespeare it reached val loss 3.01 (2 seeds) where llama2.c's default recipe (AdamW 5e-4, cosine) reached 4.67
# and our best AdamW 3.65.
# Data (from the repo root):
#   python tokenize_data.py download --source=../shared/data/tinyshakespeare/input.txt --dataset=shakespeare
#   python tokenize_data.py train_vocab --dataset=shakespeare --vocab_size=512
#   python tokenize_data.py pretokenize --dataset=shakespeare --vocab_size=512
# Then: python train.py config/tiny_shakespeare.py      (needs torch >= 2.9 for Muon)
out_dir = "out/tiny_shakespeare"
dataset = "shakespeare"
dim = 64
n_layers = 4
n_heads = 4
n_kv_heads = 2
block_size = 128
batch_size = 16
max_iters = 200
eval_interval = 50
eval_iters = 8
optimizer = "muon"
muon_lr = 0.03
muon_adjust_lr_fn = "original"
learning_rate = 1e-2             # the AdamW part (embeddings, norms; the head is tied)
weight_decay = 0.1
lr_schedule = "wsd"
cooldown_frac = 0.2
cooldown_shape = "1-sqrt"
warmup_iters = 10
min_lr = 1e-3                    # Muon's floor is min_lr x muon_lr / learning_rate
