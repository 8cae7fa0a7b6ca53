# Financial PhraseBank sentiment, step 2: fine-tune the base (config/classify_base.py, which lists the data
# commands) on the classification prompts with AdamW; the loss falls on the label tokens + end of turn only.
# python train.py config/classify_adamw.py && python evaluate.py classify --checkpoint=out/classify_adamw --dataset=fpb
out_dir = "out/classify_adamw"
init_from = "out/classify_base/ckpt.pt"   # weights + architecture from the base; optimizer and schedule fresh
dataset = "fpb"                           # made by tokenize_data.py classify: examples + loss mask
optimizer = "adamw"
block_size = 256                          # the longest example is 250 tokens: none truncated
batch_size = 16
max_iters = 800
eval_interval = 100
eval_iters = 10
lr_schedule = "cosine"
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
