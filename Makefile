# The README's commands. Each bootstraps what it needs (Debian packages as
# root, .venv) on a fresh Debian 12 machine, so it works as the first command.
.PHONY: demo test check bench bootstrap image clean

PY := .venv/bin/python

bootstrap:
	scripts/bootstrap.sh --dev

demo:
	scripts/bootstrap.sh
	$(PY) -m procurator.demo

test:
	scripts/bootstrap.sh
	$(PY) -m pytest $(PYTEST_ARGS)

check:
	scripts/bootstrap.sh --dev
	.venv/bin/ruff format --check procurator tests bench
	.venv/bin/ruff check procurator tests bench
	.venv/bin/mypy
	.venv/bin/lint-imports
	promtool check rules contrib/prometheus/procurator.rules.yml

bench:
	scripts/bootstrap.sh --dev
	$(PY) -m bench

clean:
	rm -rf .venv build dist .pytest_cache .mypy_cache .ruff_cache
