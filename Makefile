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

.PHONY: install demo test wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# auto-LiRPA 0.3 pins torch<1.13, so it cannot be a dependency: `harden setup` installs it without
	# its pins and checks its bounds, the route the README gives to `pip install .` users.
	$(VENV)/bin/harden setup
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/mnist_end_to_end.py $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

# What benchmarks/gpu_check.sh installs on a CUDA machine without the registry: this package, auto-LiRPA
# and the pure-Python dependencies as wheels, and a small MNIST file, in .whl/ (git ignores it).
wheels: $(STAMP)
	rm -rf .whl
	PYTHON=$(PY) bash benchmarks/gpu_check.sh --download-wheels .whl

clean:
	rm -rf $(VENV) runs
