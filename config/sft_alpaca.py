# Instruction tuning (full fine-tune) on Alpaca-format records, loss on the answers only. The 1,100 records of
# LLMs-from-scratch are short (median 69 tokens with the demo vocab) and fit the demo model's 128-token context;
# the shared Alpaca subset's answers are ~670 tokens with that code-trained vocab: use a base with a longer
# context and an English vocab for it (train.py reports how many examples truncation leaves without an answer).
#   python tokenize_data.py sft --source=../shared/data/llms_from_scratch/instruction-data.json \
#       --dataset=alpaca --tokenizer=out/demo/ckpt.pt --show=1        # the checkpoint's own tokenizer
#   python train.py config/sft_alpaca.py
#   python generate.py --checkpoint=out/sft_alpaca --chat=True --prompt="Give three tips for staying healthy."
# (chat JSONL with {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} works the same way)
out_dir = "out/sft_alpaca"
init_from = "out/demo/ckpt.pt"
dataset = "alpaca"              # format "sft": examples + loss mask; padded per batch
block_size = 128                # examples longer than 129 tokens are truncated (train.py reports how many)
batch_size = 16
max_iters = 300
eval_interval = 100
eval_iters = 10
lr_schedule = "cosine"
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
dropout = 0.1
