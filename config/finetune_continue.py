# Continued pretraining: start from a trained checkpoint (ours, a llama2.c .bin or a Hugging Face folder),
# keep its architecture and weights, start a fresh optimizer and a constant learning rate on new text.
# The data must be tokenized with the checkpoint's tokenizer (train.py refuses any other):
#   python tokenize_data.py download --source=../shared/data/tinyshakespeare/input.txt --dataset=shakespeare
#   python tokenize_data.py pretokenize --dataset=shakespeare --tokenizer=data/demo/tok512.model
#   python train.py config/finetune_continue.py                    # AdamW
#   python train.py config/finetune_continue.py --optimizer=sgd --learning_rate=0.05 --out_dir=out/continue_sgd
out_dir = "out/continue"
init_from = "out/demo/ckpt.pt"  # the base (config/demo.py); any checkpoint path works
dataset = "shakespeare"
optimizer = "adamw"
lr_schedule = "constant"        # no decay: continued pretraining often runs open-ended
warmup_iters = 20               # a short re-warmup: the fresh optimizer's first steps are noisy
learning_rate = 5e-4            # lower than pretraining's peak, so the base is not wrecked
block_size = 128
batch_size = 32
max_iters = 200
eval_interval = 50
eval_iters = 10
