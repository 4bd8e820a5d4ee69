# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make demo   - creates .venv, installs dpjax, runs the demo (./dpjax_out/demo/)
#   make test   - creates .venv, installs dpjax with test extras, runs the test suite
#                 (pytest-xdist: one worker per core, at most 4; whole files per worker
#                 so module fixtures are built once)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'

demo: install
	$(BIN)/python run_solver.py

test: install-test
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile tests

clean:
	rm -rf $(VENV) dpjax_out .pytest_cache *.egg-info
