# The two commands: `make serve` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KMS_HOME ?= $(CURDIR)/var
SYSTEM_TOOLS := softhsm2-util pkcs11-tool qemu-img qemu-io faketime openssl curl chattr
APT_PACKAGES := softhsm2 opensc qemu-utils faketime openssl curl ca-certificates e2fsprogs \
                postgresql

.PHONY: serve test demo bench token init system-deps venv clean

system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing initdb"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV) || { apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

token: system-deps
	softhsm-setup/setup-token.sh

init: token venv
	$(BIN)/kms init

serve: init
	$(BIN)/kms serve

test: system-deps venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: init
	scripts/demo.sh

bench: init
	@command -v wrk >/dev/null || { echo "installing wrk (the load generator)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
