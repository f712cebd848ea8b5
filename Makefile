# Set-up and the two commands of the README. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on these machines it is a local CPU wheel; a plain "torch" would pull a
# multi-GB CUDA build. The package itself accepts torch 2.11-2.13.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[detect,export,dev]'
	touch $@

demo: setup
	$(VENV)/bin/talkstream render --out out.mp4

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check talkstream tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/talkstream bench

clean:
	rm -rf $(VENV) out.mp4 .pytest_cache .mypy_cache .ruff_cache
