#!/usr/bin/env bash
# Training throughput on one machine: 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2 threads,
# same global batch, seg2d and seg3d at the bench sizes (2D 64x64 batch 8, 3D 32^3 batch 2). Seconds per
# epoch of 6 iterations from metrics.jsonl (process start excluded), median over epochs 2-4 (only the
# last one validates: the median leaves it out); the two configurations alternate.
# Usage: bash benchmarks/ddp_throughput.sh [REPEATS]   (run alone on the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
NCA=.venv/bin/ncatool
PY=.venv/bin/python
REPEATS=${1:-2}
export NCATOOL_NO_PROGRESS=1
tmp=$(mktemp -d /tmp/ddp_tp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
$NCA -q mock-data --out "$tmp/raw2" --dim 2 --cases 8 --size-min 64 --size-max 64 --seed 1 >/dev/null
$NCA -q mock-data --out "$tmp/raw3" --cases 4 --size-min 32 --size-max 32 --seed 1 >/dev/null
$NCA -q prepare "$tmp/raw2" --out "$tmp/nn" --dataset-id 21 --name Two >/dev/null
$NCA -q prepare "$tmp/raw3" --out "$tmp/nn" --dataset-id 22 --name Three >/dev/null
common=(--epochs 4 --seed 0 --set samples=0 --set val_every=100 --set val_fraction=0 --set iters_per_epoch=6)
seg2d=(--task seg2d --data "$tmp"/nn/Dataset021_Two --batch-size 8 --set target_size=64,64 "${common[@]}")
seg3d=(--task seg3d --data "$tmp"/nn/Dataset022_Three --batch-size 2 --set target_size=32,32,32 --set patch=0,0 "${common[@]}")
epoch_seconds() { $PY -c "import json,sys,statistics as s; v=[json.loads(l)['seconds'] for l in open(sys.argv[1])][1:]; print(s.median(v))" "$1"; }
echo "task,config,repeat,seconds_per_epoch"
for task in seg2d seg3d; do
  if [[ $task == seg2d ]]; then args=("${seg2d[@]}"); else args=("${seg3d[@]}"); fi
  for r in $(seq "$REPEATS"); do
    rm -rf "$tmp/one" "$tmp/two"
    OMP_NUM_THREADS=2 $NCA -q train "${args[@]}" --out "$tmp/one" >/dev/null
    echo "$task,1x2threads,$r,$(epoch_seconds "$tmp/one/metrics.jsonl")"
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 -m ncatool -q train "${args[@]}" \
      --out "$tmp/two" >/dev/null 2>"$tmp/err" || { tail -n 3 "$tmp/err"; exit 1; }
    echo "$task,2ranksx1thread,$r,$(epoch_seconds "$tmp/two/metrics.jsonl")"
  done
done
