# One virtual environment, made on first use. torch is pinned to the CPU build in pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python


.PHONY: demo test lint bench-queue clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sdfleet demo

# Two test processes (pytest-xdist), each test file whole on one of them (its module fixtures built once):
# most tests wait on worker subprocesses, so two cores run about twice the tests. Plain pytest runs serially.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sdfleet producer worker scheduler bench tests

bench-queue: $(VENV)/.installed
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
