# Benchmarks: the job against its alternatives and the targets it must reach (bench/README.md).
# Never part of `make test`. Included by the top-level Makefile, which defines PYTHON, PY and
# `venv`; mk/deploy.mk defines `airflow-venv` (Airflow in a virtualenv of its own).
#
#   make bench                                    every workload, about 10 minutes on 2 cores
#   make bench BENCH_ARGS=--quick                 smaller sizes: a smoke test, not figures to quote
#   make bench BENCH_ARGS="--only overhead,io"    some workloads
#
# Results: a table on stdout, and JSON and Markdown under bench-results/ (git-ignored).

#: The profiler lives in a virtualenv of its own: it is no dependency of the job.
BENCH_VENV ?= .venv-bench
PY_SPY_VERSION ?= 0.4.3
BENCH_ARGS ?=

.PHONY: bench bench-venv

bench-venv: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed:
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check py-spy==$(PY_SPY_VERSION)
	touch $@

# GNU parallel is one of the peers; PostgreSQL serves the database workload (a private cluster
# on loopback, started by tests/pg.py); the S3 server is moto's, from the job's own .venv.
bench: venv airflow-venv bench-venv
	@scripts/install-system-deps.sh parallel postgresql
	$(PY) -m bench $(BENCH_ARGS)
