# The two commands of the README:
#   make demo   set up .venv, build the offline models and demo slides, run the pipeline
#   make test   set up .venv and run the test suite
# Everything else is a step of those two.

# pyproject requires Python 3.11
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
CORES ?= all

.PHONY: setup demo test models demo-data bench clean vllm-env

# llama.cpp's CPU kernels are compiled for one fixed instruction set, x86-64-v3 (AVX2, FMA, F16C),
# instead of -march=native: a native build sums float32 dot products in an order that depends on
# the build machine's SIMD width, so the summarize step's greedy text could differ between machines
# (README "Reproducible on any machine"). pip's wheel cache does not key on CMAKE_ARGS, so the wheel
# is built once, without that cache, into a cache of its own keyed by version and flags.
LLAMA_CPP := $(shell grep -o 'llama-cpp-python\[server\]==[0-9.]*' pyproject.toml | cut -d= -f3)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
LLAMA_WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/pathgen/wheels/llama-cpp-python-$(LLAMA_CPP)-x86-64-v3

# pip resolves the pinned set from pyproject.toml; torch/torchvision are pinned there.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	test -n "$(LLAMA_CPP)"
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet --no-cache-dir --no-deps \
	    --no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_CPP)" -w $(LLAMA_WHEELS)
	$(BIN)/python -m pip install --quiet --find-links $(LLAMA_WHEELS) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

TINY_MODELS := models/tiny-clip/open_clip_model.pt models/tiny-llava/config.json models/tiny-llm/tiny-llm.gguf

$(TINY_MODELS) &: | setup
	pathgen models tiny --out models

data/slides.tsv: | setup
	pathgen demo --root .

models: $(TINY_MODELS)
demo-data: data/slides.tsv

demo: setup models demo-data
	snakemake --cores $(CORES)

test: setup
	$(BIN)/python -m pytest

bench: demo
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/engines.py

# vLLM (the openai engine's server on GPU nodes) lives in its own environment: vllm 0.33.0 pins
# torch==2.14.0 and transformers<5.21, which conflict with the pins above (README "Serving engines").
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet "vllm==0.33.0"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

clean:
	rm -rf data/tiles data/embeddings data/prompts data/selection data/patches logs .snakemake
