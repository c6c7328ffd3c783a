# radacx-cache: `make demo` (install + every stage on the phantom archive) and `make test`.
CONFIG ?= pipelines/demo.yaml
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RADACX := $(VENV)/bin/radacx --config $(CONFIG)
STAMP := $(VENV)/.installed

.PHONY: help install demo demo-data cohort shards embed probes zeroshot finetune report test test-quick bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dask]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package (torch, open_clip, h5py, ...)

demo: install ## phantom archive -> cohort -> shards -> features -> probes/zero-shot -> fine-tune -> table
	$(RADACX) demo-data
	$(RADACX) cohort
	$(RADACX) shards
	$(RADACX) embed
	$(RADACX) zeroshot
	$(RADACX) probe
	$(RADACX) finetune
	$(RADACX) report

demo-data: install ## generate the phantom archive (real MIMIC-CXR-JPG + CheXmask layout)
	$(RADACX) demo-data
cohort: install ## filter, label policy and patient-level split
	$(RADACX) cohort
shards: install cohort ## render HDF5 shards (joblib workers; CONFIG=pipelines/mimic.yaml for real data)
	$(RADACX) shards
embed: install ## frozen-encoder feature cache for the original and masked variants
	$(RADACX) embed
probes: install ## linear probes V1/V2 on cached features
	$(RADACX) probe
zeroshot: install ## zero-shot baseline from cached features
	$(RADACX) zeroshot
finetune: install ## fine-tune encoder + head (V3 original, V4 masked), streaming from shards
	$(RADACX) finetune
report: install ## results table, confidence intervals and figures
	$(RADACX) report

test: install ## the test suite (CPU, generated data, ~minutes)
	$(PY) -m pytest -q -x tests

test-quick: install ## unit tests only (no end-to-end)
	$(PY) -m pytest -q -m "not slow" tests

bench: install ## throughput benchmarks (ratios against named baselines)
	$(PY) benchmarks/shards.py
	$(PY) benchmarks/embed.py
	$(PY) benchmarks/probe.py
	$(PY) benchmarks/stream.py

clean: ## remove generated data and runs (keeps .venv)
	rm -rf runs data results
