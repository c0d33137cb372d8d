# `make test` and `make train` set everything up on first use (a venv in .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: install test test-slow test-all train bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# the long tests left out of `make test` (@pytest.mark.slow); `make test test-slow` = `make test-all`
test-slow: install
	$(PY) -m pytest $(PYTEST_ARGS) -m slow

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS) -m ""

train: install
	$(PY) scripts/train.py agent=ppo opt=hesscale

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
