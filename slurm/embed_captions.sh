#!/bin/bash
# Offline caption embedding for stage 2 (data.train_embedding_shards) as a job array: task I of N embeds the I-th
# slice of the image shards with the frozen (TP-sharded) LLM, one node x 8 GPUs each.
#   SHARDS='/datasets/llm2clip-10x/train-{000000..099999}.tar' OUT=/datasets/llm2clip-10x/emb \
#     sbatch --array=0-99 slurm/embed_captions.sh [dotted.overrides ...] [--dtype float32 --batch-size 128 ...]
# SHARDS is a brace/glob pattern or a dataset index: SHARDS=/datasets/llm2clip-10x/index.json (the slices follow
# the index's shard order). Vectors are stored as bfloat16 unless --dtype says float16 or float32; captions are
# batched by token length (--sort-window). A sidecar already complete with the same model and dtype is skipped and a
# killed task leaves no partial one, so a killed or requeued task simply redoes the shards that have no sidecar.
# On the one-node CPU Slurm: CONFIG=configs/tiny_cpu.yaml SHARDS=... OUT=... sbatch --array=0-1 --nodes=1 \
#   --cpus-per-task=2 --gpus-per-node=2 slurm/embed_captions.sh
#SBATCH --job-name=l2c-embed-captions
#SBATCH --array=0-99
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
: "${SHARDS:?set SHARDS to the image shard pattern}" "${OUT:?set OUT to the sidecar directory}"
exec "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh" python data_prep/embed_captions.py \
    "${CONFIG:-configs/stage2_vit_e.yaml}" --shards "$SHARDS" --out "$OUT" \
    --part "${SLURM_ARRAY_TASK_ID:-0}/${SLURM_ARRAY_TASK_COUNT:-1}" "$@"
