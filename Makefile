# hunter_attach: every target creates and uses the project's own virtualenv (.venv) and installs
# what it needs, gdb included.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Packages the tests compare against (hunter, the oracle), kept out of the venv's bin/: hunter's
# console script is also named hunter-trace. tests/conftest.py puts this directory on sys.path.
PEERS := $(VENV)/peers
PEER_PACKAGES := hunter==3.9.0
SOURCES := pyproject.toml setup.py hunter_attach/_tracer.c hunter_attach/_speedups.c \
           hunter_attach/inject/_helper.c

.PHONY: help demo test services lint bench stress soak asan clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): $(SOURCES)
	@command -v gdb >/dev/null 2>&1 || { echo "installing gdb"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gdb; }
	@command -v cc >/dev/null 2>&1 || { echo "installing a C compiler"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@# a venv made before the peers directory has hunter in site-packages: its hunter-trace
	@# script replaced ours (uninstalling it removes that file; the install below writes ours)
	$(PY) -m pip uninstall -q -y hunter 2>/dev/null || true
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps --upgrade --target $(PEERS) $(PEER_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)  ## attach to a built-in demo target for a few seconds
	$(PY) scripts/demo.py

test: $(STAMP) services  ## the test suite (what CI runs)
	$(PY) -m pytest -q -ra
	$(MAKE) lint

services: $(STAMP)  ## the real-service tests' venvs (tests/services), built once and cached
	$(PY) scripts/service_venvs.py

lint: $(STAMP)  ## ruff and mypy
	$(VENV)/bin/ruff check hunter_attach tests scripts
	$(VENV)/bin/mypy hunter_attach

bench: $(STAMP)  ## benchmarks; writes docs/bench.md
	$(PY) scripts/bench.py

asan: $(STAMP)  ## the C tracer's unit suite under AddressSanitizer (docs/asan.md)
	bash scripts/asan.sh

soak: $(STAMP)  ## 5 minutes of attach/trace/detach cycles on an HTTP service (scripts/soak.py)
	$(PY) scripts/soak.py --minutes 5

stress: $(STAMP)  ## the long stress tests
	$(PY) -m pytest -q -ra -m slow

clean:  ## remove the virtualenv and build products
	rm -rf $(VENV) build *.egg-info hunter_attach/*.so hunter_attach/inject/*.so
