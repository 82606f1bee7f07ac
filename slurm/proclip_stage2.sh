#!/bin/bash
# ProCLIP stage 2: contrastive tuning with EMA self-distillation, ViT-L/14 + frozen Llama-3-8B.
#   sbatch slurm/proclip_stage2.sh [dotted.overrides ...]          (CONFIG=... picks another config)
# The same script on a one-node CPU Slurm (slurm/local/start.sh), the allocation shrunk by sbatch's own options:
#   CONFIG=configs/tiny_cpu.yaml sbatch --nodes=1 --cpus-per-task=2 --gpus-per-node=2 slurm/proclip_stage2.sh
# Five minutes before the time limit Slurm sends USR1: every rank saves at the next step boundary, rank 0 requeues
# the job, and the requeued job resumes from that checkpoint (train.resume=auto). Preemption (SIGTERM) saves too.
#SBATCH --job-name=l2c-proclip-stage2
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# sbatch runs a spooled copy of this file, so find the repo through the submit directory. The batch step itself is
# one task; slurm/launch.sh starts one rank per GPU with srun.
exec "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/launch.sh" train "${CONFIG:-configs/proclip_stage2_l14.yaml}" "$@"
