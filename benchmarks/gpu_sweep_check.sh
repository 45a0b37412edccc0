#!/usr/bin/env bash
# On the lent GPU machine: a sweep of several trials that each need the machine's one GPU, so
# they can only run one after another. Every trial must run; a Train placement group that Ray
# leaves behind after a trial (it would hold the GPU) is reported by the sweep and removed.
#   source .gpu/activate.sh && bash benchmarks/gpu_sweep_check.sh     (writes under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export DETR_RAY_DEMO_DIR=/tmp/detr_ray_demo
{
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
  start=$(date +%s)
  python3 scripts/tune.py --name gpu-sweep --storage /tmp/gpu_sweeps --num-samples 4 --gpus-per-trial 1 \
    --cpus-per-worker 2 --grace-period 1 --set train.epochs=3 --set train.max_steps_per_epoch=20 \
    --set data.decode_num_cpus=1 --set data.ray_data_cpus=4
  echo "tune.py exit $? after $(( $(date +%s) - start )) s"
  python3 - <<'PY'
import json
t = json.load(open("/tmp/gpu_sweeps/gpu-sweep/trials.json"))
print("leaked placement groups (removed by the sweep):", t["leaked_placement_groups"])
for r in t["trials"]:
    print(r["trial"], r["status"], "epochs", r["epochs"], "best", r["best"], "checkpoint", bool(r["checkpoint"]))
PY
  cp /tmp/gpu_sweeps/gpu-sweep/trials.json "$OUT/" 2>/dev/null
  for f in /tmp/ray/session_latest/logs/debug_state*.txt; do cp "$f" "$OUT/" 2>/dev/null; done
  grep -h "placement" /tmp/ray/session_latest/logs/debug_state.txt 2>/dev/null | head -20
} 2>&1 | grep -v "Reporting training result" | tee "$OUT/log.txt"
