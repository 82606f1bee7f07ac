#!/usr/bin/env bash
# Stage-2 training steps of ViT-E (eva02_enormous_patch14_clip_224) and SO400M (vit_so400m_patch14_siglip_384/224)
# at real width on one GPU: step time, samples/s, model and hardware TFLOP/s, MFU and peak memory, printed as a
# markdown table with the machine, the command and the date.
#
#   tools/bench_gpu.sh                                   # all three models on GPU 0, bf16, ZeRO-0 (ViT-E: 32 blocks)
#   tools/bench_gpu.sh --models vit_e --depth full       # the whole 64-block ViT-E (~100 GB: H200 / B200)
#   tools/bench_gpu.sh --gpu 3 --micro-batch 32 --json bench.json
#   tools/bench_gpu.sh --device cpu                      # smoke run without a GPU: tiny towers, fp32, no MFU
#   tools/bench_gpu.sh --help                            # every option
#
# Needs nothing but the environment (no data, no weights: random images and random LLM embeddings through the
# adapter, offline mode). Each model runs in its own process on the GPU; a model that does not fit prints an
# out-of-memory row and the others still run. Exit status 1 if any row failed.
#
# PY selects the interpreter (default: the repository's .venv, else python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
# As slurm/env.sh sets for training: fewer fragmentation failures near the memory limit.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export BENCH_GPU_LAUNCHER="tools/bench_gpu.sh"
exec "$PY" tools/bench_gpu.py "$@"
