#!/bin/bash
# Shared body of the sbatch scripts: srun starts one rank per GPU on every node of the allocation.
#   slurm/launch.sh train CONFIG [dotted.overrides ...]     validate, then train (every rank: llm2clip-scale train)
#   slurm/launch.sh python SCRIPT [args ...]                any rank-parallel script (data_prep/embed_captions.py)
# Environment: PY (default .venv/bin/python of the repo), SRUN_ARGS (extra srun options, e.g. a pyxis container:
# SRUN_ARGS="--container-image=/images/llm2clip.sqsh --container-mounts=/datasets,/checkpoints" PY=python),
# RANKS_PER_NODE (CPU partitions), CPU_BIND, MASTER_PORT, and slurm/env.sh's NCCL/threading variables.
# Ranks come from srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), the rendezvous from MASTER_ADDR/MASTER_PORT below;
# no torchrun in between, so Slurm's signals reach the ranks themselves (llm2clip_scale/launch/preemption.py).
set -euo pipefail
REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$REPO"
source slurm/env.sh
PY=${PY:-$REPO/.venv/bin/python}
NODES=${SLURM_JOB_NUM_NODES:?"slurm/launch.sh runs inside a Slurm allocation (sbatch or salloc)"}
# One rank per GPU asked for (--gpus-per-node, "type:N" allowed; --exclusive may hand the job more); a CPU
# partition sets RANKS_PER_NODE instead.
GPUS_ASKED=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RANKS_PER_NODE=${RANKS_PER_NODE:-${GPUS_ASKED##*:}}
RANKS=$((NODES * RANKS_PER_NODE))
# srun no longer inherits --cpus-per-task from sbatch (Slurm >= 22.05): without this every rank and its loader
# workers would share about one core. Each rank gets its node's cores divided by the ranks on it.
CPUS_PER_RANK=$(( ${SLURM_CPUS_ON_NODE:-$RANKS_PER_NODE} / RANKS_PER_NODE ))
export SRUN_CPUS_PER_TASK=$(( CPUS_PER_RANK > 0 ? CPUS_PER_RANK : 1 ))
# The whole list, then its first line: `scontrol ... | head -n 1` under pipefail ends the job with SIGPIPE (141,
# silently) whenever scontrol is still writing when head exits, as with the list of a large allocation.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
# A port from the job id: two jobs sharing a first node must not meet at a fixed 29500.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
MODE=$1; shift
if [ "$MODE" = train ]; then
    CONFIG=$1; shift
    # Fail fast on a config error before any node is tied up in a rendezvous (one task, in the ranks' environment).
    # shellcheck disable=SC2086
    srun --nodes 1 --ntasks 1 ${SRUN_ARGS:-} "$PY" -m llm2clip_scale validate "$CONFIG" --world-size "$RANKS" "$@"
    set -- -m llm2clip_scale train "$CONFIG" "$@"
elif [ "$MODE" != python ]; then
    echo "slurm/launch.sh: first argument is 'train' or 'python', not '$MODE'" >&2; exit 2
fi
echo "launch: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): $NODES node(s) x $RANKS_PER_NODE ranks," \
     "$SRUN_CPUS_PER_TASK cores each, rendezvous $MASTER_ADDR:$MASTER_PORT"
# --kill-on-bad-exit: one rank's error (the watchdog's included) ends the job instead of leaving the others in a
# collective; --cpu-bind=cores keeps each rank's threads on its own cores (CPU_BIND=none to turn off).
# shellcheck disable=SC2086
exec srun --kill-on-bad-exit=1 --nodes "$NODES" --ntasks "$RANKS" --ntasks-per-node "$RANKS_PER_NODE" \
    --cpus-per-task "$SRUN_CPUS_PER_TASK" --cpu-bind="${CPU_BIND:-cores}" ${SRUN_ARGS:-} "$PY" "$@"
