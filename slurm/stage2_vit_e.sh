#!/bin/bash
# LLM2CLIP stage 2, EVA02 ViT-E/14 + frozen Llama-3-8B (TP=2), 16 nodes x 8 GPUs.
#   sbatch slurm/stage2_vit_e.sh [dotted.overrides ...]
#SBATCH --job-name=l2c-stage2-vit-e
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# sbatch runs a spooled copy of this file, so find the repo through the submit directory.
exec "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh" configs/stage2_vit_e.yaml "$@"
