# One entry point: `make demo` and `make test` do all their own set-up (venv, install, servers).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the local wheels on the dev machines; elsewhere pip downloads them as usual.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv install test test-fast demo lint bench-ood bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,embedded]'
	touch $@

venv install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration and not slow"

demo: install
	$(BIN)/dlsr demo

lint: install
	$(BIN)/ruff check .

bench-quick: install
	$(BIN)/dlsr bench ood --quick

bench-ood: install
	$(BIN)/dlsr bench ood

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
