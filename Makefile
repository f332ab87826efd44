# `make test` sets up everything on a fresh machine (a venv with the CPU build of torch) and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test install train docs clean

test: install
	$(PY) -m pytest -q

# the README's main job: train the tiny hybrid on the embedded corpus (about 3 minutes on 2 CPU cores)
train: install
	$(VENV)/bin/hyloom train builtin:tiny

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build (a plain `torch` requirement would pull several GB of CUDA wheels): a local +cpu wheel where the
	# machine has one (PyPI never serves +cpu builds, so this fails fast elsewhere), else PyTorch's CPU index
	$(PY) -m pip install -q "torch==2.13.0+cpu" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

docs: install
	$(VENV)/bin/hyloom --no-plugins schema --markdown > docs/blueprint-reference.md

clean:
	rm -rf $(VENV) build dist *.egg-info
