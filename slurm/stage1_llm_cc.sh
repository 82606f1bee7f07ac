#!/bin/bash
# LLM2CLIP stage 1, caption-contrastive LoRA fine-tuning of Llama-3-8B-Instruct (TP=2, DP=4), 1 node x 8 GPUs.
#   sbatch slurm/stage1_llm_cc.sh [dotted.overrides ...]
# Afterwards: torchrun --nproc_per_node=8 -m llm2clip_scale cra configs/llm2clip_cc_llama3_8b.yaml \
#   --lora checkpoints/llm2clip_cc_llama3_8b
#SBATCH --job-name=l2c-stage1-cc
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# sbatch runs a spooled copy of this file, so find the repo through the submit directory.
exec "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh" configs/llm2clip_cc_llama3_8b.yaml "$@"
