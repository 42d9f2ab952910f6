#!/usr/bin/env bash
# Data-parallel training with torchrun, on one node or many.
#   one node, 4 GPUs:   scripts/train_torchrun.sh configs/train_ncep.yaml
#   node i of N:        NNODES=N NODE_RANK=i MASTER_ADDR=host0 scripts/train_torchrun.sh CONFIG
# Extra arguments are passed on as key=value overrides (e.g. optim.max_steps=1000) or --resume.
set -euo pipefail
CONFIG=${1:?usage: train_torchrun.sh CONFIG [key=value ...] [--resume]}
shift
NPROC=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m weathermodel train --config "$CONFIG" "$@"
