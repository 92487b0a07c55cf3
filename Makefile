# Two commands: `make run` (install and start the daemon on ./var/import -> ./var/output) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests run on the CPU: pin torch's CPU build first (on the CI machines pip takes it from local disk), so
# torch>=2.2 from pyproject.toml is already met. `make run` leaves torch to pip (a CUDA build where it can).
TORCH_CPU ?= torch==2.13.0

.PHONY: install install-test run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[onnx]"

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e ".[test]"

run: install
	mkdir -p var/import var/output var/state
	$(BIN)/dashcamd run --config config.example.toml

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) var .pytest_cache
