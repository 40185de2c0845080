#!/usr/bin/env bash
# `make demo`: the whole pipeline on embedded/synthetic data, on 2 CPU cores, in a few minutes.
# Everything lands in demo_out/ (git-ignored); rerunning starts from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
NCA=".venv/bin/ncatool"
OUT="demo_out"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. mock-data: 10 synthetic 3D volumes (spheres, cubes, cylinders, ellipsoids, tori)"
$NCA mock-data --out "$OUT/raw" --cases 10 --size-min 40 --size-max 48 --seed 7 --noise 0.1

echo "== 2. prepare: nnU-Net v2 raw layout, every pair validated"
$NCA prepare "$OUT/raw" --out "$OUT/nnUNet_raw" --dataset-id 1 --name MockShapes

echo "== 3. verify: nnU-Net integrity checks on the result"
$NCA verify "$OUT/nnUNet_raw/Dataset001_MockShapes"

echo "== 4. train: M3D-NCA (seg3d), two levels, a short CPU run"
$NCA train --task seg3d --data "$OUT/nnUNet_raw/Dataset001_MockShapes" --out "$OUT/run_seg3d" \
  --epochs 15 --batch-size 2 --seed 0 \
  --set target_size=48,48,48 --set patch=0,24 --set iters_per_epoch=8 --set val_fraction=0.2 \
  --json > "$OUT/train_summary.json"

DS="$OUT/nnUNet_raw/Dataset001_MockShapes"
echo "== 5. predict: masks with the input geometry, 4-run pseudo-ensemble with uncertainty"
$NCA predict --checkpoint "$OUT/run_seg3d/checkpoints/best.pt" --input "$DS/imagesTr" \
  --output "$OUT/predictions" --ensemble 4 --seed 0

echo "== 6. eval: Dice, IoU, HD95... on the held-out validation cases"
$NCA eval --checkpoint "$OUT/run_seg3d/checkpoints/best.pt" --data "$DS" --split val \
  --output "$OUT/eval" --json > "$OUT/eval_summary.json"

echo "== 7. animate: the segmentation evolving step by step (orthogonal slices)"
first=$(ls "$DS/imagesTr" | head -n 1)
$NCA animate --checkpoint "$OUT/run_seg3d/checkpoints/best.pt" --input "$DS/imagesTr/$first" \
  --output "$OUT/seg3d.gif" --every 1 --fps 6

echo
echo "Artefacts:"
echo "  mock data          $OUT/raw/"
echo "  nnU-Net dataset    $OUT/nnUNet_raw/Dataset001_MockShapes/"
echo "  run folder         $OUT/run_seg3d/ (config.json, metrics.jsonl, checkpoints/, loss_curve.png, samples/)"
echo "  train summary      $OUT/train_summary.json"
echo "  predictions        $OUT/predictions/ (CASE.nii.gz masks, CASE_std.nii.gz uncertainty)"
echo "  evaluation         $OUT/eval/ (summary.json in nnU-Net layout, metrics.csv)"
echo "  animation          $OUT/seg3d.gif"
.venv/bin/python - "$OUT/train_summary.json" "$OUT/eval_summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
e = json.load(open(sys.argv[2]))["foreground_mean"]
print(f"Final: best validation Dice {s['best_dice']:.4f} at epoch {s['best_epoch']} of {s['epochs']}")
keys = ("Dice", "IoU", "precision", "recall", "HD95")
print("Held-out cases (eval, foreground mean): " + ", ".join(f"{k} {e[k]:.3f}" for k in keys if k in e))
PY
