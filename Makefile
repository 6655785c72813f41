# The two commands of the README:
#   make demo   -- the main job on MNIST (train or reuse, convert, export, certify)
#   make test   -- the test suite
# Both create .venv and install everything they need on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The CPU build of torch: 2.13.0 is on the package mirror as a CPU wheel (~200 MB, not 5 GB of CUDA).
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	# auto-LiRPA 0.3 pins torch<1.13: install it without its stale pins; certify/compat.py fixes it up.
	$(PIP) install -q --no-deps "auto-LiRPA==0.3"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/mnist_end_to_end.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) runs
