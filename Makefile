# bulkjob: `make run` shows a demo bulk job, `make test` runs every test.
# Both set themselves up: a virtualenv in .venv, and (as root) Debian packages the tests use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BULKJOB := $(VENV)/bin/bulkjob
STAMP := $(VENV)/.installed
DEMO_DIR := .cache/demo
PYTEST_ARGS ?=

.PHONY: venv run test test-core test-faults bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# A few thousand items (a store and a day each) through the SQL steps handler: a three-step
# load per item (job/demo/load.sql) into an embedded SQLite database, a local manifest, no server.
run: venv
	@mkdir -p $(DEMO_DIR)
	$(PY) -m job.demo 3000 --db $(DEMO_DIR)/demo.db > $(DEMO_DIR)/items.jsonl
	$(BULKJOB) run --items $(DEMO_DIR)/items.jsonl --handler sql:job/demo/load.sql \
		--db sqlite:///$(DEMO_DIR)/demo.db --session-sql "PRAGMA synchronous = NORMAL" \
		--manifest $(DEMO_DIR)/state --run-id demo-$$(date +%Y%m%d%H%M%S) --max-failures 10 \
		--backoff 0.2 --metrics-port 0 --progress-interval 1 | tee $(DEMO_DIR)/summary.json
	@run_id=$$($(PY) -c "import json,sys; print(json.load(open('$(DEMO_DIR)/summary.json'))['run_id'])"); \
		echo; $(BULKJOB) status --manifest $(DEMO_DIR)/state --run-id $$run_id; \
		echo; echo "failed items (bulkjob report):"; \
		$(BULKJOB) report --manifest $(DEMO_DIR)/state --run-id $$run_id --format csv; \
		echo; $(PY) -m job.demo --summary $(DEMO_DIR)/demo.db

test: venv system-deps
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-core: venv
	$(PY) -m pytest -q -rs -m "not container and not faults" $(PYTEST_ARGS)

test-faults: venv system-deps
	$(PY) -m pytest -q -rs -m faults $(PYTEST_ARGS)

# docs/cli.md's tables of options and exit codes, and README.md's exit codes, from job/options.py and job/exits.py.
docs: venv
	$(PY) -m job.clidocs

clean:
	rm -rf $(VENV) .venv-* .cache bulkjob-state bench-results

# system-deps (Debian packages, as root), image, test-deploy, airflow-venv:
-include mk/*.mk
