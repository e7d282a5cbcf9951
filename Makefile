# SPDX-License-Identifier: MIT
# AdamWPrune: `make help` lists the targets. Configuration lives in .config
# (Kconfig, edited with `make menuconfig` or loaded with `make defconfig`);
# Python reads it through kconfiglib. Make only passes the path of .config and
# the make-line overrides below.

PYTHON_BOOT ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
CONFIG      ?= .config
DEMO_CONFIG := results/demo/.config

# tiktoken downloads its BPE files on first use; offline, point it at a local copy.
ifeq ($(TIKTOKEN_CACHE_DIR),)
ifneq ($(wildcard ../shared/data/tiktoken-cache/*),)
export TIKTOKEN_CACHE_DIR := $(abspath ../shared/data/tiktoken-cache)
endif
endif

# Make-line shorthands that become config overrides (validated like .config).
SHORTHANDS := EPOCHS MAX_ITERS BATCH_SIZE LR SEED DEVICE DATASET DATA_DIR NPROC CHECKPOINT_INTERVAL JOBS TRACKER LAUNCHER
OVERRIDES  := $(foreach v,$(SHORTHANDS),$(if $($(v)),--override=$(v)=$($(v))))
SET        ?=

# Every variable given on the make line either does something or is refused:
# a Kconfig symbol goes through SET="SYMBOL=value", never as a bare variable.
MAKE_VARIABLES := $(SHORTHANDS) SET CONFIG DEFCONFIG DIR RUN RERUN_FAILED ACCEPT_CONFIG_CHANGES MODEL \
                  PYTEST_ARGS BENCH_ARGS NANOGPT_DIR COMPARE_ARGS VENV PYTHON_BOOT TORCHRUN_ARGS TIKTOKEN_CACHE_DIR
UNKNOWN_VARIABLES := $(filter-out $(MAKE_VARIABLES),$(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
ifneq ($(UNKNOWN_VARIABLES),)
$(error $(firstword $(UNKNOWN_VARIABLES))=$($(firstword $(UNKNOWN_VARIABLES))) is not a make variable of this project; a Kconfig symbol goes in SET="$(firstword $(UNKNOWN_VARIABLES))=..." (`make help` lists the variables))
endif

.DEFAULT_GOAL := all
.PHONY: all help install demo check test defconfig menuconfig olddefconfig savedefconfig \
        list-defconfigs prepare-data continue dry-run status summary claims update-graphs trackio-view trackio-test wandb-test bench gputop evaluate export bench-inference clean mrproper

help:
	@echo "AdamWPrune - pruning during training with the state Adam already keeps"
	@echo ""
	@echo "Set-up and checks:"
	@echo "  make demo              create .venv if needed, install, train the LeNet-5 demo (embedded MNIST)"
	@echo "  make check             create .venv if needed, install, run the whole test suite"
	@echo "  make install           only create/refresh .venv (reinstalls when pyproject.toml changes)"
	@echo ""
	@echo "Configuration (Kconfig, stored in .config):"
	@echo "  make defconfig DEFCONFIG=<name>   load a preset from defconfigs/ or <model>/defconfigs/"
	@echo "  make defconfig-<name>             the same"
	@echo "  make list-defconfigs              list the presets"
	@echo "  make menuconfig                   edit .config interactively"
	@echo "  make olddefconfig                 update .config to the current Kconfig (new symbols get defaults)"
	@echo "  make savedefconfig                write the minimal file 'defconfig' that reproduces .config"
	@echo ""
	@echo "Training:"
	@echo "  make                   train what .config describes; results in results/<timestamp>_<run>/"
	@echo "  make prepare-data      tokenize the GPT-2 corpus .config names (also done before the first run)"
	@echo "  make dry-run           list the cells of the configured test matrix without running them"
	@echo "  make status [DIR=]     done / running / failed / pending per cell of the newest matrix"
	@echo "  make continue [DIR=]   resume the newest interrupted run or matrix (or DIR) from last.pt"
	@echo "                         RERUN_FAILED=1 also reruns failed cells; ACCEPT_CONFIG_CHANGES=1 resumes"
	@echo "                         although the current Kconfig resolves the run differently (recorded);"
	@echo "                         LAUNCHER=local|slurm moves a matrix"
	@echo "  make summary [DIR=]    rebuild summary.csv / summary.md of the newest (or DIR) matrix"
	@echo "  make claims            the seed README's claims tested on the study matrices (docs/claims.md)"
	@echo "  make update-graphs [DIR=]  figures + report.md into <matrix>/graphs/ and images/<model>/"
	@echo "  make trackio-view [MODEL=]  open trackio's local dashboard (results/trackio)"
	@echo "  make trackio-test / make wandb-test   log a short fake run to check a tracker's set-up"
	@echo "  make bench             optimizer-step, memory, mask-update and engine benchmarks -> results/bench/"
	@echo "                         NANOGPT_DIR=<nanoGPT checkout> also times our engine against nanoGPT's train.py"
	@echo "  make gputop [DIR=]     live view of device memory and the running cells"
	@echo "  make evaluate RUN=<run dir> [DATASET=<name>] [DATA_DIR=<dir>]   best.pt on a test split -> eval.json"
	@echo "  make export RUN=<run dir>   best.pt -> <run>/export/: safetensors, compressed-tensors copy,"
	@echo "                         Hugging Face folder (GPT-2), export.json (sizes, FLOPs, metric)"
	@echo "  make bench-inference RUN=<run dir>   forward latency of the run's model, dense vs sparse"
	@echo ""
	@echo "Overrides on any training target (validated like .config, recorded in the run):"
	@echo "  EPOCHS= MAX_ITERS= BATCH_SIZE= LR= SEED= DEVICE=cpu|cuda|auto DATASET= DATA_DIR= NPROC="
	@echo "  CHECKPOINT_INTERVAL= JOBS=<cells at once> TRACKER=none|trackio|wandb|trackio,wandb  SET=\"SYMBOL=value SYMBOL2=value\""
	@echo "  LAUNCHER=local|slurm   where a matrix's cells run (slurm: one job array through submitit)"
	@echo ""
	@echo "  make clean             remove results/ ; make mrproper also removes .venv and .config"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

# `exec`: the shell make starts becomes the trainer, so the trainer's parent is make
# and a killed make takes it along (lib/run/locks.py, die_with_parent).
all: $(STAMP)
	exec $(PY) -m adamwprune run --config $(CONFIG) $(OVERRIDES) --set '$(SET)'

demo: $(STAMP)
	@mkdir -p $(dir $(DEMO_CONFIG))
	$(PY) -m adamwprune.config.cli --config $(DEMO_CONFIG) defconfig lenet5-demo
	exec $(PY) -m adamwprune run --config $(DEMO_CONFIG) $(OVERRIDES) --set '$(SET)'
	$(PY) -m adamwprune.graphs --run

check test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

defconfig: $(STAMP)
	@test -n "$(DEFCONFIG)" || { echo "usage: make defconfig DEFCONFIG=<name> (make list-defconfigs)"; exit 2; }
	$(PY) -m adamwprune.config.cli --config $(CONFIG) defconfig $(DEFCONFIG) $(OVERRIDES) --set '$(SET)'

defconfig-%: $(STAMP)
	$(PY) -m adamwprune.config.cli --config $(CONFIG) defconfig $* $(OVERRIDES) --set '$(SET)'

list-defconfigs: $(STAMP)
	@$(PY) -m adamwprune.config.cli list

menuconfig: $(STAMP)
	$(PY) -m adamwprune.config.cli --config $(CONFIG) menuconfig

olddefconfig: $(STAMP)
	$(PY) -m adamwprune.config.cli --config $(CONFIG) olddefconfig

savedefconfig: $(STAMP)
	$(PY) -m adamwprune.config.cli --config $(CONFIG) savedefconfig defconfig

prepare-data: $(STAMP)
	$(PY) gpt2/train.py prepare --config $(CONFIG) $(OVERRIDES)

continue: $(STAMP)
	exec $(PY) -m adamwprune continue --config $(CONFIG) $(OVERRIDES) --set '$(SET)' $(if $(DIR),--dir $(DIR)) \
	    $(if $(RERUN_FAILED),--rerun-failed) $(if $(ACCEPT_CONFIG_CHANGES),--accept-config-changes) \
	    $(if $(LAUNCHER),--launcher $(LAUNCHER))

dry-run: $(STAMP)
	@$(PY) -m adamwprune dry-run --config $(CONFIG) $(OVERRIDES) --set '$(SET)'

status: $(STAMP)
	@$(PY) -m adamwprune status --config $(CONFIG) $(OVERRIDES) --set '$(SET)' $(if $(DIR),--dir $(DIR))

summary: $(STAMP)
	$(PY) -m adamwprune.report.summary $(DIR)

claims: $(STAMP)
	$(PY) -m adamwprune.report.claims $(CLAIMS_ARGS)

update-graphs: $(STAMP)
	$(PY) -m adamwprune.graphs $(DIR)

trackio-view: $(STAMP)
	$(PY) -m adamwprune.report.tracking view --dir results/trackio $(if $(MODEL),--model $(MODEL))

trackio-test: $(STAMP)
	$(PY) scripts/tracker_test.py trackio --dir results

wandb-test: $(STAMP)
	$(PY) scripts/tracker_test.py wandb --dir results/wandb-test

gputop: $(STAMP)
	$(PY) -m adamwprune.monitor $(if $(DIR),--results $(DIR))

evaluate: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make evaluate RUN=<run dir> [DATASET=<name>] [DATA_DIR=<dir>]"; exit 2; }
	$(PY) -m adamwprune evaluate --run $(RUN) $(if $(DATASET),--dataset $(DATASET)) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

export: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make export RUN=<run dir>"; exit 2; }
	HF_HUB_OFFLINE=1 $(PY) -m adamwprune export --run $(RUN)

bench-inference: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make bench-inference RUN=<run dir>"; exit 2; }
	$(PY) -m adamwprune.inference.bench --run $(RUN) $(BENCH_ARGS)

clean:
	rm -rf results

mrproper: clean
	rm -rf $(VENV) .config .config.old
bench: $(STAMP)
	$(PY) -m adamwprune.bench $(BENCH_ARGS)
	$(if $(NANOGPT_DIR),$(PY) scripts/compare_nanogpt.py --nanogpt-dir $(NANOGPT_DIR) $(COMPARE_ARGS))
