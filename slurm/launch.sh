#!/bin/bash
# Shared body of the sbatch scripts: one torchrun per node (srun), one process per GPU, c10d rendezvous on the
# first node. Usage inside an allocation: slurm/launch.sh CONFIG [dotted.overrides ...]
set -euo pipefail
CONFIG=$1; shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p logs
PY=${PY:-.venv/bin/python}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
# Fail fast on a config error before any node is tied up in a rendezvous.
"$PY" -m llm2clip_scale validate "$CONFIG" --world-size $((SLURM_JOB_NUM_NODES * GPUS_PER_NODE)) "$@"
srun --kill-on-bad-exit=1 "$PY" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m llm2clip_scale train "$CONFIG" "$@"
