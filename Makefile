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

# pip resolves the pinned set from pyproject.toml; torch/torchvision are pinned there.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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
