#!/usr/bin/env bash
# GPU check of the trainer on the lent machine: the demo experiment on one GPU (bf16 autocast,
# CUDA device placement, asynchronous non-finite checks), then a resume with more epochs.
#   source .gpu/activate.sh && bash benchmarks/gpu_trainer_check.sh     (writes under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export DETR_RAY_DEMO_DIR=/tmp/detr_ray_demo
{
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
  python3 scripts/train.py --name gpu-demo --storage /tmp/gpu_runs --gpus-per-worker 1 --epochs 4 \
    --set train.cpus_per_worker=2
  python3 scripts/train.py --name gpu-demo --storage /tmp/gpu_runs --gpus-per-worker 1 --epochs 6 \
    --set train.cpus_per_worker=2
  ls /tmp/gpu_runs/gpu-demo
} 2>&1 | grep -v "Reporting training result" | tee "$OUT/log.txt"
