#!/usr/bin/env bash
# Train the global checkpoint shipped in checkpoints/speedy_transformer_2000/ on the simulated
# ERA5-layout corpus (../shared/data/speedy-t21), then score it as a user would:
# `weathermodel forecast` from every 00/12 UTC start of 2001-01..03 to 120 h, against the
# reanalysis, persistence and a day-of-year climatology of 2000 (61-day window).
#
#   bash scripts/train_global_checkpoint.sh     # about 1 h 15 min on 2 CPU cores
#
# Recipe: configs/prepare_speedy.yaml (statistics from 2000 only), then two stages on 2000
# (validation 2001-01..03): configs/train_speedy_transformer.yaml (rollouts of 1, 2, 4 steps),
# then configs/finetune_speedy_transformer.yaml (init_from stage 1; rollouts of 4, 8 steps).
# Writes model.pt, config.yaml and skill.md into the checkpoint folder; update the numbers of
# its MODEL_CARD.md and of the README from skill.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/global}
DEST=${DEST:-checkpoints/speedy_transformer_2000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

weathermodel prepare --config configs/prepare_speedy.yaml --out "$OUT/speedy_t21.zarr" \
    --no-progress
weathermodel train --config configs/train_speedy_transformer.yaml --resume --no-progress \
    data.store="$OUT/speedy_t21.zarr" run_dir="$OUT/train"
weathermodel train --config configs/finetune_speedy_transformer.yaml --resume --no-progress \
    data.store="$OUT/speedy_t21.zarr" run_dir="$OUT/finetune" init_from="$OUT/train/model.pt"
weathermodel forecast --checkpoint "$OUT/finetune/model.pt" --data "$OUT/speedy_t21.zarr" \
    --init 2001-01-01T00/2001-03-26T12/12h --lead 120h --out "$OUT/forecast.zarr" --no-progress
weathermodel climatology "$OUT/speedy_t21.zarr" --out "$OUT/climatology_2000.nc" \
    --window-days 61 --start 2000-01-01 --end 2000-12-31T18
weathermodel evaluate model="$OUT/forecast.zarr" --truth "$OUT/speedy_t21.zarr" \
    --climatology "$OUT/climatology_2000.nc" --baselines persistence,climatology \
    --variables geopotential,temperature,2m_temperature,u_component_of_wind,specific_humidity \
    --out "$OUT/scores.nc"
mkdir -p "$DEST"
cp "$OUT/finetune/model.pt" "$DEST/model.pt"
cp "$OUT/train/config.yaml" "$DEST/config_stage1.yaml"
cp "$OUT/finetune/config.yaml" "$DEST/config.yaml"
python scripts/global_skill_table.py "$OUT/scores.nc" > "$DEST/skill.md"
echo "checkpoint written to $DEST; skill:"
cat "$DEST/skill.md"
