# One virtual environment, made on first use. torch is pinned to the CPU build in pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python


.PHONY: demo test test-parallel lint bench-queue clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sdfleet demo

# Serial. `make test-parallel` runs two pytest-xdist processes, each test file whole on one (about 8 minutes
# instead of 15 on two cores), but under that load a kombu race (a worker that dies instead of reconnecting
# when Redis restarts, tests/test_worker_holes.py) fails tests/test_crash.py's Redis restart now and then.
test: $(VENV)/.installed
	$(PY) -m pytest -q

test-parallel: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sdfleet producer worker scheduler bench tests

bench-queue: $(VENV)/.installed
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
