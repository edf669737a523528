# The README's two set-up commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test lint typecheck pytest docs clean install-dev mutants nightly

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip

$(VENV)/.runtime: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e '.[video]'
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) -e '.[video,dev,docs,diffusers]'
	touch $@

install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(VENV)/bin/memkit demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check memkit tests benchmarks
	$(VENV)/bin/ruff format --check memkit tests benchmarks

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy memkit benchmarks

pytest: $(VENV)/.dev
	MEMKIT_TYPECHECK=1 $(VENV)/bin/pytest -n 2 tests memkit

docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $(VENV)/site

test: lint typecheck pytest docs

# every known bug in tests/mutants.py, injected in turn; each must fail its tests (15-25 min on 2 cores)
mutants: $(VENV)/.dev
	MEMKIT_TYPECHECK=1 $(PY) tests/mutants.py -j 2

# the suite with many more random hypothesis examples (HYPOTHESIS_PROFILE=nightly, tests/conftest.py)
nightly: $(VENV)/.dev
	HYPOTHESIS_PROFILE=nightly MEMKIT_TYPECHECK=1 $(VENV)/bin/pytest -n 2 tests memkit

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache .hypothesis
