# `make demo` and `make test` are the README's two commands: each installs what it needs first.
VENV ?= .venv
STAMP := $(VENV)/.lkspec-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lkspec demo

# The whole suite, slow end-to-end checks on the real embedded model included.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Unit tests only (tiny random configs), for a quick edit-test loop.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
