# Set-up and the two commands of the README. Python packages install into .venv; the test
# target also installs the Debian packages its tests drive (apt-get, as root or through sudo).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# python3-venv: Debian's python3 makes no venv without it; espeak-ng: speech for tests and the
# corpus; chromium: the real browser of the streaming tests; portaudio19-dev: pyaudio builds
# against it; janus: the SFU the publish tests send into.
SYS_PKGS := python3-venv espeak-ng libespeak-ng1 chromium portaudio19-dev janus
TEST_EXTRAS := detect,export,dev,serve,live,bench,pipecat,livekit,cluster

.PHONY: setup setup-test venv-support sysdeps whip-server demo test lint bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on these machines it is a local CPU wheel; a plain "torch" would pull a
# multi-GB CUDA build. The package itself accepts torch 2.11-2.13.
$(VENV)/.installed: pyproject.toml | venv-support
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[detect,export,serve]'
	touch $@

# `python3 -m venv` on stock Debian/Ubuntu fails ("ensurepip is not available") until the
# python3-venv package is installed: setup installs it first (apt-get, as root or through sudo).
# Elsewhere (no apt-get, or a Python with ensurepip) this does nothing.
venv-support:
	@if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 && command -v apt-get >/dev/null; then \
	  echo "installing Debian package: python3-venv (python3 -m venv needs it)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q python3-venv; \
	fi

sysdeps:
	@missing=""; for p in $(SYS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

# simple-whip-server (WHIP in front of Janus): Debian packages its JavaScript, but the package
# depends on Debian's nodejs and node-* packages, which conflict with this machine's nodejs. So
# its files are unpacked from the .deb into $(WHIP_SERVER_DIR) and its npm dependencies (the
# node-* packages it depends on, at the Debian versions' majors) installed beside them.
WHIP_SERVER_DIR ?= build/simple-whip-server
WHIP_NPM_DEPS := async@3 body-parser@1 colors@1.4.0 cors@2 debug@4 express@4 websocket@1

whip-server: $(WHIP_SERVER_DIR)/.installed

$(WHIP_SERVER_DIR)/.installed:
	rm -rf $(WHIP_SERVER_DIR) && mkdir -p $(WHIP_SERVER_DIR)/deb
	cd $(WHIP_SERVER_DIR)/deb && { apt-get download simple-whip-server 2>/dev/null || { \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; $$SUDO apt-get update -q >/dev/null && \
	  apt-get download simple-whip-server; }; }
	dpkg-deb -x $(WHIP_SERVER_DIR)/deb/simple-whip-server_*.deb $(WHIP_SERVER_DIR)/root
	mkdir -p $(WHIP_SERVER_DIR)/app
	cp -r $(WHIP_SERVER_DIR)/root/usr/share/simple-whip-server/web $(WHIP_SERVER_DIR)/app/
	mkdir -p $(WHIP_SERVER_DIR)/app/src
	cp $(WHIP_SERVER_DIR)/root/usr/share/simple-whip-server/src/server.js \
	   $(WHIP_SERVER_DIR)/root/usr/share/simple-whip-server/src/whip-janus.js $(WHIP_SERVER_DIR)/app/src/
	cp $(WHIP_SERVER_DIR)/root/etc/simple-whip-server/config.js $(WHIP_SERVER_DIR)/app/src/config.js
	echo '{"name": "simple-whip-server-deps", "private": true}' > $(WHIP_SERVER_DIR)/app/package.json
	cd $(WHIP_SERVER_DIR)/app && npm install --no-audit --no-fund --loglevel=error $(WHIP_NPM_DEPS)
	touch $@

setup-test: sysdeps whip-server $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[$(TEST_EXTRAS)]'
	touch $@

# The main job: render out.mp4 (the default face says the bundled sentence), then serve the
# live avatar; open the printed address, allow the microphone, speak. Ctrl-C stops the server.
demo: setup
	$(VENV)/bin/talkstream render --out out.mp4
	$(VENV)/bin/talkstream serve

# Two worker processes, one test file each at a time: the suite mostly waits (browsers, Janus,
# Ray, servers) and kept one of CI's two cores busy on average; -n 2 took it from 376 s to
# 226-240 s (docs/decisions.md). Tests marked realtime (a real browser's frame rate, 25 fps
# pacing) then run alone: beside another worker a browser once saw a 1 s stall.
# TEST_WORKERS=0 runs the first part in one process too.
TEST_WORKERS ?= 2

test: setup-test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not realtime"
	$(PY) -m pytest -q -m realtime

lint: setup-test
	$(VENV)/bin/ruff check talkstream tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/talkstream bench

clean:
	rm -rf $(VENV) out.mp4 .pytest_cache .mypy_cache .ruff_cache
