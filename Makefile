# Quick start: `make demo` (export the bundled digits model) and `make test`.
# Both create .venv on first use and install colln with every extra that installs on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev,trt-rtx,serve

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(VENV)/bin/colln-export digits_vit --keep 0.7 --force

test: install
	$(PY) -m pytest -q

clean:
	rm -rf exports .pytest_cache
