#!/usr/bin/env bash
# Train the checkpoint shipped in checkpoints/ncep_graph_2013/ (used by `weathermodel demo
# --use-checkpoint`), then score it on October-December 2013 with the demo.
#
#   bash scripts/train_demo_checkpoint.sh        # about 25 min on 2 CPU cores
#
# Recipe: configs/train_ncep.yaml (January-September 2013 of the shipped NCEP sample).
# Writes model.pt, config.yaml and skill.md into checkpoints/ncep_graph_2013/; update the
# numbers of MODEL_CARD.md from skill.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/shipped}
DEST=checkpoints/ncep_graph_2013
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

weathermodel prepare --config configs/prepare_ncep.yaml --out "$OUT/ncep_2013.zarr"
weathermodel train --config configs/train_ncep.yaml --resume \
    data.store="$OUT/ncep_2013.zarr" run_dir="$OUT/train"
mkdir -p "$DEST"
cp "$OUT/train/model.pt" "$DEST/model.pt"
cp "$OUT/train/config.yaml" "$DEST/config.yaml"
weathermodel demo --use-checkpoint "$DEST/model.pt" --out "$OUT/demo"
cp "$OUT/demo/skill.md" "$DEST/skill.md"
cp "$OUT/demo/plots/lead_time_rmse.png" docs/figures/demo_lead_time_rmse.png
cp "$OUT/demo/plots/scorecard_rmse.png" docs/figures/demo_scorecard_rmse.png
echo "checkpoint written to $DEST; skill:"
cat "$DEST/skill.md"
