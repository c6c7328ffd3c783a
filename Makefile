# radacx-cache: `make demo` (install + every stage on the phantom archive) and `make test`.
# ARCHIVE=nih, chexpert, vindr, padchest or generic: the demo on a phantom in that layout (pipelines/demo-*.yaml)
ARCHIVE ?= mimic
CONFIG ?= $(if $(filter mimic,$(ARCHIVE)),pipelines/demo.yaml,pipelines/demo-$(ARCHIVE).yaml)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# QUICK=1: a first look in a few minutes: fewer epochs, saliency images and bootstrap resamples, in its own
# workdir (runs/quick-<archive>), so a full demo is never mixed with it
QUICK_SET = workdir=runs/quick-$(ARCHIVE) finetune.epochs=3 finetune.patience=3 saliency.images=12 \
	saliency.boxed_images=6 report.bootstrap=200
# $(call radacx,STAGE): the CLI contract `radacx <stage> --config FILE [--set k=v ...]` (SET="k=v ...")
radacx = $(VENV)/bin/radacx $(1) --config $(CONFIG) $(foreach s,$(SET) $(if $(QUICK),$(QUICK_SET)),--set $(s))
STAMP := $(VENV)/.installed

.PHONY: help install demo demo-ablation demo-data cohort shards embed probes zeroshot finetune saliency report test test-quick fuzz bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dask]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package (torch, open_clip, h5py, ...)

demo: install ## phantom archive -> cohort -> shards -> features -> probes/zero-shot -> fine-tune -> table (QUICK=1: a first look)
	$(call radacx,demo-data)
	$(call radacx,cohort)
	$(call radacx,shards)
	$(call radacx,embed)
	$(call radacx,zeroshot)
	$(call radacx,probe)
	$(call radacx,finetune)
	$(call radacx,saliency)
	$(call radacx,report)

demo-ablation: install ## overlay ablations on the phantom: six overlay variants x every arm (pipelines/ablation.yaml)
	$(MAKE) demo CONFIG=pipelines/ablation.yaml

demo-data: install ## generate the phantom archive (real MIMIC-CXR-JPG + CheXmask layout; ARCHIVE=nih|chexpert|vindr|padchest|generic)
	$(call radacx,demo-data)
cohort: install ## filter, label policy and patient-level split
	$(call radacx,cohort)
shards: install cohort ## render HDF5 shards (joblib workers; CONFIG=pipelines/mimic.yaml for real data)
	$(call radacx,shards)
embed: install ## frozen-encoder feature cache for the original and masked variants
	$(call radacx,embed)
probes: install ## linear probes V1/V2 on cached features
	$(call radacx,probe)
zeroshot: install ## zero-shot baseline from cached features
	$(call radacx,zeroshot)
finetune: install ## fine-tune encoder + head (V3 original, V4 masked), streaming from shards
	$(call radacx,finetune)
saliency: install ## where each trained arm looks: saliency metrics against the anatomy, panels
	$(call radacx,saliency)
report: install ## results table, confidence intervals and figures
	$(call radacx,report)

test: install ## the test suite (CPU, generated data, ~minutes)
	$(PY) -m pytest -q -x tests

test-quick: install ## the tests that build no phantom pipeline (under a minute)
	$(PY) -m pytest -q -m "not slow and not pipeline" tests

fuzz: install ## the property-based fuzz suite with a large example budget (tests/test_fuzz.py; ~10 minutes)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz.py

bench: install ## throughput benchmarks (ratios against named baselines)
	$(PY) benchmarks/shards.py
	$(PY) benchmarks/embed.py
	$(PY) benchmarks/probe.py
	$(PY) benchmarks/stream.py
	$(PY) benchmarks/saliency.py

bench-scale: install ## the cohort and shard plan at full MIMIC size (~11 GB of synthetic input, ~10 min)
	$(PY) benchmarks/scale.py

clean: ## remove generated data and runs (keeps .venv)
	rm -rf runs data results
