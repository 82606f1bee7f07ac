#!/bin/bash
# LLM2CLIP stage 2, SigLIP SO400M/14-384 + frozen Llama-3-8B, 8 nodes x 8 GPUs.
#   sbatch slurm/stage2_so400m.sh [dotted.overrides ...]
#SBATCH --job-name=l2c-stage2-so400m
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# sbatch runs a spooled copy of this file, so find the repo through the submit directory.
exec "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh" configs/stage2_so400m.yaml "$@"
