# The two commands for a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
# the default suite takes about 4 minutes on 2 cores; a hung test stops the run here, well inside CI's 90
TEST_TIMEOUT ?= 30m

.PHONY: setup test test-slow demo clean

setup:
	@bash scripts/bootstrap.sh

test: setup
	timeout $(TEST_TIMEOUT) $(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(PY) -m gpart.demo

clean:
	rm -rf .venv .pytest_cache .hypothesis build src/*.egg-info
