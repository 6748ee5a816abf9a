#!/usr/bin/env bash
# The GPU checks, in one run on a machine with one CUDA GPU (the `device` tool's machine):
# attention exactness and TFLOP/s (bench_gpu.py), then a real train.py run of a random
# Llama-3.2-1B-shaped model at 64K tokens (MFU, peak memory) against train.py --plan.
# Results go to $OUT (or ./gpu_out).
#   bash bench/gpu_check.sh [all|attention|train] [bench_gpu.py options]
#   e.g. bash bench/gpu_check.sh attention --blocks 4096,16384 --ablations --profile
set -u
MODE=${1:-all}; shift $(( $# > 0 ? 1 : 0 ))
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ "$MODE" = train ] || timeout 240 python3 bench/bench_gpu.py "$@" 2>&1 | tee "$OUT/attention.txt"
[ "$MODE" = attention ] && exit 0
timeout 90 python3 - <<'PY' 2>&1 | tee "$OUT/make_model.txt"
import torch, model as M, data
args = M.preset("llama3.2-1b")
with torch.device("meta"):
    m = M.Llama(args)
m.to_empty(device="cuda")
with torch.no_grad():
    for name, p in m.named_parameters():
        p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.02)
m.to(torch.bfloat16).save_pretrained("/tmp/m1b", tokenizer=data.load_tokenizer(None))
print("saved a random", M.count_params(args) / 1e9, "B-parameter model")
PY
# the steps' metrics are written as they finish; the final checkpoint and export are cut off
# (SIGINT at the limit: the traceback says where it was)
timeout -s INT 300 python3 train.py --model /tmp/m1b --ctx 64K --batch 1 --steps 4 --lr 1e-5 \
    --original-window 8192 --dtype bf16 --out /tmp/run --cache /tmp/cache > "$OUT/train.txt" 2>&1
tail -c 3000 "$OUT/train.txt"
cp /tmp/run/metrics.jsonl "$OUT/metrics.jsonl"
python3 train.py --plan --model /tmp/m1b --ctx 64K --world 1 --cp 1 --batch 1 --dtype bf16 \
    --steps 4 2>&1 | tee "$OUT/plan.txt"
