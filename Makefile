# Set-up and the two commands of the README. Python packages install into .venv; the test
# target also installs the Debian packages its tests drive (apt-get, as root or through sudo).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# espeak-ng: speech for tests and the corpus; chromium: the real browser of the streaming tests;
# portaudio19-dev: pyaudio builds against it.
SYS_PKGS := espeak-ng libespeak-ng1 chromium portaudio19-dev
TEST_EXTRAS := detect,export,dev,serve,live,bench,pipecat,livekit,cluster

.PHONY: setup setup-test sysdeps demo test lint bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on these machines it is a local CPU wheel; a plain "torch" would pull a
# multi-GB CUDA build. The package itself accepts torch 2.11-2.13.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[detect,export,serve]'
	touch $@

sysdeps:
	@missing=""; for p in $(SYS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

setup-test: sysdeps $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[$(TEST_EXTRAS)]'
	touch $@

# The main job: render out.mp4 (the default face says the bundled sentence), then serve the
# live avatar; open the printed address, allow the microphone, speak. Ctrl-C stops the server.
demo: setup
	$(VENV)/bin/talkstream render --out out.mp4
	$(VENV)/bin/talkstream serve

test: setup-test
	$(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check talkstream tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/talkstream bench

clean:
	rm -rf $(VENV) out.mp4 .pytest_cache .mypy_cache .ruff_cache
