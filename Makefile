# Every target works from a fresh clone: each builds the part of .venv it needs itself.
# `make demo` / `make run` install the runtime only; `make test` / `make lint` add the
# development and deployment toolchain on top (the [dev] extra and checkov's own venv).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch where no NVIDIA GPU is present (a plain `torch` requirement would
# pull a multi-GB CUDA build); on a GPU machine pip resolves the normal CUDA wheel.
TORCH_CPU_VERSION ?= 2.13.0
# Triton runs its kernels' CPU tests in its interpreter (tests/test_triton_interpreter.py); the
# interpreter of this version needs numpy < 2.3. Tests only: serving on the CPU needs no Triton.
TRITON_CPU_VERSION ?= 3.6.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
MODEL  ?= TheBloke/Llama-2-13B-GPTQ
REVISION ?= main
DEMO_DIR ?= demo-model

RUNTIME := $(BIN)/.installed-runtime
DEV     := $(BIN)/.installed-dev
CHECKOV := $(VENV)/checkov/bin/checkov
# Written by `gptq-serve synth` beside the weights (engine/checkpoint/marker.py).
SYNTH_MARKER := gptq-serve-synth.json

# `make demo PORT=8080 HOST=127.0.0.1` passes --port / --host; without them the server's
# settings apply (GPTQ_PORT / GPTQ_HOST, else port 8000 on all interfaces). Only values given
# on the command line count: a HOST in the environment is often just the machine's name.
SERVE_FLAGS = $(if $(filter command line,$(origin PORT)),--port $(PORT)) \
              $(if $(filter command line,$(origin HOST)),--host $(HOST))

.PHONY: venv test test-cuda soak lint run demo bench clean

$(RUNTIME): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q -e '.[cuda]'
else
	$(BIN)/pip install -q torch==$(TORCH_CPU_VERSION)
	$(BIN)/pip install -q -e .
endif
	touch $@

$(DEV): $(RUNTIME)
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q -e '.[dev]'
else
	$(BIN)/pip install -q triton==$(TRITON_CPU_VERSION) 'numpy<2.3' -e '.[dev]'
endif
	touch $@

# checkov pins packaging<24 and networkx<2.7 (older than torch and transformers need), so it
# gets a virtual environment of its own; tests/deploy_tools.py finds it there.
$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov==3.3.30

venv: $(DEV) $(CHECKOV)

test: venv
	$(BIN)/python -m pytest -q -ra

test-cuda: venv
	$(BIN)/python -m pytest -q -ra -m cuda

# The long reliability runs (docs/reliability.md); each test prints its FIGURES line.
soak: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -s -m soak

lint: venv
	$(BIN)/ruff check app engine tests
	$(BIN)/hadolint Dockerfile

run: $(RUNTIME)
	$(BIN)/gptq-serve serve --model $(MODEL) --revision $(REVISION) $(SERVE_FLAGS)

demo: $(RUNTIME)
	test -f $(DEMO_DIR)/config.json -a -f $(DEMO_DIR)/$(SYNTH_MARKER) || $(BIN)/gptq-serve synth --preset tiny --bits 4 --group-size 32 --out $(DEMO_DIR)
	$(BIN)/gptq-serve serve --model $(DEMO_DIR) --served-model-name demo --device cpu $(SERVE_FLAGS)

bench: $(RUNTIME)
	$(BIN)/gptq-serve bench

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_DIR)
