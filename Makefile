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

.PHONY: demo test lint env
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

test: $(STAMP)
	$(PY) -m ruff check llm2clip_scale data_prep tools tests
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check llm2clip_scale data_prep tools tests
