# quantlab — `make help` lists every target.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# `make reproduce-*` data root: the scripts' own rule, $QUANTLAB_DATA, else ./data (a root holding MNIST/,
# cifar10/ or cifar-10-batches-py/, ...). Developers with ../shared beside the checkout: QUANTLAB_DATA=../shared/data.
DATA   ?= $(abspath $(or $(QUANTLAB_DATA),data))
EPOCHS ?=
# SMOKE=1 make reproduce-<paper>: the same short form for every pipeline (a few iterations per stage, recorded
# as shortened, never shown as a reproduction); each paper's own knobs are what it turns into:
SMOKE  ?=
SMOKE_STAMP := $(shell date +%Y%m%d-%H%M%S)
ifeq ($(SMOKE),1)
SMOKE_ALQ    := QUANTLAB_RUNS="$(CURDIR)/runs/alq-smoke-$(SMOKE_STAMP)" ALQ_ARGS="--train_limit 1000 --pretrain_epochs 1 --R 1 --epoch_basis 1 --epoch_coord 1 --post_epochs 1 1"
SMOKE_DAMBQ  := EPOCHS=1 DAMBQ_ITERS=2 RUNS="$(CURDIR)/runs/dambq-smoke-$(SMOKE_STAMP)"
SMOKE_ALIGNQ := EPOCHS=1 ITERS=2 OUT="$(CURDIR)/runs/alignq-smoke-$(SMOKE_STAMP)"
endif
export DATA EPOCHS SMOKE
# Tests use small tensors and run scripts in subprocesses: one torch thread each (unless set) avoids OpenMP
# oversubscription, which made the suite several times slower on a shared 2-core machine.
TEST_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1}

.DEFAULT_GOAL := help
.PHONY: help setup reference-table bench-gpu lint test test-originals test-gpu test-slow test-all bench compare reproduce-apot reproduce-alq reproduce-dambq reproduce-alignq pretrain-alignq pretrain-alignq-dann reproduce-fdda clean

help: ## list every target with one line each
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv (if missing) and install requirements.txt; quick when nothing changed

# `pip install -e .` (pyproject.toml) makes common/ and the paper packages importable; --no-build-isolation builds
# with the venv's own setuptools, so nothing is fetched for the build; quantlab.pth, which older `make setup`s
# wrote for the same purpose, is removed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	rm -f "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/quantlab.pth"
	$(PY) -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5); print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

TEST_JOBS ?= 2
test: setup ## ruff (ruff.toml), then the test suite in TEST_JOBS processes (the README's test command; CI runs it)
	$(PY) -m ruff check -q .
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_JOBS)

lint: setup ## ruff with ruff.toml's small rule set and the layout tests (make test runs both)
	$(PY) -m ruff check .
	$(TEST_ENV) $(PY) -m pytest -q tests/test_layout.py

test-originals: setup ## side by side with the authors' code, bitwise (QUANTLAB_ORIGINALS=DIR; tests/originals/README.md)
	@if [ -z "$${QUANTLAB_ORIGINALS:-}" ]; then echo "test-originals: skipped: set QUANTLAB_ORIGINALS to a folder of the five original checkouts (tests/originals/README.md)"; \
	else $(TEST_ENV) $(PY) -m pytest -q -rs -n $(TEST_JOBS) tests/originals $(PYTEST_ARGS); fi

# On a GPU machine without this venv (the device has torch/torchvision/pytest): `make test-gpu PY=python3`.
test-gpu: ## the suite plus the `gpu` tests (short real runs of each paper's script on CUDA); QUANT_SHARED= data
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup ## run only the slow real-data tests
	$(TEST_ENV) $(PY) -m pytest -q -m slow

test-all: setup ## run every test, slow ones included
	$(TEST_ENV) $(PY) -m pytest -q -m "slow or not slow"

bench: setup ## run benchmarks/ and write CSV rows under results/bench/
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

# On a GPU machine without this venv: `make bench-gpu PY=python3` (benchmarks/gpu_check.py --help).
bench-gpu: ## one speed check for all five papers (benchmarks on the GPU, a short real run, one summary table)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

reference-table: setup ## rewrite results/reference/RESULTS.md from the committed reference records (after adding some)
	$(PY) -m common.compare --reference-table

compare: setup ## published vs measured (reference + local records); RESULTS.md + charts (COMPARE_FLAGS=--include-shortened)
	$(PY) -m common.compare $(COMPARE_FLAGS)

reproduce-apot: setup ## APoT: published checkpoints, MNIST README recipe (SEEDS=, ARCH=), CIFAR-10 ResNet-20 32/4/3/2-bit (EPOCHS=), compare
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash apot/reproduce.sh

reproduce-alq: setup ## ALQ: LeNet5 --PRETRAIN --ALQ --POSTTRAIN on MNIST (DATA=), export, compare
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SMOKE_ALQ) bash alq/reproduce.sh

reproduce-dambq: setup ## DAMBQ: CIFAR-10 ResNet-20 float -> W4A4 -> W2.0A2.0 (DATA=, EPOCHS=), compare
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SMOKE_DAMBQ) bash dambq/reproduce.sh

reproduce-alignq: setup ## AlignQ: FP32 pretrain -> 8-bit CDF-aligned ResNet-20 on CIFAR-10 (DATA=, EPOCHS=), compare
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SMOKE_ALIGNQ) bash alignq/reproduce.sh

pretrain-alignq: setup ## AlignQ: FP32 ResNet-20 CIFAR-10 source model of README #1 (DATA=, EPOCHS=)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash alignq/pretrain.sh resnet-20-cifar-10

pretrain-alignq-dann: setup ## AlignQ: FP32 DANN ResNet-50 Office-31 D->W source model of README #2 (DATA=, EPOCHS=, IMAGENET_WEIGHTS=)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash alignq/pretrain.sh dann_office

reproduce-fdda: setup ## FDDA: BNScenters -> main_cosine_CBNS -> test on an ImageNet root (DATA=), compare
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash fdda/reproduce.sh

clean: ## remove caches (keeps .venv and results/)
	find . -name __pycache__ -prune -exec rm -rf {} +
