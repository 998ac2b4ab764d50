# Quick start: `make demo` (export the bundled digits model) and `make test`.
# Both create .venv on first use and install colln with every extra that installs on a CPU machine,
# at the versions pinned in constraints.txt (`make lock` refreshes them; pyproject.toml keeps the ranges).
# The same file pins the build backend (setuptools) that pip fetches to build colln itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test processes: most tests are single-threaded, so on 2 cores two workers halve the suite's wall time.
# Each worker's (and its subprocesses') PyTorch runs one OpenMP thread: two workers with two spinning
# threads each oversubscribe 2 cores (spinning: the suite took 17:13 with 30.7 CPU-minutes, then
# 11:23 with 20.8, fresh-clone runs on this 2-vCPU VM).
TEST_WORKERS ?= 2
EXTRAS ?= cpu,dev,trt-rtx,serve,openvino,docs
LOCK ?= constraints.txt

.PHONY: demo test lint docs install lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) --build-constraint $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

# Re-resolve the extras from scratch (fresh venv, no pip cache) and pin the result. Run it on
# purpose, review the diff, then commit: `make install` never changes the pins by itself.
lock:
	set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	PIP_NO_CACHE_DIR=1 "$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	PIP_NO_CACHE_DIR=1 "$$tmp/venv/bin/python" -m pip install --quiet ".[$(EXTRAS)]"; \
	build=$$("$$tmp/venv/bin/python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])'); \
	PIP_NO_CACHE_DIR=1 "$$tmp/venv/bin/python" -m pip install --quiet --upgrade $$build; \
	{ echo "# Versions \`make install\` installs: colln[$(EXTRAS)] resolved from scratch by \`make lock\`"; \
	  echo "# ($$("$$tmp/venv/bin/python" -c 'import platform; print("CPython", platform.python_version(), platform.system(), platform.machine())'), $$(date -u +%Y-%m-%d))."; \
	  echo "# Refresh on purpose with \`make lock\` and commit the diff; pyproject.toml keeps the ranges users get."; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude colln --exclude wheel; \
	} > $(LOCK).new; \
	mv $(LOCK).new $(LOCK)

demo: install
	$(VENV)/bin/colln-export digits_vit --keep 0.7 --force

# The layer contract and lint run first: a back edge between colln's layers fails CI; then the docs
# site, whose strict build fails on a broken link or anchor.
test: lint docs
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The docs site (mkdocs.yml, pages under docs/) into site/. The variable silences mkdocs-material's
# banner about its successor; it changes no output.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf exports .pytest_cache site
