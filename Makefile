# idlewire: two commands for a newcomer.
#   make image   installs what it needs, builds the default image into out/
#   make test    installs what it needs, runs linters and every test (images booted in QEMU)
SHELL := /bin/bash
TARGET ?= rpi4-arm64
SITE ?= $(wildcard site.yml)
OUT ?= out
PYTEST_ARGS ?= --durations=15
VENV := .venv
BIN := $(VENV)/bin

.PHONY: all deps deps-test image images test lint unit e2e clean help

all: help

help:
	@echo "make image [TARGET=rpi4-arm64|x86_64] [SITE=site.yml]   build a node image into $(OUT)/"
	@echo "make test                                              linters + every test"
	@echo "make e2e                                               the walk from a box to a paid gigabyte alone (~9 min under TCG; make test runs it too)"
	@echo "make lint | make unit                                  quick subsets"

deps:
	@tools/scripts/deps.sh image

deps-test:
	@tools/scripts/deps.sh test

image: deps
ifeq ($(SITE),)
	@echo "note: no site.yml (copy site.example.yml and add your SSH key): building a golden image"
	@echo "      with no login key; give units keys with 'idlewire stamp', or rebuild with SITE=site.yml"
	$(BIN)/idlewire build --target $(TARGET) --out $(OUT) --allow-no-login
else
	$(BIN)/idlewire build --target $(TARGET) --out $(OUT) --config $(SITE)
endif

lint: deps-test
	$(BIN)/ruff check .
	$(BIN)/yamllint --strict .
	$(BIN)/python tools/scripts/role_docs.py --check
	$(BIN)/python tools/scripts/schema_docs.py --check
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint --offline --profile production -q

unit: deps-test
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# tests/unit on two workers (a file's tests stay on one: its module fixtures are built once), then
# the rest one at a time: the namespace, shaping and VM tests measure time and share the CPU badly.
test: lint
	@rc=0; \
	$(BIN)/pytest -n 2 --dist loadfile tests/unit $(PYTEST_ARGS) || rc=$$?; \
	$(BIN)/pytest --ignore=tests/unit $(PYTEST_ARGS) || rc=$$?; \
	exit $$rc

e2e: deps-test
	$(BIN)/pytest tests/e2e -v $(PYTEST_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
