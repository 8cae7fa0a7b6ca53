#!/usr/bin/env bash
# The GPU plan of BENCHMARKS.md ("GPU targets") as one call, sized to finish in ~8 minutes on one H100/H200 so a
# 15-minute device lease leaves room for one rerun:
#   bash gpu_plan.sh                      # on the GPU machine: JSON and logs in $OUT (default gpu_out/)
#   GPU_PLAN_SMOKE=1 bash gpu_plan.sh     # the same commands on a CPU at the tiny size: check them before a lease
# Every step has its own timeout, so a slow step costs its own figures only; the log of each is kept whole.
# llama2.c/ (a git-ignored llama2.c checkout in the repo, carried to the GPU machine) adds llama2.c's own train.py
# beside ours at 110M; without it that comparison is skipped.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
if [ "${GPU_PLAN_SMOKE:-0}" = 1 ]; then  # (a CPU compile of the int8 step would take the smoke 30 s more)
    mid=tiny big=tiny iters=2 tokens=16 cap=0 dev=cpu int8compile=False
else
    mid=110M big=1.3B iters=10 tokens=512 cap=24 dev=cuda int8compile=True
fi
l2c=""
[ -f llama2.c/train.py ] && l2c="--llama2c_dir=llama2.c"

step() {  # step NAME SECONDS bench.py-arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): bench.py $*"
    local t0=$SECONDS
    timeout "$limit" "${PYTHON:-python3}" bench.py "$@" --device="$dev" --out_json="$out/$name.json" > "$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - t0)) s; $out/$name.log ends: $(tail -n 1 "$out/$name.log")"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "${PYTHON:-python3}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/machine.txt"
cat "$out/machine.txt"
# 110M: bf16 AMP, compiled, fused AdamW (train.py's CUDA default); MFU and tokens/s against llama2.c's train.py;
# batch-1 and batch-8 decoding through the compiled step (CUDA graphs)
step 110m-bf16 180 --sizes=$mid --optimizers=adamw --compile=True, --train_iters=$iters \
    --compile_decode=True --decode_tokens=$tokens $l2c
# the same training step in fp16 AMP (loss scaling); batch-1 decoding with int8 weights through the compiled step
# (beside 110m-bf16's bf16 figure: the int8 GEMV reads 1 byte a weight, fused with its dequantization)
step 110m-fp16 70 --sizes=$mid --optimizers=adamw --compile=True, --dtype=float16 --train_iters=$iters --decode=False
step 110m-int8-decode 70 --sizes=$mid --train_runs=False --decode_int8=True --compile_decode=$int8compile \
    --decode_batch=1 --decode_tokens=$tokens
# 1.3B under a 24 GiB cap, with the checkpointing the traces chose: AdamW recomputes 16 of 24 blocks, SGD 8
step 1.3b-adamw 85 --sizes=$big --optimizers=adamw --compile=True, --activation_checkpointing=True, \
    --checkpoint_blocks=16 --optimizer_in_backward=True, --memory_cap_gb=$cap --trace_memory=True \
    --train_iters=$iters --decode=False
step 1.3b-sgd 85 --sizes=$big --optimizers=sgd --compile=True, --activation_checkpointing=True, \
    --checkpoint_blocks=8 --optimizer_in_backward=True, --memory_cap_gb=$cap --trace_memory=True \
    --train_iters=$iters --decode=False
echo "== done in $SECONDS s; results in $out/"
