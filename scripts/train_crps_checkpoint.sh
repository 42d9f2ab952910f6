#!/usr/bin/env bash
# Train the CRPS-trained ensemble checkpoint shipped in checkpoints/speedy_crps_2000/ and score
# it as issue 15 asks: 8-member ensembles from 6 start dates of 2001-01..03 to 120 h, against
# the calibrated perturbed-initial-condition ensemble of the deterministic model and that
# model's MAE (fair CRPS, spread-skill ratio with the (M+1)/M correction, rank histograms).
#
#   bash scripts/train_crps_checkpoint.sh     # about 2.5 h on 2 CPU cores, after
#                                             # scripts/train_global_checkpoint.sh
#
# Recipe (AIFS-ENS style: a CRPS-trained model started from calibrated initial perturbations):
# 1. configs/finetune_speedy_crps.yaml: from the deterministic checkpoint, 8 noise input
#    channels, almost-fair CRPS of 4 members per sample, 300 steps of rollouts to 24 h;
# 2. configs/finetune_speedy_crps_stage2.yaml: 150 more steps on rollouts of 4, then 8 steps;
# 3. `weathermodel calibrate` of each model's initial perturbations over 72-120 h on 11 start
#    dates of 2001-01..03 that the scored forecasts do not overlap;
# 4. forecasts of 2001 and `weathermodel evaluate`; the table goes to skill.md.
# Writes model.pt, perturbation.yaml, the configs and skill.md into the checkpoint folder, and
# perturbation.yaml into the deterministic checkpoint's folder.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/global}
ENS=${ENS:-outputs/ens}
DEST=${DEST:-checkpoints/speedy_crps_2000}
DETERMINISTIC=${DETERMINISTIC:-checkpoints/speedy_transformer_2000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
STORE="$OUT/speedy_t21.zarr"
INIT=2001-01-05/2001-03-21/15d
# calibration starts: 11 dates of 2001-01..03 whose 5-day forecasts overlap none of the scored
# ones (the training year would be in-sample: the models' errors there are smaller, and
# perturbations calibrated on it come out too small for unseen weather)
CALIBRATION_INIT=2001-01-10T12/2001-03-26T12/15d,2001-01-14T12/2001-03-15T12/15d
COMMON=(--data "$STORE" --init "$INIT" --lead 120h --no-progress)

weathermodel train --config configs/finetune_speedy_crps.yaml --resume --no-progress \
    data.store="$STORE" run_dir="$OUT/crps" init_from="$DETERMINISTIC/model.pt"
weathermodel train --config configs/finetune_speedy_crps_stage2.yaml --resume --no-progress \
    data.store="$STORE" run_dir="$OUT/crps2" init_from="$OUT/crps/model.pt"
weathermodel calibrate --checkpoint "$DETERMINISTIC/model.pt" --data "$STORE" \
    --init "$CALIBRATION_INIT" --lead 72h/120h --members 8 --amplitude 2.0 --tolerance 0.03 \
    --perturbation-length-scale 1231.4128286454145 --out "$ENS/perturbation_deterministic.yaml" \
    --no-progress
weathermodel calibrate --checkpoint "$OUT/crps2/model.pt" --data "$STORE" \
    --init "$CALIBRATION_INIT" --lead 72h/120h --members 8 --amplitude 1.4 --tolerance 0.03 \
    --perturbation-length-scale 1231.4128286454145 --out "$ENS/perturbation_crps.yaml" \
    --no-progress
weathermodel forecast --checkpoint "$DETERMINISTIC/model.pt" "${COMMON[@]}" \
    --out "$ENS/deterministic_2001.zarr"
weathermodel forecast --checkpoint "$DETERMINISTIC/model.pt" "${COMMON[@]}" --members 8 \
    --perturbation-file "$ENS/perturbation_deterministic.yaml" --out "$ENS/perturbed_2001.zarr"
weathermodel forecast --checkpoint "$OUT/crps2/model.pt" "${COMMON[@]}" --members 8 \
    --perturbation 0 --out "$ENS/crps_model_noise_only_2001.zarr"
weathermodel forecast --checkpoint "$OUT/crps2/model.pt" "${COMMON[@]}" --members 8 \
    --perturbation-file "$ENS/perturbation_crps.yaml" --out "$ENS/crps_2001.zarr"
weathermodel evaluate crps="$ENS/crps_2001.zarr" perturbed="$ENS/perturbed_2001.zarr" \
    crps_noise_only="$ENS/crps_model_noise_only_2001.zarr" \
    deterministic="$ENS/deterministic_2001.zarr" --truth "$STORE" --baselines none \
    --variables geopotential,temperature --out "$ENS/scores.nc"
mkdir -p "$DEST"
cp "$OUT/crps2/model.pt" "$DEST/model.pt"
cp "$ENS/perturbation_crps.yaml" "$DEST/perturbation.yaml"
cp "$ENS/perturbation_deterministic.yaml" "$DETERMINISTIC/perturbation.yaml"
cp "$OUT/crps/config.yaml" "$DEST/config_stage1.yaml"
cp "$OUT/crps2/config.yaml" "$DEST/config.yaml"
python scripts/ensemble_skill_table.py "$ENS/scores.nc" --ensembles crps,perturbed,crps_noise_only \
    --perturbed perturbed --deterministic deterministic --figures docs/figures/ensemble \
    > "$DEST/skill.md"
echo "checkpoint written to $DEST; skill:"
cat "$DEST/skill.md"
