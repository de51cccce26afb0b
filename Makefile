# stageserve — the two commands a new user needs are `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data
export PYTHONUNBUFFERED := 1
# Torch's OpenMP threads sleep instead of spinning when they wait: the tests run several torch processes (the
# stages) on few cores, where spinning threads slow every process down several-fold.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install run test test-fast lint protos bench eval clean

install:
	@bash scripts/bootstrap.sh

# `run` starts the whole pipeline (gateway, throttler, encoder, prefill, decode) on 127.0.0.1.
run: install
	$(VENV)/bin/stageserve up

# pytest exit code 5 (no tests collected) is a failure here, never a silent pass.
test: install lint
	@$(PY) -m pytest -q --durations=25 tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check services operators tests
	$(VENV)/bin/mypy services/stageserve/core services/stageserve/policy services/stageserve/kvcodec/format.py services/stageserve/kvcodec/report.py operators/stageserve_operator/policy
	$(VENV)/bin/lint-imports

protos: install
	@bash scripts/gen_protos.sh

bench: install
	$(VENV)/bin/stageserve bench offline --data $(DATA)/azure_llm_2023/AzureLLMInferenceTrace_conv.csv

eval: install
	$(VENV)/bin/stageserve eval ppl --data $(DATA)/wikitext2/test.txt --tokens 8192 --window 1024

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache services/*.egg-info
