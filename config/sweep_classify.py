# Evidence grid 2 (README "Choosing an optimizer and schedule"): Financial PhraseBank sentiment fine-tuning from one
# pretrained base. The base (a 0.2M-parameter Llama, its own 512-token vocab trained on the train split's
# sentences) learns the train sentences as plain text for 200 steps; then each optimizer fine-tunes it on the
# classification prompts for 150 steps (cosine, 10 warmup), two learning rates x 2 seeds, and evaluate.py classify
# scores the 970 held-out sentences (stratified 20%): accuracy and macro F1.
#   nice -n 10 python sweep.py config/sweep_classify.py    -> docs/sweep_classify.{md,json,png}
grid = "classify"
workdir = "out/sweep"
classify_source = "../shared/data/financial_phrasebank/all-data.csv"
classify_text_field = "news"
vocab_size = 512
model = "--dim=64 --n_layers=4 --n_heads=4 --n_kv_heads=2 --block_size=256 --batch_size=16"
max_iters = 200                 # the base
warmup_iters = 10
min_lr_ratio = 0.1
eval_iters = 8
base_flags = "--optimizer=adamw --learning_rate=3e-3 --weight_decay=0.1"
finetune_iters = 150
finetune_flags = "--lr_schedule=cosine"
arms = (
    ("sgd", "--optimizer=sgd --momentum=0.9 --nesterov=True --weight_decay=0.0", "learning_rate", (0.1, 0.3)),
    ("adamw", "--optimizer=adamw --weight_decay=0.1", "learning_rate", (1e-3, 3e-3)),
    ("lion", "--optimizer=lion --beta2=0.99 --weight_decay=0.5", "learning_rate", (1e-4, 3e-4)),
    ("muon", "--optimizer=muon --learning_rate=1e-3 --muon_adjust_lr_fn=original", "muon_lr", (0.01, 0.03)),
)
