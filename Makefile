# slimcore: two commands on a fresh machine -- `make repro` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
# torch/torchvision builds that pip takes from this project's machines' local disk; override
# for other platforms, e.g. `make TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" repro`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro seed test test-fast lint bench plots clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)  ## run the whole pipeline on the embedded default (dvc repro)
	$(BIN)/dvc repro

# The seed's CIFAR-100 at 224px experiment (GPUs): make seed CIFAR_ROOT=/data/holding/cifar-100-python
CIFAR_ROOT ?= data
seed: $(STAMP)
	cp configs/seed-cifar100.yaml params.yaml
	sed -i 's#^  root: .*#  root: $(CIFAR_ROOT)#' params.yaml
	$(BIN)/dvc repro

test: $(STAMP)   ## unit tests + end-to-end DVC pipeline test
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check slimcore stages tests bench

bench: $(STAMP)  ## the figures in README's Performance section
	$(BIN)/python bench/prune_speed.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/train_speed.py

plots: $(STAMP)  ## charts of the last `dvc repro`: docs/plots/*.png and dvc_plots/index.html (both offline)
	$(BIN)/python -m slimcore.render_plots --out docs/plots
	$(BIN)/dvc plots show

clean:
	rm -rf $(VENV) .slimcore dvc_plots .pytest_cache
