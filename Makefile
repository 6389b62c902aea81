# One entry point: `make demo` and `make test` do all their own set-up (venv, install, servers).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the local wheels on the dev machines; elsewhere pip downloads them as usual.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= --durations=15

.PHONY: venv install system-deps test test-fast demo lint settings-table bench-ood bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The dashboard test drives the live view in tmux; the Prometheus test scrapes a monitor with Debian's prometheus.
# Install them from Debian only when missing and we are root (CI and the dev machines); elsewhere say how, and
# the tests fail with the same advice.
system-deps:
	@for pkg in tmux prometheus; do command -v $$pkg >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $$pkg (system test dependency)"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg >/dev/null 2>&1 || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg >/dev/null)); \
	  else echo "note: $$pkg is missing; install it (apt-get install $$pkg) for its test"; fi; }; done

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,embedded]'
	touch $@

venv: $(BIN)/python

install: $(VENV)/.installed system-deps

# Starts what the tests need and is not running (Redis; the Tansu broker is started by the test fixtures).
test: install
	CLUSTER_PASS=1 scripts/run_tests.sh $(BIN)/python $(PYTEST_ARGS)

test-fast: install
	scripts/run_tests.sh $(BIN)/python -m "not integration and not slow" $(PYTEST_ARGS)

demo: install
	$(BIN)/dlsr demo

lint: install
	$(BIN)/ruff check .

# Rewrites the settings table in README.md from config.Settings (tests/test_readme.py checks it is current).
settings-table: install
	$(BIN)/python scripts/settings_table.py --write README.md

bench-quick: install
	$(BIN)/dlsr bench ood --quick

bench-ood: install
	$(BIN)/dlsr bench ood

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Fault suite in its full form (long kills, pauses, outages) plus longer fuzzing; `make test` runs the reduced form.
.PHONY: faults
faults: install
	DLSR_FAULTS=full DLSR_FUZZ_EXAMPLES=$${DLSR_FUZZ_EXAMPLES:-5000} scripts/run_tests.sh $(BIN)/python -p no:cacheprovider tests/faults tests/dlsr/test_images_fuzz.py tests/common/test_contract_fuzz.py $(PYTEST_ARGS)
