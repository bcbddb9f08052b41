# `make demo` and `make test` work from a fresh clone: each sets itself up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo farm test bench clean

setup:
	@scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/tlscache-farm --report

farm: setup
	$(VENV)/bin/tlscache-farm

test:
	@scripts/bootstrap.sh --tests
	$(VENV)/bin/ruff check tlscache server tests bench
	$(VENV)/bin/ruff format --check tlscache server tests bench
	$(VENV)/bin/mypy tlscache server
	$(VENV)/bin/pytest -n 2

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
