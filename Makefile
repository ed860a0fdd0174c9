# oxford-ir: every target that runs code depends on the virtual environment.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-11s\033[0m %s\n", $$1, $$2}'

# CPU=1: torch and torchvision from PyTorch's CPU wheel index first (about 1 GB instead of the 5.5 GB CUDA stack that
# PyPI's Linux torch brings along); TORCH_INDEX names another index or a local mirror
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(filter 1 yes true,$(CPU)),$(PY) -m pip install --index-url $(TORCH_INDEX) 'torch<=2.14.1' 'torchvision<=0.29.1')
	$(PY) -m pip install -e '.[dev,optuna,slurm,joblib,faiss,onnx,timm,parquet]'
	./.ci/install-chromium
	touch $(STAMP)

install: $(STAMP) ## create .venv, install the package with its dev/optuna/slurm/joblib/faiss/onnx extras, and Debian's chromium if missing; CPU=1: CPU-only torch

# the suite runs in TEST_WORKERS processes (pytest-xdist, a test file per worker at a time), each with one OpenMP
# thread: two workers of one thread use 2 cores without torch's threads waiting on each other (2 min 46 s instead of
# about 5 min on 2 cores, 2026-12-07); TEST_WORKERS=0 runs in this process only
TEST_WORKERS ?= 2
PYTEST := $(if $(filter 0,$(TEST_WORKERS)),$(PY) -m pytest,OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP) ## run the fast test suite (CPU, about 3 minutes on 2 cores); TEST_WORKERS=0 without pytest-xdist
	$(PYTEST)

test-full: $(STAMP) ## run every test, the slow ones too
	$(PYTEST) -m ""

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check oxford_ir tests experiments
	$(VENV)/bin/ruff format --check oxford_ir tests experiments

train: $(STAMP) ## the main job: train the quickstart on the synthetic benchmark (CPU, a few minutes); ARGS="..." adds overrides
	$(VENV)/bin/oxford-ir-train experiment=quickstart $(ARGS)

sweep: $(STAMP) ## a Hydra multirun grid on the quickstart: loss.margin 0.1,0.2 x miner semi-hard,all = 4 different trainings, 7 min 42 s on 2 idle CPU cores, one W&B group
	$(VENV)/bin/oxford-ir-train hparams_search=grid experiment=quickstart $(ARGS)

eval: $(STAMP) ## evaluate a model with the published protocol; ARGS="benchmarks=[roxford5k] ..." for overrides
	$(VENV)/bin/oxford-ir-eval $(ARGS)

index: $(STAMP) ## index an image folder; ARGS="images=<folder|glob|benchmark:name> out=<dir> [ckpt_path=...]"
	$(VENV)/bin/oxford-ir-index $(ARGS)

search: $(STAMP) ## search an index; ARGS="index=<dir> query=<image|folder> k=10"
	$(VENV)/bin/oxford-ir-search $(ARGS)

serve: $(STAMP) ## the search web page for an index: make serve INDEX=indexes/photos [ARGS="port=0 k=20"]
	$(VENV)/bin/oxford-ir-serve index=$(INDEX) $(ARGS)

bench: $(STAMP) ## benchmarks: training, extraction, evaluation, search vs the compute ceiling and the original method (CPU, 3 min 15 s on 2 cores); writes bench.json; ARGS="--quick|--only training,search"
	$(PY) experiments/bench/run.py --profile cpu --out bench.json $(ARGS)

reproduce: $(STAMP) ## the published setting: download Paris6k + Oxford5k, train gem_resnet50, evaluate ROxf/RPar (GPU, ~2.3 h); RECIPE=cirtorch_sfm120k_r101|cirtorch_sfm120k_r50|gldv2_r50_arcface|dinov2_vitl14: that recipe (experiments/recipes.py); DRY=1: the same on the CPU on synthetic data or miniatures (minutes); ARGS="--out DIR ..."
	$(if $(RECIPE),$(PY) experiments/recipes.py --recipe $(RECIPE),$(PY) experiments/reproduce.py) $(if $(filter 1 yes true,$(DRY)),--dry) $(ARGS)

compare: $(STAMP) ## compare runs without a dashboard (table + a metric's plot): make compare RUNS=logs/train/multiruns/<time> [ARGS="--sort M --metric train/loss_epoch"]
	$(VENV)/bin/oxford-ir-compare $(RUNS) $(ARGS)

data: $(STAMP) ## write the synthetic benchmark to data/synthetic
	$(VENV)/bin/oxford-ir-data synthetic --root data/synthetic

clean: ## remove run outputs and caches (keeps .venv and data/)
	rm -rf outputs multirun logs wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help install test test-full lint train sweep eval index search serve bench reproduce compare data clean
