#!/usr/bin/env bash
# Segmentation quality on synthetic shapes (issue: NCA core): seg3d and seg2d must reach
# validation Dice >= 0.95 within 10 minutes on 2 CPU cores. Prints the best validation Dice,
# the epoch it was reached and the wall time. Usage: bash benchmarks/seg_quality.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
NCA=".venv/bin/ncatool"
OUT="${1:-benchmarks/results/seg_quality}"
rm -rf "$OUT"; mkdir -p "$OUT"

report() {  # $1 = run folder
  .venv/bin/python - "$1" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
elapsed, first = 0.0, None
for r in rows:
    elapsed += r["seconds"]
    if first is None and r.get("val_dice_train_res", 0) >= 0.95:
        first = (r["epoch"], elapsed)
best = max(rows, key=lambda r: r.get("val_dice_train_res", -1))
hit = f"epoch {first[0]} after {first[1]:.0f} s" if first else "never"
print(f"{sys.argv[1]}: best val Dice {best['val_dice_train_res']:.4f} (epoch {best['epoch']}), "
      f">= 0.95 first at {hit}; {len(rows)} epochs in {elapsed:.0f} s")
PY
}

$NCA -q mock-data --out "$OUT/raw3d" --cases 12 --seed 11
$NCA -q prepare "$OUT/raw3d" --out "$OUT/nn" --dataset-id 1 --name Shapes3D
$NCA -q train --task seg3d --data "$OUT/nn/Dataset001_Shapes3D" --out "$OUT/seg3d" --epochs 200 \
  --batch-size 2 --seed 0 --set target_size=48,48,48 --set patch=0,24 --set iters_per_epoch=8 \
  --set time_limit=9.5 --set samples=1
report "$OUT/seg3d"

$NCA -q mock-data --out "$OUT/raw2d" --dim 2 --cases 40 --size-min 64 --size-max 64 --seed 5
$NCA -q prepare "$OUT/raw2d" --out "$OUT/nn" --dataset-id 2 --name Shapes2D
$NCA -q train --task seg2d --data "$OUT/nn/Dataset002_Shapes2D" --out "$OUT/seg2d" --epochs 30 \
  --seed 0 --set target_size=64,64 --set iters_per_epoch=5 --set time_limit=9.5 --set samples=1
report "$OUT/seg2d"
