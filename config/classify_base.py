# Financial PhraseBank sentiment, step 1 of 3: pretrain a small base LM on the *train split's* sentences
# (plain text, no labels) so SGD and AdamW fine-tuning start from a model that knows the words.
# Data (from the repo root; ../shared/data is the shared data folder):
#   python tokenize_data.py classify --source=../shared/data/financial_phrasebank/all-data.csv --text_field=news \
#       --dataset=fpb --tokenizer=../shared/data/stories260K/tok512.model --val_fraction=0.2   # fixes the split
#   python tokenize_data.py download --source=data/fpb/train.classify.jsonl --dataset=fpb_lm
#   python tokenize_data.py train_vocab --dataset=fpb_lm --vocab_size=1024
#   python tokenize_data.py pretokenize --dataset=fpb_lm --vocab_size=1024
#   python tokenize_data.py classify --source=../shared/data/financial_phrasebank/all-data.csv --text_field=news \
#       --dataset=fpb --tokenizer=data/fpb_lm/tok1024.model --val_fraction=0.2   # same seeded split, own vocab
# Then: python train.py config/classify_base.py; python train.py config/classify_adamw.py (or classify_sgd.py);
#       python evaluate.py classify --checkpoint=out/classify_adamw --dataset=fpb
out_dir = "out/classify_base"
dataset = "fpb_lm"
dim = 96
n_layers = 4
n_heads = 4
n_kv_heads = 2
block_size = 256
batch_size = 16
max_iters = 400
eval_interval = 100
eval_iters = 10
warmup_iters = 20
learning_rate = 3e-3
min_lr = 3e-4
