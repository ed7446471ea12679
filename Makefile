# The two commands for a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup test test-slow demo clean

setup:
	@bash scripts/bootstrap.sh

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(PY) -m gpart.demo

clean:
	rm -rf .venv .pytest_cache .hypothesis build src/*.egg-info
