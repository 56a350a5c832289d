# `make demo` and `make test` create/refresh the virtual environment, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch (a local file on the project's machines; from PyPI's CPU index elsewhere).
# Bring your own CUDA build with e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
TORCH_SPEC ?= torch==2.13.0
export ATLAS_SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: env test demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required (found %s); set PYTHON=python3.11" % sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@# The project's distribution was called "atlas" (taken on PyPI by another project): drop it from an older .venv.
	$(PY) -m pip uninstall -q -y atlas 2>/dev/null || true
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,eval]"
	touch $@

env: $(VENV)/.installed

test: env
	$(VENV)/bin/ruff check atlas tests benchmarks jobs serve
	$(VENV)/bin/mypy
	$(PY) -m pytest tests

demo: env
	$(VENV)/bin/atlas demo

bench: env
	$(PY) benchmarks/loader.py

clean:
	rm -rf $(VENV) demo_out benchmarks/out
