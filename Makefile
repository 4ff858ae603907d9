# The two commands of the README. Each one does its own set-up first.
VENV := .venv/bin

.PHONY: run test lint bootstrap

run: bootstrap  ## the all-in-one local stack: Redis, ZooKeeper, api, 2 schedulers, 2 workers
	$(VENV)/echo-at-time up

test: bootstrap lint  ## ruff, then every test against real Redis and ZooKeeper
	$(VENV)/python -m pytest

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

bootstrap:
	@scripts/bootstrap
