# Set-up lives here so that the README's two commands are all a user needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp's name carries a hash of requirements.txt: when the file changes, the venv is rebuilt.
REQ_HASH := $(shell sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(REQ_HASH)

.PHONY: venv lint test test-fast tune clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# The inner loop: everything but the multi-node cluster, the sweeps and end-to-end scripts, the
# fault suite and the Ray Train runs (pyproject.toml's markers); `make test` (CI) runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not (cluster or sweep or faults or train or slow)"

clean:
	rm -rf $(VENV)

tune: $(STAMP)
	$(PY) scripts/tune.py
