# Environment of every rank of every job, sourced by slurm/launch.sh and by `llm2clip-scale submit`. Each variable
# keeps a value already set, so `export NCCL_DEBUG=INFO` (or any other) before sbatch overrides it.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA are cluster-specific: unset, NCCL autodetects; set them here or before sbatch
# (e.g. NCCL_SOCKET_IFNAME=^docker,lo NCCL_IB_HCA=mlx5) when autodetection picks the wrong interface.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective ends the rank
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation at ViT-E
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}  # loader workers fork; Rust threads would deadlock
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as torchrun sets it: ranks x threads must not oversubscribe cores
export PYTHONUNBUFFERED=1  # log lines reach the job log as they happen, not at exit
