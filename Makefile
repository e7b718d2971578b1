# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.recloop/prefect
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# make test runs the fast tier on this many pytest-xdist processes (0: in one process)
TEST_WORKERS ?= 2

.PHONY: demo test test-all lint bench clean install up docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel first, so pip never pulls a CUDA build
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p "$(PREFECT_HOME)"   # Prefect creates its home without parents (a warning on a fresh clone)
	$(VENV)/bin/recloop demo

test: $(STAMP)
	@mkdir -p "$(PREFECT_HOME)"
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-all: $(STAMP)
	@mkdir -p "$(PREFECT_HOME)"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "slow or not slow"

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d .site

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

up: $(STAMP)
	$(VENV)/bin/recloop up

clean:
	rm -rf .recloop
