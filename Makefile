# Two commands do all the set-up: `make dev` starts Rotator, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: dev test lint test-embedded test-real install browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The operations page is tested in a real browser: Debian's Chromium, driven by Playwright
# (`playwright install` is never run). Installed once (needs root), skipped when present.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

dev: $(STAMP)
	$(BIN)/rotator dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Both passes: the embedded defaults (SQLite, in-memory broker), then the real services
# (PostgreSQL and Redis; see docs/operating.md, Testing). Nothing has to be running: the real
# pass starts a throwaway PostgreSQL and Redis of its own (installed with the dev extras) and
# stops them at the end, unless ROTATOR_TEST_DATABASE_URL / ROTATOR_TEST_BROKER_URL name
# running ones (then it creates, and drops, a database of its own on that PostgreSQL).
test: lint test-embedded test-real

test-embedded: $(STAMP) browser
	ROTATOR_TEST_BACKEND=embedded $(BIN)/pytest

test-real: $(STAMP) browser
	ROTATOR_TEST_BACKEND=real $(BIN)/pytest
