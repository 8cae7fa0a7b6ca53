# DPO on the LLMs-from-scratch preference pairs (1,100 Alpaca-style records whose "chosen" answer is polite and whose
# "rejected" one is curt, rude or off), starting from the SFT model of config/sft_alpaca.py, which is also the frozen
# reference. Tokenize both with the same val_fraction and seed, so the held-out pairs are the held-out SFT records.
#   python tokenize_data.py sft --source=../shared/data/llms_from_scratch/instruction-data.json \
#       --dataset=alpaca --tokenizer=out/demo/ckpt.pt --val_fraction=0.1
#   python train.py config/sft_alpaca.py
#   python tokenize_data.py dpo --source=../shared/data/llms_from_scratch/instruction-data-with-preference.json \
#       --dataset=prefs --tokenizer=out/sft_alpaca/ckpt.pt --block_size=128 --val_fraction=0.1
#   python train.py config/dpo_alpaca.py
#   python evaluate.py preference --checkpoint=out/dpo_alpaca --dataset=prefs --reference=out/sft_alpaca
out_dir = "out/dpo_alpaca"
init_from = "out/sft_alpaca/ckpt.pt"
dataset = "prefs"               # format "preference": pairs; a batch of 16 pairs is 32 rows
block_size = 128                # as tokenize_data.py dpo --block_size (rows were cut to 129 tokens there)
batch_size = 16
max_iters = 200
eval_interval = 25
eval_iters = 8
lr_schedule = "cosine"
warmup_iters = 10
learning_rate = 3e-4
min_lr = 3e-5
weight_decay = 0.0              # decay pulls towards zero, not towards the reference
dropout = 0.0                   # off, as in most DPO recipes: policy and reference then score the same way
dpo_beta = 0.1
