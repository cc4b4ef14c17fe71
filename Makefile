# Every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CI and development machines take the CPU build of torch that lies on their disk; the package itself
# only asks for torch>=2.4.
TORCH_PIN ?= torch==2.13.0

.PHONY: install dev demo test lint clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,server,plot]"
	# torch-fidelity's FID Inception is a test oracle (tests/test_fid.py); --no-deps: it lists torchvision,
	# which does not import beside this torch build, and the test imports the one module it needs without it.
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"
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

# The web page's test (tests/test_server_page.py) drives Debian's Chromium through chromedriver; as root on a
# Debian-like machine they are installed when missing, elsewhere that test is skipped.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "chromium/chromedriver missing (apt-get install chromium chromium-driver): the page test is skipped"; fi

# The suite on PYTEST_WORKERS processes (pytest-xdist), each test given one thread: CI's machine has two cores, and
# two workers of one thread each finish sooner than one of two threads (RESULTS.md, "the suite's time").
PYTEST_WORKERS ?= 2
test: dev browser
	$(VENV)/bin/ruff check src tests
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
