# The TinyStories-Instruct recipe: prompts built from a story's required words and features
# ('Write a story. In the story, try to use the verb "climb", the noun "ring" and the adjective "messy". ...
# Possible story:'), the story as the answer. Needs the Instruct text (Hugging Face roneneldan/TinyStoriesInstruct,
# entries of "Features:/Words:/Summary:/Story:" lines split by <|endoftext|>), downloaded by you:
#   python tokenize_data.py sft --source=TinyStoriesInstruct-valid.txt --dataset=ts_instruct \
#       --tokenizer=out/stories/ckpt.pt --show=1
#   python train.py config/sft_tinystories.py
#   PROMPT='Write a story. In the story, try to use the verb "climb", the noun "ring" and the adjective "messy".'
#   python generate.py --checkpoint=out/sft_tinystories --chat=True \
#       --prompt="$PROMPT Possible story:"
out_dir = "out/sft_tinystories"
init_from = "out/stories/ckpt.pt"   # a TinyStories-pretrained base (any checkpoint with chat specials in its vocab)
dataset = "ts_instruct"
block_size = 256
batch_size = 16
max_iters = 1000
eval_interval = 200
eval_iters = 10
warmup_iters = 50
learning_rate = 5e-4
min_lr = 5e-5
