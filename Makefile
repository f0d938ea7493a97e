# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: deps deps-test venv test demo bench bench-kube clean

# Debian packages (scripts/install-deps.sh): the runtime ones, then the test-only tools.
# deps-test runs after deps, never beside it, so that two apt-gets never race for its lock.
deps:
	./scripts/install-deps.sh

deps-test: deps
	./scripts/install-deps.sh --test

# Order-only on deps: python3-venv must be installed before the venv is made (also under -j),
# but a deps run alone does not make the venv out of date.
$(VENV)/.installed: pyproject.toml | deps
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: deps-test venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: deps venv
	$(VPY) -m examples.demo

bench: deps venv
	$(VPY) bench/sync.py $(BENCH_ARGS)

bench-kube: deps venv
	$(VPY) bench/kube_latency.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
