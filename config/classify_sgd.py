# Financial PhraseBank sentiment, step 2 with SGD + Nesterov momentum instead of AdamW (half the optimizer
# state). Same base and data as config/classify_adamw.py; SGD needs a much larger learning rate.
# python train.py config/classify_sgd.py && python evaluate.py classify --checkpoint=out/classify_sgd --dataset=fpb
out_dir = "out/classify_sgd"
init_from = "out/classify_base/ckpt.pt"
dataset = "fpb"
optimizer = "sgd"
momentum = 0.9
block_size = 256
batch_size = 16
max_iters = 800
eval_interval = 100
eval_iters = 10
lr_schedule = "cosine"
warmup_iters = 20
learning_rate = 0.1
min_lr = 0.01
weight_decay = 0.0
