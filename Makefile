# Two entry points: `make demo` and `make test`. Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision are pinned in the same pip command as the project so pip never fetches another torch:
# these two builds lie on local disk on the dev/CI machines (see ../shared/notes/CPU_STACK.md).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DATA := data/synthetic
NPROC ?= 2

.PHONY: demo test lint env env-gpu slurm-up
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

$(DATA)/dataset.json: | $(STAMP)
	$(PY) data_prep/make_synthetic.py --out $(DATA)

demo: $(STAMP) $(DATA)/dataset.json
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m llm2clip_scale train configs/tiny_cpu.yaml train.resume=none

# The Slurm tests (tests/test_slurm.py) run against a real one-node Slurm: slurm/local/start.sh installs Debian's
# packages and starts the daemons (root only). Elsewhere those tests skip, saying so; CI sets LLM2CLIP_REQUIRE_SLURM=1.
test: $(STAMP) slurm-up
	$(PY) -m ruff check llm2clip_scale data_prep tools tests
	$(PY) -m pytest -q tests

slurm-up:
	@if [ "$$(id -u)" != 0 ]; then echo "*** not root: the local Slurm is not started; tests/test_slurm.py will skip ***"; \
	elif ! slurm/local/start.sh; then echo "*** the local Slurm did not start; tests/test_slurm.py will skip ***"; \
	  [ "$${LLM2CLIP_REQUIRE_SLURM:-0}" != 1 ]; fi

# CUDA nodes: the CUDA torch of PyPI and the GPU extras instead of the CPU pins (see README, "Installing on a GPU
# cluster"). The container recipe docker/Dockerfile.ngc is the other way (NGC ships apex, TE and flash-attn).
env-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install -e '.[gpu]' --no-build-isolation
	tools/install_apex.sh $(PY)
	$(VENV)/bin/llm2clip-scale env

lint: $(STAMP)
	$(PY) -m ruff check llm2clip_scale data_prep tools tests
