# All set-up happens here: a fresh clone needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all test demo bench soak lint clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not soak"

demo: $(STAMP)
	$(VENV)/bin/apcrypto demo

bench: $(STAMP)
	$(PY) -m pytest benches -q -p no:cacheprovider --benchmark-only --benchmark-json=bench.json -o testpaths=benches -o python_files="bench_*.py"

# soak: tests run for many minutes; pytest-timeout bounds each one, and the faulthandler's periodic
# all-thread dump (faulthandler_timeout, 120 s for make test) is off: dumping live threads' frames
# mid-run crashed the 10-million-request memory soak with SIGSEGV at its first dump.
soak: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m soak --timeout=3000 -o faulthandler_timeout=0

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks .hypothesis *.egg-info
