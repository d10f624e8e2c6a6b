# slimcore: two commands on a fresh machine -- `make repro` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
# torch/torchvision builds that pip takes from this project's machines' local disk; override
# for other platforms, e.g. `make TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" repro`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro seed seed-smoke fashion-mnist peers push pull test test-fast engine-check lint bench plots compare dag export clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[pipeline,dev,timm]'
	touch $(STAMP)

repro: $(STAMP)  ## run the whole pipeline on the embedded default (dvc repro)
	$(BIN)/dvc repro

# The seed's CIFAR-100 at 224px preset as a DVC experiment, on GPUs (docs/seed.md):
#   make seed CIFAR_ROOT=/data/cifar [SEED_ARGS="--set runtime.nproc=4"] [ALLOW_CPU=1]
# Runs `dvc exp run --temp`: params.yaml, dvc.lock and metrics/ here stay as committed.
CIFAR_ROOT ?= data
ALLOW_CPU  ?=
CPU_FLAG    = $(if $(filter 1 yes true,$(ALLOW_CPU)),--allow-cpu)
seed: $(STAMP)  ## the seed CIFAR-100 preset as a DVC experiment (GPU): make seed CIFAR_ROOT=/data/cifar
	$(BIN)/python -m slimcore_pipeline.preset configs/seed-cifar100.yaml --cifar-root "$(CIFAR_ROOT)" $(CPU_FLAG) $(SEED_ARGS)

seed-smoke: $(STAMP)  ## the seed preset end to end on synthetic CIFAR-100, a few steps per stage: images/s
	$(BIN)/python -m slimcore_pipeline.seed_smoke configs/seed-cifar100.yaml $(CPU_FLAG) $(SMOKE_ARGS)

# Real data on a laptop CPU (docs/benchmarks.md): Fashion-MNIST as Debian's dataset-fashion-mnist
# installs it (`apt-get install dataset-fashion-mnist`), all three archs in about 16 minutes on 2 cores.
# Runs `dvc exp run --temp`: params.yaml, dvc.lock and metrics/ here stay as committed.
fashion-mnist: $(STAMP)  ## the Fashion-MNIST CPU preset as a DVC experiment (about 16 min on 2 cores)
	$(BIN)/python -m slimcore_pipeline.preset configs/fashion-mnist.yaml --allow-cpu $(PRESET_ARGS)

peers: $(STAMP)  ## slimcore vs the paper's recipe and Torch-Pruning at 2x/4x MACs on Fashion-MNIST (docs/benchmarks.md)
	$(BIN)/python bench/peers.py --params configs/fashion-mnist.yaml $(PEERS_ARGS)

# DVC's default remote: ../slimcore-dvc-remote, a folder beside the clone (docs/remote.md)
push: $(STAMP)   ## upload the DVC-cached outputs (checkpoints under models/) to the default remote
	$(BIN)/dvc push

REMOTE_HINT = make pull: the DVC remote does not hold these outputs (it is a folder only the machine that pushed has): run `make repro` to build them, or point the remote at the shared storage: `dvc remote modify --local storage url PATH` (docs/remote.md)
pull: $(STAMP)   ## fetch them back and check them out: a fresh clone's workspace without training
	@url=$$($(BIN)/dvc config "remote.$$($(BIN)/dvc remote default).url" 2>/dev/null); \
	case "$$url" in *://*) ;; *) case "$$url" in /*) ;; *) url=".dvc/$$url";; esac; \
	  if [ -z "$$(ls -A "$$url" 2>/dev/null)" ]; then echo '$(REMOTE_HINT)' "(remote: $$url, empty or missing)"; exit 2; fi;; esac; \
	mkdir -p .slimcore; $(BIN)/dvc pull > .slimcore/pull.log 2>&1 || { echo '$(REMOTE_HINT) (dvc: .slimcore/pull.log)'; exit 2; }; \
	tail -n 3 .slimcore/pull.log

test: $(STAMP)   ## unit tests + end-to-end DVC pipeline test
	$(BIN)/python -m pytest -q

# The engine alone, as `pip install slimcore` installs it: a clean venv (.slimcore/engine-venv) with
# `pip install .` and no extras slims, saves and loads a ResNet-50 and holds no pipeline package.
engine-check:  ## pip install . (no extras) in a clean venv: the engine works without dvc, pydantic, typer
	TORCH_SPEC="$(TORCH_SPEC)" PYTHON="$(PYTHON)" .ci/engine-check

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check slimcore slimcore_pipeline stages tests bench

bench: $(STAMP)  ## the figures in README's Performance section
	$(BIN)/python bench/prune_speed.py
	$(BIN)/python bench/targets.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/determinism.py

plots: $(STAMP)  ## charts of the last `dvc repro`: docs/plots/*.png and dvc_plots/index.html (both offline)
	$(BIN)/python -m slimcore_pipeline.render_plots --out docs/plots --docs docs/plots.md
	$(BIN)/dvc plots show

# Two runs side by side, one row per arch and target slot (README, Compare two runs):
#   make compare A=main B=targets-0.3-0.5     (default: HEAD and the workspace)
A ?=
B ?=
compare: $(STAMP)  ## two runs side by side: per arch and target, top-1 and MACs kept: make compare A=main B=NAME
	@$(BIN)/python -m slimcore_pipeline.compare $(A) $(B)

ARCH ?=
dag: $(STAMP)  ## one arch's stages as a mermaid flowchart (dvc dag draws all archs at once): make dag ARCH=resnet50
	@$(BIN)/python -m slimcore_pipeline.dag $(ARCH)

# A checkpoint as ONNX, BatchNorm folded, checked with onnxruntime (docs/export.md):
#   make export CKPT=models/resnet50/finetuned-0.4.pt OUT=resnet50.onnx [EXPORT_ARGS="--image-size 32"]
export: $(STAMP)  ## a checkpoint as ONNX: make export CKPT=models/ARCH/finetuned-R.pt OUT=model.onnx
	@test -n "$(CKPT)" -a -n "$(OUT)" || { echo "usage: make export CKPT=path/to/checkpoint.pt OUT=model.onnx"; exit 2; }
	$(BIN)/python -m slimcore.export "$(CKPT)" "$(OUT)" $(EXPORT_ARGS)

clean:
	rm -rf $(VENV) .slimcore dvc_plots .pytest_cache
