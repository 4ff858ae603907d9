# The two commands of the README. Each one does its own set-up first.
VENV := .venv/bin

.PHONY: run test lint bootstrap chaos bench

run: bootstrap  ## the all-in-one local stack: Redis, ZooKeeper, api, 2 schedulers, 2 workers (ARGS=--cluster: a 3-master Redis Cluster)
	$(VENV)/echo-at-time up $(ARGS)

test: bootstrap lint  ## ruff, then every test against real Redis and ZooKeeper
	$(VENV)/python -m pytest

chaos: bootstrap  ## only the chaos suite (tests/chaos): kills, pauses, partitions under load
	$(VENV)/python -m pytest -m chaos tests/chaos

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports

bootstrap:
	@scripts/bootstrap

bench: bootstrap  ## the benchmark suite (bench/): prints tables, writes bench/results/
	@command -v wrk >/dev/null || (apt-get install -y -qq --no-install-recommends wrk || sudo apt-get install -y -qq --no-install-recommends wrk)
	$(VENV)/python -m pip install -q -e '.[bench]'
	$(VENV)/python -m bench.run $(BENCH)
