#!/bin/bash
# Webdataset shards from image-caption manifests (data_prep/build_shards.py) as a CPU job array: task I of N builds
# the I-th contiguous slice of the shard range with one process per core; the task that finishes the last shard
# writes OUT/index.json.
#   MANIFESTS='/datasets/raw/cc-10x/part-*.parquet' OUT=/datasets/llm2clip-10x \
#     BUILD_ARGS='--captions raw=alt_text,short=short_caption,long=long_caption --max-size 512' \
#     sbatch --array=0-99 slurm/build_shards.sh [more build_shards.py options ...]
# MANIFESTS: paths or globs, separated by spaces, or by '::' when a path holds a space; the order numbers the rows,
# so keep it (and BUILD_ARGS) the same for every task and every restart. A finished shard is kept, so a killed or
# requeued task simply redoes its unfinished shards. PY picks the interpreter (default the repo's .venv/bin/python).
# Without Slurm: SLURM_ARRAY_TASK_ID=0 SLURM_ARRAY_TASK_COUNT=1 MANIFESTS=... OUT=... bash slurm/build_shards.sh
#SBATCH --job-name=l2c-build-shards
#SBATCH --array=0-99
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
: "${MANIFESTS:?set MANIFESTS to the manifest files (space or :: separated)}" "${OUT:?set OUT to the shard directory}"
# Slurm runs a copy of this script from its spool directory: the repository is the submit directory there.
REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
PY=${PY:-$REPO/.venv/bin/python}
if [[ $MANIFESTS == *::* ]]; then
    rest=$MANIFESTS; LIST=()
    while [[ $rest == *::* ]]; do LIST+=("${rest%%::*}"); rest=${rest#*::}; done
    LIST+=("$rest")
else
    read -r -a LIST <<< "$MANIFESTS"
fi
# Task numbers count from the array's first id, so --array=1-100 works as well as 0-99.
TASK=$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))
echo "build_shards: task $TASK of ${SLURM_ARRAY_TASK_COUNT:-1} (job ${SLURM_JOB_ID:-none}," \
     "restart ${SLURM_RESTART_COUNT:-0}), ${#LIST[@]} manifest argument(s) -> $OUT"
# shellcheck disable=SC2086
exec "$PY" "$REPO/data_prep/build_shards.py" "${LIST[@]}" --out "$OUT" \
    --part "$TASK/${SLURM_ARRAY_TASK_COUNT:-1}" --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}" ${BUILD_ARGS:-} "$@"
