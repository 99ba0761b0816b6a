# Two commands do all the set-up on a fresh machine: `make pipeline` and `make test` each create
# the virtual environment and install the project into it when it is missing or out of date.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MIRROR ?= data/mirror
PORT   ?= 8765

.PHONY: install test lint pipeline params mirror offline ui clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

# Runs the DVC pipeline; stages run with the virtual environment's python.
pipeline: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# Recompose params.yaml after editing conf/ (tests fail when the two drift).
params: $(STAMP)
	$(BIN)/python -m oitools.params

# A synthetic Open Images mirror in the real layout, for offline runs (oimirror/).
mirror: $(STAMP)
	test -f $(MIRROR)/manifest.json || $(BIN)/python -m oimirror generate $(MIRROR) \
	    --classes Zebra "Sea turtle" "Blue jay" --images-per-class 100

# The whole pipeline with no network: serve the mirror on 127.0.0.1 and run against it as a DVC
# experiment (data=mirror; conf/data/mirror.yaml holds its URLs).
offline: mirror
	$(BIN)/python -m oimirror serve $(MIRROR) --port $(PORT) & pid=$$!; \
	trap "kill $$pid" EXIT; sleep 1; \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc exp run -S data=mirror

# The MLflow UI on the project's store, bound to this machine only (http://127.0.0.1:5000).
# MLflow 3.17 opens experiments in its GenAI view unless the address asks for the training one.
ui: $(STAMP)
	@id=$$($(BIN)/python -c "from mlflow import MlflowClient; \
	e = MlflowClient('sqlite:///$(abspath mlflow.db)').get_experiment_by_name('oi-pipeline'); \
	print(e.experiment_id if e else '')" 2>/dev/null); \
	echo "runs: http://127.0.0.1:5000/#/experiments/$${id:-<id>}?workflowType=machine_learning"
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath mlflow.db) \
	    --default-artifact-root $(abspath mlartifacts) --host 127.0.0.1 --port 5000
