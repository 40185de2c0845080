#!/usr/bin/env bash
# `make demo`: the whole pipeline on synthetic data, then a short real-data run on the shipped
# nuclei sample, on 2 CPU cores within 10 minutes.
# Everything lands in demo_out/ (git-ignored); rerunning starts from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
NCA=".venv/bin/ncatool"
OUT="demo_out"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. mock-data: 10 hard synthetic 3D volumes (three touching objects, faint labels, texture)"
# --difficulty hard: a threshold does not separate the labels and one epoch does not learn them
$NCA mock-data --out "$OUT/raw" --cases 10 --size-min 40 --size-max 48 --seed 7 --difficulty hard

echo "== 2. prepare: nnU-Net v2 raw layout, every pair validated"
$NCA prepare "$OUT/raw" --out "$OUT/nnUNet_raw" --dataset-id 1 --name MockShapes

echo "== 3. verify: nnU-Net integrity checks on the result"
$NCA verify "$OUT/nnUNet_raw/Dataset001_MockShapes"

echo "== 4. train: M3D-NCA (seg3d), two levels, a short CPU run"
# the hard volumes need more than the 15 epochs that solved the easy ones (val Dice 0.90 after one)
$NCA train --task seg3d --data "$OUT/nnUNet_raw/Dataset001_MockShapes" --out "$OUT/run_seg3d" \
  --epochs 40 --batch-size 2 --seed 0 \
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

NUC="$OUT/nnUNet_raw/Dataset002_Nuclei"
echo "== 8. real data: nuclei (stardist / Data Science Bowl 2018) cut into 16 tiles, 4 held out"
# seed 1812 holds out tiles 0, 6, 12 and 15, the test set of earlier releases (README's numbers)
$NCA prepare data/nuclei --out "$OUT/nnUNet_raw" --dataset-id 2 --name Nuclei --tile 128 \
  --test-fraction 0.25 --seed 1812 --label-names nucleus
$NCA train --task seg2d --data "$NUC" --out "$OUT/run_nuclei" --epochs 100 --seed 0 \
  --set target_size=none --set iters_per_epoch=10 --set time_limit=1.5 --json > "$OUT/nuclei_train.json"
$NCA predict --checkpoint "$OUT/run_nuclei/checkpoints/best.pt" --input "$NUC/imagesTs" \
  --output "$OUT/nuclei_predictions"
$NCA eval --pred "$OUT/nuclei_predictions" --gt "$NUC/labelsTs" --output "$OUT/nuclei_eval" \
  --json > "$OUT/nuclei_eval.json"

echo
echo "Artefacts:"
echo "  mock data          $OUT/raw/"
echo "  nnU-Net dataset    $OUT/nnUNet_raw/Dataset001_MockShapes/"
echo "  run folder         $OUT/run_seg3d/ (config.json, metrics.jsonl, checkpoints/, loss_curve.png, samples/)"
echo "  train summary      $OUT/train_summary.json"
echo "  predictions        $OUT/predictions/ (CASE.nii.gz masks, CASE_std.nii.gz uncertainty)"
echo "  evaluation         $OUT/eval/ (summary.json in nnU-Net layout, metrics.csv)"
echo "  animation          $OUT/seg3d.gif"
echo "  nuclei (real)      $NUC/ (tiles.json), $OUT/run_nuclei/, $OUT/nuclei_predictions/, $OUT/nuclei_eval/"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
keys = ("Dice", "IoU", "precision", "recall", "HD95")
print()
print(f"{'Final metrics (held-out cases)':34} {'best val Dice':>13} " + " ".join(f"{k:>9}" for k in keys))
for name, train, ev in (
    ("mock 3D shapes (seg3d)", "train_summary.json", "eval_summary.json"),
    ("nuclei, 4 test tiles (seg2d)", "nuclei_train.json", "nuclei_eval.json"),
):
    s = json.load(open(f"{out}/{train}"))
    e = json.load(open(f"{out}/{ev}"))["foreground_mean"]
    print(f"{name:34} {s['best_val_dice']:>13.4f} " + " ".join(f"{e[k]:>9.3f}" for k in keys))
print("(HD95 in mm; Dice, IoU, precision, recall: mean over cases)")
PY
