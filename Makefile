# Every target works from a fresh clone: `make test` builds .venv itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch where no NVIDIA GPU is present (a plain `torch` requirement would
# pull a multi-GB CUDA build); on a GPU machine pip resolves the normal CUDA wheel.
TORCH_CPU_VERSION ?= 2.13.0
# Triton runs its kernels' CPU tests in its interpreter (tests/test_triton_interpreter.py); the
# interpreter of this version needs numpy < 2.3.
TRITON_CPU_VERSION ?= 3.6.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
MODEL  ?= TheBloke/Llama-2-13B-GPTQ
REVISION ?= main
DEMO_DIR ?= demo-model

CHECKOV := $(VENV)/checkov/bin/checkov

.PHONY: venv test test-cuda lint run demo bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q -e '.[dev,cuda]'
else
	$(BIN)/pip install -q torch==$(TORCH_CPU_VERSION) triton==$(TRITON_CPU_VERSION) 'numpy<2.3'
	$(BIN)/pip install -q -e '.[dev]'
endif
	touch $@

# checkov pins packaging<24 and networkx<2.7 (older than torch and transformers need), so it
# gets a virtual environment of its own; tests/deploy_tools.py finds it there.
$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov==3.3.30

venv: $(BIN)/.installed $(CHECKOV)

test: venv
	$(BIN)/python -m pytest -q -ra

test-cuda: venv
	$(BIN)/python -m pytest -q -ra -m cuda

lint: venv
	$(BIN)/ruff check app engine tests
	$(BIN)/hadolint Dockerfile

run: venv
	$(BIN)/gptq-serve serve --model $(MODEL) --revision $(REVISION)

demo: venv
	test -f $(DEMO_DIR)/config.json || $(BIN)/gptq-serve synth --preset tiny --bits 4 --group-size 32 --out $(DEMO_DIR)
	$(BIN)/gptq-serve serve --model $(DEMO_DIR) --served-model-name demo --device cpu --port 8000

bench: venv
	$(BIN)/gptq-serve bench

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_DIR)
