# Every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CI and development machines take the CPU build of torch that lies on their disk; the package itself
# only asks for torch>=2.4.
TORCH_PIN ?= torch==2.13.0

.PHONY: install dev demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

# The built-in model on a prompt, offline: writes outputs/demo.png and prints its path.
DEMO_PROMPT ?= a red circle above a blue square
demo: install
	mkdir -p outputs
	$(VENV)/bin/estable generate "$(DEMO_PROMPT)" --seed 1 --device cpu --out outputs/demo.png >/dev/null
	@echo "wrote $(CURDIR)/outputs/demo.png  (prompt: $(DEMO_PROMPT))"

lint: dev
	$(VENV)/bin/ruff check src tests

test: dev
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
