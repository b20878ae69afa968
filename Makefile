# Everything a fresh machine needs, from nothing but Python 3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
PYTEST_ARGS ?=
# compile the optional numba kernels of the compression hook once (numba caches them on disk)
export WARM_UP := from sturdy.compression import warm_up; print('compression kernels:', 'numba' if warm_up() else 'numpy')

.PHONY: venv install install-dev demo test test-multiprocess test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: a loose requirement alone would pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[fast]'
	$(BIN)/python -c "$$WARM_UP"

install-dev: $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,fast]'
	$(BIN)/python -c "$$WARM_UP"

demo: install
	$(BIN)/sturdy demo --out runs/demo

# the fast tier; the multi-process lifecycle tests run in `test-multiprocess` (CI runs both)
test: install-dev
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

test-multiprocess: install-dev
	$(BIN)/python -m pytest -q -m "multiprocess and not slow" $(PYTEST_ARGS)

test-slow: install-dev
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# ruff (style, imports, complexity <= 12) and mypy (the core's types; pyproject.toml lists the files)
lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
