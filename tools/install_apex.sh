#!/bin/bash
# NVIDIA apex (fused LayerNorm/RMSNorm/Adam) built from NVIDIA's source for the CUDA torch of PYTHON; a no-op when
# apex is already importable (NGC images ship it). PyPI's package named "apex" is something else: never pip install it.
#   tools/install_apex.sh [PYTHON]     (about 10-20 minutes of compilation; needs nvcc matching torch's CUDA)
set -euo pipefail
PY=${1:-python}
if "$PY" -c "import apex, apex.normalization" 2>/dev/null; then echo "apex already installed"; exit 0; fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'apex needs a CUDA build of torch')"
MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install -v --no-build-isolation \
    --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" \
    "git+https://github.com/NVIDIA/apex.git"
