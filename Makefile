# Two commands do all the set-up on a fresh machine with Python 3.11: `make demo`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench notebooks clean lab

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would resolve to a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distzo2 demo

test: $(STAMP)
	$(VENV)/bin/ruff check distzo2_lab tests benchmarks
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/distzo2 bench efficiency --model opt-125m --batch 8 --seq 128

# JupyterLab over tutorials/ and notebooks/, on the loopback interface only (open the printed URL).
LAB_PORT ?= 8888
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser --ServerApp.root_dir=$(CURDIR) \
		--LabApp.default_url=/lab/tree/tutorials $(if $(filter 0,$(shell id -u)),--allow-root)

notebooks: $(STAMP)
	$(PY) -m jupytext --sync tutorials/*.ipynb notebooks/*.ipynb

clean:
	rm -rf runs .pytest_cache
