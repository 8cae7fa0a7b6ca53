# LoRA instruction tuning: the base stays frozen, rank-8 adapters on the attention projections train.
# Data as in config/sft_alpaca.py. out/lora_sft/ckpt.pt then holds the adapters (+ optimizer state), not the base.
#   python train.py config/lora_sft.py                        # prints trainable/total params and memory saved
#   python train.py config/lora_sft.py --init_from=resume     # continues exactly (the base is re-read from its path)
#   python generate.py --checkpoint=out/demo/ckpt.pt --adapter=out/lora_sft/ckpt.pt --chat=True --prompt="..."
#   python lora.py merge --adapter=out/lora_sft/ckpt.pt --out=out/lora_sft_merged.pt   # an ordinary full checkpoint
out_dir = "out/lora_sft"
init_from = "out/demo/ckpt.pt"  # the base; recorded (with a fingerprint of its weights) in the adapter
dataset = "alpaca"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = ("wq", "wk", "wv", "wo")   # add "w1", "w2", "w3" to adapt the feed-forward layers too
weight_decay = 0.0              # decaying adapters pulls them to zero = back to the base
block_size = 128
batch_size = 16
max_iters = 300
eval_interval = 100
eval_iters = 10
warmup_iters = 20
learning_rate = 3e-3            # adapters tolerate a higher LR than full fine-tuning
min_lr = 3e-4
