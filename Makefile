# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: deps venv test demo bench bench-kube clean

deps:
	./scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: deps venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: deps venv
	$(VPY) -m examples.demo

bench: deps venv
	$(VPY) bench/sync.py $(BENCH_ARGS)

bench-kube: deps venv
	$(VPY) bench/kube_latency.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
