# tierbox: `make run` and `make test` each do all set-up on a fresh Debian 12 machine.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench clean

setup:
	bash scripts/setup.sh

# The main job on built-in defaults: the same workload on every available tier,
# ending with a comparison table; the report (HTML, Markdown, JSON, charts) goes
# to $TIERBOX_HOME/bench/latest/, whose path is printed at the end.
run: setup
	$(PY) -m tierbox.cli bench --quick
	@$(PY) -m tierbox.cli gc > /dev/null  # leave no mount or cgroup behind

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Skip the suites marked slow (they still run in `make test` and CI).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy

bench: setup
	bash scripts/setup-bench.sh
	for b in benchmarks/bench_*.py; do $(PY) $$b || status=1; done; exit $${status:-0}

clean:
	-$(PY) -m tierbox.cli gc --all
