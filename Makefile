# One virtual environment, made on first use. torch is pinned to the CPU build in pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python


.PHONY: demo test test-serial lint bench-queue clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sdfleet demo

# Two pytest-xdist processes, each test file whole on one: about 9 minutes on two cores instead of 15 serial
# (`make test-serial`). Each process takes Redis databases of its own (tests/conftest.py).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

test-serial: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sdfleet producer worker scheduler bench tests

bench-queue: $(VENV)/.installed
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
