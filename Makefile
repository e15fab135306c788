# mailer — developer entry points.  Run `make` (or `make help`) for the list.

PYTHON ?= python3
VENV = .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k campaign -x"`.
PYTEST_ARGS ?=

# The demo runs everything locally with the embedded defaults (SQLite, a
# file-system Celery broker under var/, email written to var/outbox/).
DEMO_PORT ?= 8000
# The web server listens on loopback only: the demo's admin password is admin.
DEMO_ENV = DEBUG=1 WEB_CONCURRENCY=1 WORKER_CONCURRENCY=1 BIND_ADDRESS=127.0.0.1

.DEFAULT_GOAL := help
.PHONY: help install demo test lint fmt bench bench-campaign bench-latency bench-drips bench-api clean distclean

help: ## Show this help
	@echo "Usage: make <target> [PYTHON=python3] [PYTEST_ARGS=...]"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-15s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install requirements.txt + mailer (editable)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

demo: install ## Run the demo: web on :8000, both workers and beat (Ctrl-C stops all)
	mkdir -p var/outbox var/broker
	$(DEMO_ENV) $(BIN)/python manage.py migrate --noinput
	$(DEMO_ENV) $(BIN)/python manage.py mailer_demo
	@echo
	@echo "================================================================"
	@echo "  mailer demo"
	@echo "  Open        http://127.0.0.1:$(DEMO_PORT)/"
	@echo "  Admin       http://127.0.0.1:$(DEMO_PORT)/admin/  (credentials printed above)"
	@echo "  Sent mail   lands in var/outbox/ as .eml files"
	@echo "  Ctrl-C stops everything (web, both workers, beat)."
	@echo "================================================================"
	@echo
	PATH="$(CURDIR)/$(BIN):$$PATH" $(DEMO_ENV) $(BIN)/python manage.py demo_processes \
		--port $(DEMO_PORT) web worker_transactional worker_campaign beat

# The whole suite on PostgreSQL, then the unit tests again on SQLite (the demo's database,
# whose portable SQL paths must not rot).
test: install ## Run the suite on PostgreSQL + Redis, then the unit tests on SQLite
	MAILER_TEST_BROWSER=1 bash tests/services.sh run -- sh -c '\
		$(BIN)/pytest $(PYTEST_ARGS) && \
		echo "== unit tests again on SQLite" && \
		DATABASE_URL=sqlite:///$(CURDIR)/var/test-sqlite.db $(BIN)/pytest -m "not integration" $(PYTEST_ARGS)' 

bench: install ## Run the transactional benchmark against real services
	bash tests/services.sh run -- $(BIN)/python bench/transactional.py

bench-campaign: install ## Run the campaign benchmark (100k contacts) against real services
	bash tests/services.sh run -- $(BIN)/python bench/campaign.py

# Extra arguments for bench/latency.py, e.g. `make bench-latency LATENCY_ARGS="--phases smtp"`.
LATENCY_ARGS ?=

bench-latency: install ## Sending with a relay 10 ms / an ESP 100 ms away, and the rate limit
	bash tests/services.sh run -- $(BIN)/python bench/latency.py $(LATENCY_ARGS)

bench-drips: install ## Drip ticks: 10k and 100k enrollments due in the same minute
	bash tests/services.sh run -- $(BIN)/python bench/drips.py

bench-api: install ## The HTTP API through gunicorn: single sends, batches, /metrics at 1M rows
	bash tests/services.sh run -- $(BIN)/python bench/api.py

lint: install ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install ## ruff format + ruff check --fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove var/ (outbox, broker, test services) and caches; keeps .venv
	-@[ -d var/test-services ] && bash tests/services.sh stop || true
	rm -rf var/ staticfiles/ build/ .pytest_cache/ .ruff_cache/ *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## clean + remove .venv
	rm -rf $(VENV)
