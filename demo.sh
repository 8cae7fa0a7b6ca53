#!/usr/bin/env bash
# The offline demo, end to end on a CPU in a few minutes: the Python standard library as a corpus
# -> a 512-token SentencePiece vocab -> token arrays -> a ~1M-parameter Llama -> a sample.
set -euo pipefail
cd "$(dirname "$0")"
python tokenize_data.py download --source=stdlib            # data/demo/docs.jsonl: one document per stdlib .py file
python tokenize_data.py train_vocab --dataset=demo --vocab_size=512
python tokenize_data.py pretokenize --dataset=demo --vocab_size=512
python train.py config/demo.py                               # out/demo/ckpt.pt + out/demo/metrics.jsonl
echo "--- a sample from the demo model (prompt: def ) ---"
python generate.py --checkpoint=out/demo/ckpt.pt --prompt="def " --max_new_tokens=200 --temperature=0.8
