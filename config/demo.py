# The offline demo: a ~1M-parameter model on the Python standard library (data/demo), a few minutes on a laptop CPU.
# python tokenize_data.py download --source=stdlib && \
#   python tokenize_data.py train_vocab --dataset=demo --vocab_size=512
# python tokenize_data.py pretokenize --dataset=demo && python train.py config/demo.py
out_dir = "out/demo"
dataset = "demo"
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
block_size = 128
batch_size = 32
max_iters = 300
eval_interval = 50
eval_iters = 10
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.1
